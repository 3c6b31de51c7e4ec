//! The decoder (Llama) ops — RMSNorm, RoPE, SwiGLU, causal grouped-query attention — against
//! f64 central finite differences and against PyTorch/transformers float64 references
//! (`tests/fixtures/llama/ops/`, from scripts/reference/make_llama_op_fixtures.py), the latter in
//! f64 and in f32 (the SIMD kernels).

use scalpel_autograd::{ops, Var};
use scalpel_tensor::{DType, Tensor};

use crate::gradcheck::{check, random};
use crate::torch_fixtures::{inject, Fixture};

#[test]
fn rmsnorm_gradients() {
    // 19 columns: not a whole number of SIMD lanes.
    let (x, w) = (random(&[3, 19], 2.0, 1), random(&[19], 1.5, 2));
    check("rmsnorm", &[x, w], &[3, 19], |v| {
        ops::rmsnorm(&v[0], &v[1], 1e-5)
    });
}

#[test]
fn rope_gradients() {
    let x = random(&[2, 4, 3 * 6], 1.0, 3);
    check("rope", &[x], &[2, 4, 18], |v| {
        ops::rope(&v[0], 6, &[5, 6, 7, 8], 1e4)
    });
}

#[test]
fn swiglu_gradients() {
    let (gate, up) = (random(&[4, 9], 6.0, 4), random(&[4, 9], 1.0, 5));
    check("swiglu", &[gate, up], &[4, 9], |v| {
        ops::swiglu(&v[0], &v[1])
    });
}

#[test]
fn causal_attention_gradients() {
    // (batch, q_len, kv_len, heads, kv_heads, head_dim): plain causal, grouped, and the last rows
    // of a longer sequence (a decoding step against a cache).
    let cases = [(2, 5, 5, 2, 2, 3), (1, 4, 4, 4, 2, 3), (2, 2, 6, 3, 1, 4)];
    for (i, (batch, q_len, kv_len, heads, kv_heads, d)) in cases.into_iter().enumerate() {
        let seed = 10 * i as u64;
        let q = random(&[batch, q_len, heads * d], 1.0, seed);
        let k = random(&[batch, kv_len, kv_heads * d], 1.0, seed + 1);
        let v = random(&[batch, kv_len, kv_heads * d], 1.0, seed + 2);
        check(
            &format!("causal attention {:?}", cases[i]),
            &[q, k, v],
            &[batch, q_len, heads * d],
            |v| ops::causal_attention(&v[0], &v[1], &v[2], heads, kv_heads),
        );
    }
}

fn fixture(name: &'static str, dtype: DType) -> Fixture {
    Fixture::load(name, dtype)
}

fn rmsnorm(dtype: DType) {
    let f = fixture("../llama/ops/rmsnorm.safetensors", dtype);
    let [x, w] = ["x", "w"].map(|key| Var::parameter(f.input(key)));
    let y = ops::rmsnorm(&x, &w, 1e-5).unwrap();
    f.assert_forward("y", y.value());
    let grads = inject(&y, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dx", grads.get(&x));
    f.assert_grad("dw", grads.get(&w));
}

fn rope(dtype: DType) {
    let f = fixture("../llama/ops/rope.safetensors", dtype);
    let x = Var::parameter(f.input("x"));
    let positions: Vec<usize> = f
        .get("positions")
        .to_vec::<i64>()
        .into_iter()
        .map(|p| p as usize)
        .collect();
    let y = ops::rope(&x, 8, &positions, 1e5).unwrap();
    f.assert_forward("y", y.value());
    let grads = inject(&y, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dx", grads.get(&x));
}

fn swiglu(dtype: DType) {
    let f = fixture("../llama/ops/swiglu.safetensors", dtype);
    let [gate, up] = ["gate", "up"].map(|key| Var::parameter(f.input(key)));
    let y = ops::swiglu(&gate, &up).unwrap();
    f.assert_forward("y", y.value());
    let grads = inject(&y, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dgate", grads.get(&gate));
    f.assert_grad("dup", grads.get(&up));
}

fn causal_attention(name: &'static str, heads: usize, kv_heads: usize, dtype: DType) {
    let f = fixture(name, dtype);
    let [q, k, v] = ["q", "k", "v"].map(|key| Var::parameter(f.input(key)));
    let (out, lse) = scalpel_tensor::decoder_ops::causal_attention(
        q.value(),
        k.value(),
        v.value(),
        heads,
        kv_heads,
    )
    .unwrap();
    f.assert_forward("out", &out);
    f.assert_forward("lse", &lse);
    let out = ops::causal_attention(&q, &k, &v, heads, kv_heads).unwrap();
    let grads = inject(&out, &f.input("dout")).unwrap().backward().unwrap();
    f.assert_grad("dq", grads.get(&q));
    f.assert_grad("dk", grads.get(&k));
    f.assert_grad("dv", grads.get(&v));
}

#[test]
fn rmsnorm_matches_torch() {
    rmsnorm(DType::F64);
    rmsnorm(DType::F32);
}

#[test]
fn rope_matches_transformers() {
    rope(DType::F64);
    rope(DType::F32);
}

#[test]
fn swiglu_matches_torch() {
    swiglu(DType::F64);
    swiglu(DType::F32);
}

#[test]
fn causal_attention_matches_torch() {
    for dtype in [DType::F64, DType::F32] {
        causal_attention(
            "../llama/ops/causal_attention_prefill.safetensors",
            6,
            2,
            dtype,
        );
        causal_attention(
            "../llama/ops/causal_attention_cached.safetensors",
            4,
            2,
            dtype,
        );
    }
}

#[test]
fn decoder_ops_refuse_bad_shapes() {
    let x = Var::constant(Tensor::zeros(&[1, 3, 12], DType::F32));
    let err = |r: scalpel_autograd::Result<Var>| r.err().expect("should fail").to_string();
    let w = Var::constant(Tensor::zeros(&[11], DType::F32));
    assert!(err(ops::rmsnorm(&x, &w, 1e-5)).contains("weight has shape [11], expected [12]"));
    assert!(err(ops::rope(&x, 5, &[0, 1, 2], 1e4)).contains("even head_dim 5"));
    assert!(err(ops::rope(&x, 4, &[0, 1], 1e4)).contains("2 positions"));
    let kv = Var::constant(Tensor::zeros(&[1, 2, 8], DType::F32));
    assert!(err(ops::causal_attention(&x, &kv, &kv, 3, 2))
        .contains("3 query heads cannot share 2 key/value heads"));
    assert!(err(ops::causal_attention(&x, &kv, &kv, 3, 1)).contains("at least the 3 positions"));
}
