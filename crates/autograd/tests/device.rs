//! Device dispatch: every op's forward and backward, AdamW and gradient clipping through the CUDA
//! kernels (on the CPU emulator) against the CPU path; device selection and scoping.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_autograd::device::{current, with_device, Device, DeviceKind};
use scalpel_autograd::optim::{clip_grad_norm, Adam, AdamConfig};
use scalpel_autograd::{ops, Params, Result, Var};
use scalpel_tensor::{DType, Tensor};

fn random(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        shape,
        (0..n)
            .map(|_| rng.gen_range(-scale..scale))
            .collect::<Vec<f32>>(),
    )
    .unwrap()
}

fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec::<f64>(), b.to_vec::<f64>());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

/// Runs `f` over fresh parameters made from `inputs` on `device`; returns the output and the
/// gradient of an MSE against a fixed target for every input.
fn run(
    device: Device,
    inputs: &[Tensor],
    f: &dyn Fn(&[Var]) -> Result<Var>,
) -> (Tensor, Vec<Option<Tensor>>) {
    with_device(device, || {
        let vars: Vec<Var> = inputs.iter().cloned().map(Var::parameter).collect();
        let out = f(&vars).unwrap();
        let target = Tensor::from_vec(
            out.shape(),
            (0..out.value().numel())
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<f32>>(),
        )
        .unwrap();
        let loss = ops::mse_loss(&out, &Var::constant(target)).unwrap();
        let grads = loss.backward().unwrap();
        let grads = vars.iter().map(|v| grads.get(v).cloned()).collect();
        (out.value().clone(), grads)
    })
}

fn assert_same_on_emulator(op: &str, inputs: &[Tensor], f: &dyn Fn(&[Var]) -> Result<Var>) {
    let (cpu_out, cpu_grads) = run(Device::Cpu, inputs, f);
    let (emu_out, emu_grads) = run(Device::emulator(), inputs, f);
    let e = rel_error(&cpu_out, &emu_out);
    assert!(e < 1e-5, "{op} forward: relative error {e:e}");
    for (i, (c, g)) in cpu_grads.iter().zip(&emu_grads).enumerate() {
        match (c, g) {
            (Some(c), Some(g)) => {
                let e = rel_error(c, g);
                assert!(e < 1e-5, "{op} gradient {i}: relative error {e:e}");
            }
            (None, None) => {}
            _ => panic!("{op} gradient {i}: present on one device only"),
        }
    }
}

#[test]
fn every_op_on_the_emulator_matches_the_cpu() {
    let mut rng = StdRng::seed_from_u64(7);
    let (b, s, h) = (2, 5, 3);
    let d = 8 * h;
    let x = random(&mut rng, &[b, s, d], 1.0);
    let w = random(&mut rng, &[7, d], 0.5);
    let bias = random(&mut rng, &[7], 0.5);
    assert_same_on_emulator("linear", &[x.clone(), w.clone(), bias], &|v| {
        ops::linear(&v[0], &v[1], Some(&v[2]))
    });
    assert_same_on_emulator("linear without bias", &[x.clone(), w], &|v| {
        ops::linear(&v[0], &v[1], None)
    });
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = random(&mut rng, if ta { &[2, 6, 4] } else { &[2, 4, 6] }, 1.0);
        let bm = random(&mut rng, if tb { &[2, 3, 6] } else { &[2, 6, 3] }, 1.0);
        assert_same_on_emulator(&format!("matmul {ta} {tb}"), &[a, bm], &|v| {
            ops::matmul(&v[0], &v[1], ta, tb)
        });
    }
    let mut mask = vec![1f32; b * s];
    mask[s - 2..s].fill(0.0); // padding in the first sequence
    let mask = Tensor::from_vec(&[b, s], mask).unwrap();
    let (q, k, v) = (
        random(&mut rng, &[b, s, d], 1.0),
        random(&mut rng, &[b, s, d], 1.0),
        random(&mut rng, &[b, s, d], 1.0),
    );
    let m = mask.clone();
    assert_same_on_emulator("attention", &[q, k, v], &move |v| {
        ops::attention(&v[0], &v[1], &v[2], &Var::constant(m.clone()), h)
    });
    let gamma = random(&mut rng, &[d], 1.0);
    let beta = random(&mut rng, &[d], 1.0);
    assert_same_on_emulator("layernorm", &[x.clone(), gamma, beta], &|v| {
        ops::layernorm(&v[0], &v[1], &v[2], 1e-12)
    });
    assert_same_on_emulator("gelu", std::slice::from_ref(&x), &|v| ops::gelu(&v[0]));
    let y = random(&mut rng, &[b, s, d], 1.0);
    assert_same_on_emulator("add", &[x.clone(), y], &|v| ops::add(&v[0], &v[1]));
    assert_same_on_emulator("scale", std::slice::from_ref(&x), &|v| {
        ops::scale(&v[0], -0.7)
    });
    let table = random(&mut rng, &[11, d], 1.0);
    assert_same_on_emulator("embedding", &[table], &|v| {
        ops::embedding(&v[0], &[3, 0, 10, 3, 3, 7], &[2, 3])
    });
    let m = mask.clone();
    assert_same_on_emulator(
        "mean_pool + l2_normalize",
        std::slice::from_ref(&x),
        &move |v| ops::l2_normalize(&ops::mean_pool(&v[0], &Var::constant(m.clone()))?),
    );
    let logits = random(&mut rng, &[4, 6], 2.0);
    assert_same_on_emulator("cross_entropy", &[logits], &|v| {
        let loss = ops::cross_entropy(&v[0], &[0, 5, 2, 2])?;
        ops::reshape(&loss, &[1])
    });
    let t = random(&mut rng, &[b * s, d], 1.0);
    assert_same_on_emulator(
        "mse_loss (both sides)",
        &[random(&mut rng, &[b * s, d], 1.0), t],
        &|v| ops::reshape(&ops::mse_loss(&v[0], &v[1])?, &[1]),
    );
}

fn adam_run(device: Device, p0: &[Tensor], g: &[Tensor], max_norm: f64) -> (Vec<Tensor>, f64) {
    with_device(device, || {
        let mut params = Params::default();
        for (i, p) in p0.iter().enumerate() {
            let name = if i == 0 {
                "w".to_string()
            } else {
                format!("x.bias{i}")
            };
            params.insert(name, Var::parameter(p.clone()));
        }
        let mut adam = Adam::new(AdamConfig::adamw(0.1), |n| !n.contains("bias"));
        let mut norm = 0.0;
        for step in 0..3 {
            // Gradients of `Σ gᵢ·pᵢ·(step+1)`, a loss linear in every parameter.
            let mut terms = Vec::new();
            for (i, (_, var)) in params.iter().enumerate() {
                let c = ops::linear(
                    &ops::reshape(var, &[1, var.value().numel()])?,
                    &Var::constant(g[i].clone().reshape(&[1, g[i].numel()])?),
                    None,
                )?;
                terms.push(ops::scale(&c, step as f64 + 1.0)?);
            }
            let mut loss = terms[0].clone();
            for t in &terms[1..] {
                loss = ops::add(&loss, t)?;
            }
            let mut grads = ops::reshape(&loss, &[])?.backward()?;
            norm = clip_grad_norm(&mut grads, &params, max_norm)?;
            adam.step(&mut params, &grads, 0.01)?;
        }
        Ok::<_, scalpel_autograd::AutogradError>((
            params.iter().map(|(_, v)| v.value().clone()).collect(),
            norm,
        ))
    })
    .unwrap()
}

#[test]
fn adamw_and_clipping_on_the_emulator_match_the_cpu() {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [&[usize]; 3] = [&[5, 3], &[1000], &[7]];
    let p0: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, 1.0)).collect();
    let g: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, 1.0)).collect();
    for max_norm in [f64::INFINITY, 0.5] {
        let (cpu, cpu_norm) = adam_run(Device::Cpu, &p0, &g, max_norm);
        let (emu, emu_norm) = adam_run(Device::emulator(), &p0, &g, max_norm);
        assert!(
            (cpu_norm - emu_norm).abs() < 1e-5 * cpu_norm,
            "{cpu_norm} vs {emu_norm}"
        );
        for (i, (c, e)) in cpu.iter().zip(&emu).enumerate() {
            let err = rel_error(c, e);
            assert!(err < 1e-6, "parameter {i} (max_norm {max_norm}): {err:e}");
            assert!(rel_error(c, &p0[i]) > 1e-4, "parameter {i} did not move");
        }
    }
}

#[test]
fn f64_ops_stay_on_the_cpu_on_a_cuda_device() {
    // The kernels are f32: the f64 gradient checks keep their exact CPU path on any device.
    let x = Tensor::from_vec(&[2, 3], vec![0.1f64, -0.2, 0.3, 0.4, -0.5, 0.6]).unwrap();
    let (cpu, emu) = (
        with_device(Device::Cpu, || {
            ops::gelu(&Var::constant(x.clone())).unwrap()
        }),
        with_device(Device::emulator(), || {
            ops::gelu(&Var::constant(x.clone())).unwrap()
        }),
    );
    assert_eq!(emu.value().dtype(), DType::F64);
    assert_eq!(cpu.value().to_vec::<f64>(), emu.value().to_vec::<f64>());
}

#[test]
fn device_selection_and_scoping() {
    assert_eq!("auto".parse::<DeviceKind>().unwrap(), DeviceKind::Auto);
    assert_eq!("CPU".parse::<DeviceKind>().unwrap(), DeviceKind::Cpu);
    assert_eq!("emu".parse::<DeviceKind>().unwrap(), DeviceKind::Emu);
    assert_eq!("cuda".parse::<DeviceKind>().unwrap(), DeviceKind::Cuda);
    assert!("tpu".parse::<DeviceKind>().unwrap_err().contains("tpu"));

    let (d, line) = Device::resolve(DeviceKind::Emu).unwrap();
    assert!(!d.is_cpu());
    assert_eq!(line, "emu (CPU emulator)");
    assert!(with_device(d, || !current().is_cpu()));
    assert!(current().is_cpu(), "the scope did not end");
    assert_eq!(Device::resolve(DeviceKind::Cpu).unwrap().1, "cpu");

    if std::env::var_os("SCALPEL_EXPECT_GPU").is_some() {
        assert!(Device::resolve(DeviceKind::Cuda).is_ok());
        return;
    }
    let err = Device::resolve(DeviceKind::Cuda).unwrap_err().to_string();
    assert!(err.contains("CUDA driver library (libcuda.so)"), "{err}");
    let (d, line) = Device::resolve(DeviceKind::Auto).unwrap();
    assert!(d.is_cpu());
    assert!(line.starts_with("cpu (no CUDA: "), "{line}");
}
