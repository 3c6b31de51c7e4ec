//! Device dispatch: every op's forward and backward, AdamW and gradient clipping on device-resident
//! tensors through the CUDA kernels (on the CPU emulator) against the CPU path; what moves between
//! host and device; device selection.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_autograd::device::{self, Device, DeviceKind};
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

/// The device under test: the GPU on a machine that has one (`SCALPEL_EXPECT_GPU`, set by
/// scripts/gpu_check.sh), else the CUDA kernels on the emulator. One test body, every device.
fn accelerator() -> Device {
    if gpu_present() {
        device::cuda(0).expect("SCALPEL_EXPECT_GPU is set but CUDA is unusable")
    } else {
        device::emulator()
    }
}

/// Whether the probe `--device auto` uses finds a usable GPU (a run that sets
/// `SCALPEL_EXPECT_GPU` fails instead when it finds none).
fn gpu_present() -> bool {
    let ready = scalpel_cuda::probe().gpu_ready();
    assert!(
        ready || std::env::var_os("SCALPEL_EXPECT_GPU").is_none(),
        "SCALPEL_EXPECT_GPU is set but no usable GPU was found: {:?}",
        scalpel_cuda::probe().missing
    );
    ready
}

fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_host().unwrap(), b.to_host().unwrap());
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

/// Runs `f` over fresh parameters made from `inputs`, placed on `device`; returns the output and
/// the gradient of an MSE against a fixed target for every input, each checked to be on `device`.
fn run(
    device: &Device,
    inputs: &[Tensor],
    f: &dyn Fn(&[Var]) -> Result<Var>,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::parameter(device.place(t).unwrap()))
        .collect();
    let out = f(&vars).unwrap();
    // A loss is a host scalar (it is read back anyway); every other output stays on the device.
    if out.value().numel() > 1 {
        assert_eq!(out.value().device(), *device, "output left the device");
    }
    let target = Tensor::from_vec(
        out.shape(),
        (0..out.value().numel())
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<f32>>(),
    )
    .unwrap();
    let target = Var::constant(out.value().device().place(&target).unwrap());
    let loss = ops::mse_loss(&out, &target).unwrap();
    let grads = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| {
            grads.get(v).map(|g| {
                assert_eq!(g.device(), *device, "a gradient left the device");
                g.to_host().unwrap()
            })
        })
        .collect();
    (out.value().to_host().unwrap(), grads)
}

/// Places a constant (a mask) where the op's other inputs are: the first input's device.
fn like(v: &Var, t: &Tensor) -> Var {
    Var::constant(v.value().device().place(t).unwrap())
}

fn assert_same_on_emulator(op: &str, inputs: &[Tensor], f: &dyn Fn(&[Var]) -> Result<Var>) {
    let (cpu_out, cpu_grads) = run(&Device::Cpu, inputs, f);
    let (emu_out, emu_grads) = run(&accelerator(), inputs, f);
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
    assert_same_on_emulator("linear without bias", &[x.clone(), w.clone()], &|v| {
        ops::linear(&v[0], &v[1], None)
    });
    // On the device the GELU comes from the GEMM's epilogue, which also stores the
    // pre-activation its backward reads: the fused op's gradients against the CPU composition.
    let bias = random(&mut rng, &[7], 0.5);
    assert_same_on_emulator("linear_gelu", &[x.clone(), w, bias], &|v| {
        ops::linear_gelu(&v[0], &v[1], Some(&v[2]))
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
        ops::attention(&v[0], &v[1], &v[2], &like(&v[0], &m), h)
    });
    let gamma = random(&mut rng, &[d], 1.0);
    let beta = random(&mut rng, &[d], 1.0);
    assert_same_on_emulator("layernorm", &[x.clone(), gamma, beta], &|v| {
        ops::layernorm(&v[0], &v[1], &v[2], 1e-12)
    });
    // One device kernel adds and normalises; the sum it returns carries the residual's gradient.
    let residual = random(&mut rng, &[b, s, d], 1.0);
    let (gamma, beta) = (random(&mut rng, &[d], 1.0), random(&mut rng, &[d], 1.0));
    assert_same_on_emulator("add_layernorm", &[x.clone(), residual, gamma, beta], &|v| {
        ops::add_layernorm(v[0].clone(), &v[1], &v[2], &v[3], 1e-12)
    });
    assert_same_on_emulator("gelu", std::slice::from_ref(&x), &|v| ops::gelu(&v[0]));
    assert_same_on_emulator("dropout", std::slice::from_ref(&x), &|v| {
        ops::dropout(&v[0], 0.25, 0xfeed_beef_0123)
    });
    let y = random(&mut rng, &[b, s, d], 1.0);
    assert_same_on_emulator("add", &[x.clone(), y], &|v| ops::add(&v[0], &v[1]));
    assert_same_on_emulator("scale", std::slice::from_ref(&x), &|v| {
        ops::scale(&v[0], -0.7)
    });
    let table = random(&mut rng, &[11, d], 1.0);
    let ids = ops::Indices::new(vec![3, 0, 10, 3, 3, 7], &[2, 3]).unwrap();
    assert_same_on_emulator("embedding", std::slice::from_ref(&table), &|v| {
        ops::embedding(&v[0], &ids)
    });
    // A range made on the device (position ids) against the same range on the host.
    let positions = ops::Indices::repeating(&[3, 4], 4).unwrap();
    assert_eq!(positions.values(), [0, 1, 2, 3].repeat(3));
    assert_same_on_emulator("embedding of positions", &[table], &|v| {
        ops::embedding(&v[0], &positions)
    });
    let m = mask.clone();
    assert_same_on_emulator(
        "mean_pool + l2_normalize",
        std::slice::from_ref(&x),
        &move |v| ops::l2_normalize(&ops::mean_pool(&v[0], &like(&v[0], &m))?),
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
    let t = random(&mut rng, &[b * s, d], 1.0);
    assert_same_on_emulator(
        "cosine_loss (both sides)",
        &[random(&mut rng, &[b * s, d], 1.0), t],
        &|v| ops::reshape(&ops::cosine_loss(&v[0], &v[1])?, &[1]),
    );
}

#[test]
fn every_decoder_op_on_the_emulator_matches_the_cpu() {
    let mut rng = StdRng::seed_from_u64(8);
    let (b, s, width) = (2, 5, 3 * 16);
    let x = random(&mut rng, &[b, s, width], 1.0);
    let w = random(&mut rng, &[width], 1.0);
    assert_same_on_emulator("rmsnorm", &[x.clone(), w], &|v| {
        ops::rmsnorm(&v[0], &v[1], 1e-5)
    });
    // Positions continuing a cache of 300 tokens.
    let positions: Vec<usize> = (300..300 + s).collect();
    assert_same_on_emulator("rope", std::slice::from_ref(&x), &|v| {
        ops::rope(&v[0], 16, &positions, 1e5)
    });
    let up = random(&mut rng, &[b, s, width], 1.0);
    assert_same_on_emulator("swiglu", &[x.clone(), up], &|v| ops::swiglu(&v[0], &v[1]));
    // 6 query heads over 2 key/value heads, 4 cached positions before the 5 queries.
    let (heads, kv_heads, d, kv_len) = (6, 2, 8, s + 4);
    let (q, k, v) = (
        random(&mut rng, &[b, s, heads * d], 1.0),
        random(&mut rng, &[b, kv_len, kv_heads * d], 1.0),
        random(&mut rng, &[b, kv_len, kv_heads * d], 1.0),
    );
    assert_same_on_emulator("causal_attention", &[q, k, v], &|v| {
        ops::causal_attention(&v[0], &v[1], &v[2], heads, kv_heads)
    });
}

#[test]
fn rope_on_a_device_takes_consecutive_positions_only() {
    let x = accelerator()
        .place(&Tensor::zeros(&[1, 3, 8], DType::F32))
        .unwrap();
    let err = ops::rope(&Var::constant(x), 8, &[0, 2, 1], 1e4)
        .err()
        .expect("positions out of order on a device")
        .to_string();
    assert!(err.contains("consecutive positions"), "{err}");
}

#[test]
fn inference_linear_gelu_on_the_emulator_matches_the_cpu() {
    // Constants (inference): the device epilogue applies GELU without storing the pre-activation.
    let mut rng = StdRng::seed_from_u64(8);
    let inputs = [
        random(&mut rng, &[3, 5, 24], 1.0),
        random(&mut rng, &[9, 24], 0.5),
        random(&mut rng, &[9], 0.5),
    ];
    let out = |device: &Device| {
        let v: Vec<Var> = inputs
            .iter()
            .map(|t| Var::constant(device.place(t).unwrap()))
            .collect();
        let y = ops::linear_gelu(&v[0], &v[1], Some(&v[2])).unwrap();
        assert!(!y.requires_grad());
        y.value().to_host().unwrap()
    };
    let e = rel_error(&out(&Device::Cpu), &out(&accelerator()));
    assert!(e < 1e-5, "relative error {e:e}");
}

fn adam_run(device: &Device, p0: &[Tensor], g: &[Tensor], max_norm: f64) -> (Vec<Tensor>, f64) {
    (|| {
        let mut params = Params::default();
        for (i, p) in p0.iter().enumerate() {
            let name = if i == 0 {
                "w".to_string()
            } else {
                format!("x.bias{i}")
            };
            params.insert(name, Var::parameter(p.clone()));
        }
        params.to_device(device)?;
        let mut adam = Adam::new(AdamConfig::adamw(0.1), |n| !n.contains("bias"));
        let mut norm = 0.0;
        for step in 0..3 {
            // Gradients of `Σ gᵢ·pᵢ·(step+1)`, a loss linear in every parameter.
            let mut terms = Vec::new();
            for (i, (_, var)) in params.iter().enumerate() {
                let c = ops::linear(
                    &ops::reshape(var, &[1, var.value().numel()])?,
                    &Var::constant(device.place(&g[i].clone().reshape(&[1, g[i].numel()])?)?),
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
            params
                .iter()
                .map(|(_, v)| {
                    assert_eq!(v.value().device(), *device, "a parameter left the device");
                    v.value().to_host().unwrap()
                })
                .collect(),
            norm,
        ))
    })()
    .unwrap()
}

#[test]
fn adamw_and_clipping_on_the_emulator_match_the_cpu() {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [&[usize]; 3] = [&[5, 3], &[1000], &[7]];
    let p0: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, 1.0)).collect();
    let g: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, 1.0)).collect();
    for max_norm in [f64::INFINITY, 0.5] {
        let (cpu, cpu_norm) = adam_run(&Device::Cpu, &p0, &g, max_norm);
        let (emu, emu_norm) = adam_run(&accelerator(), &p0, &g, max_norm);
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
fn a_training_step_on_device_tensors_moves_only_ids_gradient_addresses_and_scalars() {
    let emu = accelerator();
    let mut rng = StdRng::seed_from_u64(3);
    let table = emu.place(&random(&mut rng, &[11, 16], 1.0)).unwrap();
    let w = emu.place(&random(&mut rng, &[16, 16], 0.5)).unwrap();
    let target = emu.place(&random(&mut rng, &[6, 16], 1.0)).unwrap();
    let mut params = Params::default();
    params.insert("table", Var::parameter(table));
    params.insert("w", Var::parameter(w));
    let mut adam = Adam::new(AdamConfig::adamw(0.01), |_| true);
    // The batch's ids go to the device once, before the step; the gather and the scatter-add
    // both read that copy.
    let ids = ops::Indices::new(vec![3, 0, 10, 3, 3, 7], &[6])
        .unwrap()
        .placed(&emu)
        .unwrap();
    let mut step = |params: &mut Params| {
        let before = emu.stats().unwrap();
        let x = ops::embedding(params.get("table").unwrap(), &ids).unwrap();
        let y = ops::gelu(&ops::linear(&x, params.get("w").unwrap(), None).unwrap()).unwrap();
        let loss = ops::mse_loss(&y, &Var::constant(target.clone())).unwrap();
        let mut grads = loss.backward().unwrap();
        drop((loss, x, y));
        clip_grad_norm(&mut grads, params, 1.0).unwrap();
        adam.step(params, &grads, 0.01).unwrap();
        emu.stats().unwrap().since(&before)
    };
    step(&mut params); // the first step allocates the moments and warms the allocator
    for _ in 2..=4 {
        let stats = step(&mut params);
        // Up goes only the optimiser's table of this step's gradients (8 bytes a parameter: the
        // one launch updating both reads their addresses); the loss and the gradient norm come
        // back.
        assert_eq!(stats.h2d_bytes, 2 * 8, "{stats:?}");
        assert_eq!(stats.d2h_bytes, 2 * 4, "{stats:?}");
        assert_eq!(stats.driver_allocs, 0, "{stats:?}");
        assert!(stats.launches > 10, "{stats:?}");
    }
}

#[test]
fn mixing_devices_in_one_op_names_both() {
    let x = Tensor::from_vec(&[2, 3], vec![0.1f32, -0.2, 0.3, 0.4, -0.5, 0.6]).unwrap();
    let on_emu = Var::constant(device::emulator().place(&x).unwrap());
    let err = ops::add(&on_emu, &Var::constant(x.clone()))
        .err()
        .expect("mixed devices must fail")
        .to_string();
    assert!(
        err.contains("emu (CPU emulator)") && err.contains("cpu"),
        "{err}"
    );
    // Two runtimes are two devices (on a GPU machine: the GPU and the emulator).
    let other = Var::constant(accelerator().place(&x).unwrap());
    let err = ops::add(&on_emu, &other)
        .err()
        .expect("two runtimes")
        .to_string();
    assert!(err.contains("two devices"), "{err}");
    // The decoder ops dispatch the same way.
    let w = Tensor::from_vec(&[3], vec![1.0f32, 0.5, 2.0]).unwrap();
    let err = ops::rmsnorm(&on_emu, &Var::constant(w), 1e-5)
        .err()
        .expect("mixed devices must fail")
        .to_string();
    assert!(
        err.contains("rmsnorm") && err.contains("emu (CPU emulator)") && err.contains("cpu"),
        "{err}"
    );
    // Host access to a device tensor is an error naming the device, not a panic.
    let err = on_emu.value().values::<f32>().unwrap_err().to_string();
    assert!(err.contains("on emu (CPU emulator)"), "{err}");
}

#[test]
fn f64_tensors_stay_on_the_host() {
    // The kernels are f32: the f64 gradient checks keep their exact CPU path, and a device
    // refuses f64 by name rather than rounding it.
    let x = Tensor::from_vec(&[2, 3], vec![0.1f64, -0.2, 0.3, 0.4, -0.5, 0.6]).unwrap();
    let err = device::emulator().place(&x).unwrap_err().to_string();
    assert!(err.contains("F64"), "{err}");
    let y = ops::gelu(&Var::constant(x.clone())).unwrap();
    assert_eq!(y.value().dtype(), DType::F64);
    assert!(y.value().is_host());
}

#[test]
fn device_selection() {
    assert_eq!("auto".parse::<DeviceKind>().unwrap(), DeviceKind::Auto);
    assert_eq!("CPU".parse::<DeviceKind>().unwrap(), DeviceKind::Cpu);
    assert_eq!("emu".parse::<DeviceKind>().unwrap(), DeviceKind::Emu);
    assert_eq!("cuda".parse::<DeviceKind>().unwrap(), DeviceKind::Cuda);
    assert!("tpu".parse::<DeviceKind>().unwrap_err().contains("tpu"));

    let (d, why) = device::resolve(DeviceKind::Emu).unwrap();
    assert_eq!((d.name().as_str(), why), ("emu (CPU emulator)", None));
    assert!(device::resolve(DeviceKind::Cpu).unwrap().0.is_cpu());

    if gpu_present() {
        assert!(device::resolve(DeviceKind::Cuda).is_ok());
        return;
    }
    let err = device::resolve(DeviceKind::Cuda).unwrap_err().to_string();
    assert!(err.contains("CUDA driver library (libcuda.so)"), "{err}");
    let (d, why) = device::resolve(DeviceKind::Auto).unwrap();
    assert!(d.is_cpu());
    assert!(why.unwrap().starts_with("no CUDA: "));
}
