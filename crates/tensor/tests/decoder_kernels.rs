//! The decoder kernels' fast `f32` paths (RMSNorm, SwiGLU, causal grouped-query attention)
//! against their scalar references run in `f64`, on every ISA and with 1 and 3 threads, at ragged
//! sizes (as `kernels.rs` does for the encoder's).

use rand::rngs::StdRng;
use rand::SeedableRng;
use scalpel_tensor::cpu::causal_attention::{self as attn, CausalAttentionShape};
use scalpel_tensor::cpu::rmsnorm::{self, RmsNormShape};
use scalpel_tensor::cpu::swiglu;

use crate::kernels::{assert_close, for_each_config, uniform, widen};

const EPS: f64 = f32::EPSILON as f64;

#[test]
fn rmsnorm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    // 576 is SmolLM2's width; 37 leaves a partial vector; 700 rows split over threads.
    for (rows, cols) in [(3, 37), (700, 576), (1, 5)] {
        let s = RmsNormShape {
            rows,
            cols,
            eps: 1e-5,
        };
        let (x, w) = (
            uniform(&mut rng, rows * cols, -3.0, 3.0),
            uniform(&mut rng, cols, -2.0, 2.0),
        );
        let (mut y64, mut rstd64) = (vec![0.0f64; rows * cols], vec![0.0f64; rows]);
        rmsnorm::rmsnorm_forward_reference(&s, &widen(&x), &widen(&w), &mut y64, &mut rstd64);
        for_each_config(|isa, ctx| {
            let (mut y, mut rstd) = (vec![0.0f32; rows * cols], vec![0.0f32; rows]);
            rmsnorm::rmsnorm_forward_with_isa(isa, &s, &x, &w, &mut y, &mut rstd);
            let what = format!("rmsnorm {s:?} ({ctx})");
            assert_close(&format!("{what} rstd"), &rstd, &rstd64, |i| {
                4.0 * cols as f64 * EPS * rstd64[i]
            });
            assert_close(&format!("{what} y"), &y, &y64, |i| {
                (4.0 + cols as f64) * EPS * (y64[i].abs() + 1e-3)
            });
        });
    }
}

#[test]
fn swiglu_matches_reference() {
    let mut rng = StdRng::seed_from_u64(22);
    for n in [1, 17, 40_000] {
        let (gate, up) = (
            uniform(&mut rng, n, -20.0, 20.0),
            uniform(&mut rng, n, -2.0, 2.0),
        );
        let mut y64 = vec![0.0f64; n];
        swiglu::swiglu_forward_reference(&widen(&gate), &widen(&up), &mut y64);
        for_each_config(|isa, ctx| {
            let mut y = vec![0.0f32; n];
            swiglu::swiglu_forward_with_isa(isa, &gate, &up, &mut y);
            assert_close(&format!("swiglu {n} ({ctx})"), &y, &y64, |i| {
                8.0 * EPS * y64[i].abs() + 1e-30
            });
        });
    }
}

#[test]
fn causal_attention_matches_reference() {
    let mut rng = StdRng::seed_from_u64(23);
    let shapes = [
        // SmolLM2's heads, prefill crossing the 64-row query block.
        (1, 70, 70, 9, 3, 64),
        // A decoding step: one query against a cache of 30.
        (1, 1, 31, 9, 3, 64),
        // Two sequences, a few new rows against a cache, ragged head size.
        (2, 3, 10, 4, 2, 5),
    ];
    for (batch, q_len, kv_len, heads, kv_heads, head_dim) in shapes {
        let s = CausalAttentionShape {
            batch,
            q_len,
            kv_len,
            heads,
            kv_heads,
            head_dim,
        };
        let (qn, kvn) = (
            batch * q_len * heads * head_dim,
            batch * kv_len * kv_heads * head_dim,
        );
        let q = uniform(&mut rng, qn, -1.0, 1.0);
        let k = uniform(&mut rng, kvn, -1.0, 1.0);
        let v = uniform(&mut rng, kvn, -1.0, 1.0);
        let dout = uniform(&mut rng, qn, -1.0, 1.0);
        let [q64, k64, v64, dout64] = [&q, &k, &v, &dout].map(|x| widen(x));
        let (mut out64, mut lse64) = (vec![0.0; qn], vec![0.0; batch * heads * q_len]);
        attn::causal_attention_forward_reference(&s, &q64, &k64, &v64, &mut out64, &mut lse64);
        let (mut dq64, mut dk64, mut dv64) = (vec![0.0; qn], vec![0.0; kvn], vec![0.0; kvn]);
        attn::causal_attention_backward_reference(
            &s, &q64, &k64, &v64, &out64, &lse64, &dout64, &mut dq64, &mut dk64, &mut dv64,
        );
        // Inputs in [-1, 1]: scores, outputs and gradients are sums of at most kv_len·head_dim
        // terms of magnitude ≲ 1.
        let tol = 16.0 * (kv_len * head_dim) as f64 * EPS;
        for_each_config(|isa, ctx| {
            let (mut out, mut lse) = (vec![0.0f32; qn], vec![0.0f32; lse64.len()]);
            attn::causal_attention_forward_with_isa(isa, &s, &q, &k, &v, &mut out, &mut lse);
            let what = format!("causal attention {s:?} ({ctx})");
            assert_close(&format!("{what} out"), &out, &out64, |_| tol);
            assert_close(&format!("{what} lse"), &lse, &lse64, |_| tol);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; qn], vec![0.0f32; kvn], vec![0.0f32; kvn]);
            attn::causal_attention_backward_with_isa(
                isa, &s, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv,
            );
            assert_close(&format!("{what} dq"), &dq, &dq64, |_| tol);
            assert_close(&format!("{what} dk"), &dk, &dk64, |_| tol);
            assert_close(&format!("{what} dv"), &dv, &dv64, |_| tol);
        });
    }
}
