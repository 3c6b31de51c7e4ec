//! The fused ops, forward and backward, against PyTorch float64 references
//! (`tests/fixtures/ops/`, see its README), once in f64 and once in f32 (the SIMD kernels).
//!
//! Each fixture holds a random upstream gradient `dout`; it enters the backward through the
//! scalar `sum(out ∘ dout)` (or `dout·loss` for scalar losses), whose gradient w.r.t. `out` is
//! exactly `dout`.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel_autograd::{ops, Result, Var};
use scalpel_tensor::{ops as tops, safetensors, DType, Tensor};

/// `|actual − expected| <= atol + rtol·|expected|`, elementwise.
#[derive(Clone, Copy)]
struct Tolerance {
    atol: f64,
    rtol: f64,
}

/// Forward and gradient tolerances per compute dtype. f64 only differs from PyTorch by
/// summation order; f32 rounds every input and intermediate to 24 bits.
fn tolerances(dtype: DType) -> (Tolerance, Tolerance) {
    match dtype {
        DType::F64 => (
            Tolerance {
                atol: 1e-10,
                rtol: 0.0,
            },
            Tolerance {
                atol: 1e-9,
                rtol: 0.0,
            },
        ),
        DType::F32 => (
            Tolerance {
                atol: 1e-5,
                rtol: 1e-4,
            },
            Tolerance {
                atol: 1e-4,
                rtol: 1e-4,
            },
        ),
        other => panic!("no tolerance for {other:?}"),
    }
}

/// One fixture file, with its float inputs converted to the dtype under test.
pub(crate) struct Fixture {
    name: &'static str,
    tensors: BTreeMap<String, Tensor>,
    dtype: DType,
    forward: Tolerance,
    grad: Tolerance,
}

impl Fixture {
    pub(crate) fn load(name: &'static str, dtype: DType) -> Fixture {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/ops")
            .join(name);
        let tensors = safetensors::load(&path).unwrap().tensors;
        let (forward, grad) = tolerances(dtype);
        Fixture {
            name,
            tensors,
            dtype,
            forward,
            grad,
        }
    }

    pub(crate) fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor `{key}`", self.name))
    }

    /// An input in the dtype under test.
    pub(crate) fn input(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(self.dtype)
    }

    pub(crate) fn scalar(&self, key: &str) -> f64 {
        self.get(key).to_vec::<f64>()[0]
    }

    fn assert_close(&self, what: &str, actual: &Tensor, tol: Tolerance) {
        let expected = self.get(what);
        let label = format!("{} {what} ({:?})", self.name, self.dtype);
        assert_eq!(actual.dtype(), self.dtype, "{label}: wrong dtype");
        assert_eq!(actual.shape(), expected.shape(), "{label}: wrong shape");
        let actual = actual.to_vec::<f64>();
        let expected = expected.to_vec::<f64>();
        // Written so that a NaN counts as a failure.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let failures: Vec<usize> = (0..actual.len())
            .filter(|&i| {
                !((actual[i] - expected[i]).abs() <= tol.atol + tol.rtol * expected[i].abs())
            })
            .collect();
        if let Some(&i) = failures.first() {
            panic!(
                "{label}: {} of {} elements beyond atol {:e} + rtol {:e}; first: element {i} is {} against {}",
                failures.len(),
                actual.len(),
                tol.atol,
                tol.rtol,
                actual[i],
                expected[i]
            );
        }
    }

    pub(crate) fn assert_forward(&self, what: &str, actual: &Tensor) {
        self.assert_close(what, actual, self.forward);
    }

    pub(crate) fn assert_grad(&self, what: &str, actual: Option<&Tensor>) {
        let actual = actual.unwrap_or_else(|| panic!("{}: no gradient for `{what}`", self.name));
        self.assert_close(what, actual, self.grad);
    }
}

/// `sum(out ∘ dout)` as a `[1, 1]` variable, so the backward of `out` starts from `dout`.
pub(crate) fn inject(out: &Var, dout: &Tensor) -> Result<Var> {
    let n = out.value().numel();
    let flat = ops::reshape(out, &[1, n])?;
    ops::linear(&flat, &Var::constant(dout.clone().reshape(&[1, n])?), None)
}

fn attention(dtype: DType) {
    let f = Fixture::load("attention.safetensors", dtype);
    let [q, k, v] = ["q", "k", "v"].map(|key| Var::parameter(f.input(key)));
    let mask = Var::constant(f.input("mask"));
    let heads = 3;

    let (out, lse) = tops::attention(q.value(), k.value(), v.value(), mask.value(), heads).unwrap();
    f.assert_forward("out", &out);
    f.assert_forward("lse", &lse);

    let out = ops::attention(&q, &k, &v, &mask, heads).unwrap();
    f.assert_forward("out", out.value());
    let grads = inject(&out, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dq", grads.get(&q));
    f.assert_grad("dk", grads.get(&k));
    f.assert_grad("dv", grads.get(&v));
}

fn layernorm(file: &'static str, dtype: DType) {
    let f = Fixture::load(file, dtype);
    let [x, gamma, beta] = ["x", "gamma", "beta"].map(|key| Var::parameter(f.input(key)));
    let y = ops::layernorm(&x, &gamma, &beta, f.scalar("eps")).unwrap();
    f.assert_forward("y", y.value());
    let grads = inject(&y, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dx", grads.get(&x));
    f.assert_grad("dgamma", grads.get(&gamma));
    f.assert_grad("dbeta", grads.get(&beta));
}

fn gelu(dtype: DType) {
    let f = Fixture::load("gelu.safetensors", dtype);
    let x = Var::parameter(f.input("x"));
    let y = ops::gelu(&x).unwrap();
    f.assert_forward("y", y.value());
    let grads = inject(&y, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dx", grads.get(&x));

    // The consuming variant: on a parameter it records the same op (same gradient); on an
    // unshared constant it overwrites the input's storage.
    let y = ops::gelu_in_place(x.clone()).unwrap();
    f.assert_forward("y", y.value());
    let grads = inject(&y, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dx", grads.get(&x));
    // Storage of its own: a tensor mapped from (or sharing) the fixture's is copied on its first
    // write.
    let input = f.input("x");
    let shape = input.shape().to_vec();
    let constant = Var::constant(Tensor::from_data(&shape, input.into_data().unwrap()).unwrap());
    let address = |v: &Var| match dtype {
        DType::F32 => v.value().values::<f32>().unwrap().as_ptr() as usize,
        _ => v.value().values::<f64>().unwrap().as_ptr() as usize,
    };
    let before = address(&constant);
    let y = ops::gelu_in_place(constant).unwrap();
    assert_eq!(
        address(&y),
        before,
        "gelu_in_place copied an unshared constant"
    );
    f.assert_forward("y", y.value());
}

fn cross_entropy(dtype: DType) {
    let f = Fixture::load("cross_entropy.safetensors", dtype);
    let logits = Var::parameter(f.input("logits"));
    let targets: Vec<usize> = f
        .get("targets")
        .to_vec::<i64>()
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let loss = ops::cross_entropy(&logits, &targets).unwrap();
    f.assert_forward("loss", loss.value());
    let grads = ops::scale(&loss, f.scalar("dout"))
        .unwrap()
        .backward()
        .unwrap();
    f.assert_grad("dlogits", grads.get(&logits));
}

fn pool_normalize(dtype: DType) {
    let f = Fixture::load("pool_normalize.safetensors", dtype);
    let x = Var::parameter(f.input("x"));
    let mask = Var::constant(f.input("mask"));
    let pooled = ops::mean_pool(&x, &mask).unwrap();
    f.assert_forward("pooled", pooled.value());
    let out = ops::l2_normalize(&pooled).unwrap();
    f.assert_forward("out", out.value());
    let grads = inject(&out, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dx", grads.get(&x));
}

/// `mse.safetensors` and `cosine.safetensors` share their layout: `loss(s, t)` with `t` constant.
fn pair_loss(file: &'static str, loss_fn: fn(&Var, &Var) -> Result<Var>, dtype: DType) {
    let f = Fixture::load(file, dtype);
    let s = Var::parameter(f.input("s"));
    let t = Var::constant(f.input("t"));
    let loss = loss_fn(&s, &t).unwrap();
    f.assert_forward("loss", loss.value());
    let grads = ops::scale(&loss, f.scalar("dout"))
        .unwrap()
        .backward()
        .unwrap();
    f.assert_grad("ds", grads.get(&s));
    assert!(
        grads.get(&t).is_none(),
        "{file}: the constant target received a gradient"
    );
}

#[test]
fn attention_f64() {
    attention(DType::F64);
}

#[test]
fn attention_f32() {
    attention(DType::F32);
}

#[test]
fn layernorm_eps_1e12_f64() {
    layernorm("layernorm_eps1e-12.safetensors", DType::F64);
}

#[test]
fn layernorm_eps_1e12_f32() {
    layernorm("layernorm_eps1e-12.safetensors", DType::F32);
}

#[test]
fn layernorm_eps_1e5_f64() {
    layernorm("layernorm_eps1e-05.safetensors", DType::F64);
}

#[test]
fn layernorm_eps_1e5_f32() {
    layernorm("layernorm_eps1e-05.safetensors", DType::F32);
}

#[test]
fn gelu_f64() {
    gelu(DType::F64);
}

#[test]
fn gelu_f32() {
    gelu(DType::F32);
}

#[test]
fn cross_entropy_f64() {
    cross_entropy(DType::F64);
}

#[test]
fn cross_entropy_f32() {
    cross_entropy(DType::F32);
}

#[test]
fn pool_normalize_f64() {
    pool_normalize(DType::F64);
}

#[test]
fn pool_normalize_f32() {
    pool_normalize(DType::F32);
}

#[test]
fn mse_f64() {
    pair_loss("mse.safetensors", ops::mse_loss, DType::F64);
}

#[test]
fn mse_f32() {
    pair_loss("mse.safetensors", ops::mse_loss, DType::F32);
}

/// `distill_kl` at the fixture's temperature (2, in its metadata) as a pair loss of logits.
fn distill_t2(s: &Var, t: &Var) -> Result<Var> {
    ops::distill_kl(s, t.value(), 2.0)
}

#[test]
fn distill_kl_f64() {
    pair_loss("distill_kl_t2.safetensors", distill_t2, DType::F64);
}

#[test]
fn distill_kl_f32() {
    pair_loss("distill_kl_t2.safetensors", distill_t2, DType::F32);
}

#[test]
fn cosine_f64() {
    pair_loss("cosine.safetensors", ops::cosine_loss, DType::F64);
}

#[test]
fn cosine_f32() {
    pair_loss("cosine.safetensors", ops::cosine_loss, DType::F32);
}
