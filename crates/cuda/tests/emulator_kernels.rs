//! Every kernel on the emulator against the CPU references (f64), forward and backward, at
//! ragged sizes that are not multiples of any tile or block.

use half::{bf16, f16};
use scalpel_cuda::check::{self, KernelCheck};
use scalpel_cuda::Runtime;
use scalpel_tensor::cpu::gemm::GemmShape;

fn assert_pass(checks: &[KernelCheck]) {
    for c in checks {
        assert!(
            c.passed(),
            "{} ({}): error {:e} over tolerance {:e}",
            c.kernel,
            c.case,
            c.max_rel_error,
            c.tolerance
        );
    }
}

#[test]
fn gemm_f32_every_transpose() {
    let rt = Runtime::emulator();
    let checks: Vec<_> = check::gemm_shapes()
        .into_iter()
        .map(|(s, beta)| check::gemm_f32(&rt, s, beta).unwrap())
        .collect();
    assert_pass(&checks);
}

#[test]
fn gemm_f32_degenerate_and_multi_tile_shapes() {
    let rt = Runtime::emulator();
    let shapes = [
        GemmShape {
            m: 1,
            n: 1,
            k: 1,
            trans_a: false,
            trans_b: false,
        },
        GemmShape {
            m: 130,
            n: 3,
            k: 100,
            trans_a: true,
            trans_b: false,
        },
        GemmShape {
            m: 5,
            n: 129,
            k: 33,
            trans_a: false,
            trans_b: true,
        },
    ];
    let checks: Vec<_> = shapes
        .into_iter()
        .map(|s| check::gemm_f32(&rt, s, 1.0).unwrap())
        .collect();
    assert_pass(&checks);
}

#[test]
fn gemm_tensor_core_f16_and_bf16() {
    let rt = Runtime::emulator();
    let mut checks = Vec::new();
    for (s, beta) in check::gemm_shapes() {
        checks.push(check::gemm_half::<f16>(&rt, s, beta).unwrap());
        checks.push(check::gemm_half::<bf16>(&rt, s, beta).unwrap());
    }
    assert_pass(&checks);
}

#[test]
fn casts_round_like_the_half_crate() {
    assert_pass(&check::casts(&Runtime::emulator(), 1031).unwrap());
}

#[test]
fn elementwise_and_bias() {
    assert_pass(&check::elementwise(&Runtime::emulator(), 37, 45).unwrap());
}

#[test]
fn gelu_forward_backward() {
    assert_pass(&check::gelu(&Runtime::emulator(), 1037).unwrap());
}

#[test]
fn layernorm_forward_backward_accumulating_params() {
    let rt = Runtime::emulator();
    assert_pass(&check::layernorm(&rt, 19, 77).unwrap());
    // A row narrower than a warp leaves lanes idle.
    assert_pass(&check::layernorm(&rt, 3, 7).unwrap());
}

#[test]
fn softmax_forward_backward() {
    let rt = Runtime::emulator();
    assert_pass(&check::softmax(&rt, 19, 133).unwrap());
    assert_pass(&check::softmax(&rt, 9, 5).unwrap());
}

#[test]
fn cross_entropy_forward_backward() {
    assert_pass(&check::cross_entropy(&Runtime::emulator(), 13, 150).unwrap());
}

#[test]
fn embedding_gather_and_scatter_add() {
    assert_pass(&check::embedding(&Runtime::emulator(), 23, 41, 37).unwrap());
}

#[test]
fn mean_pool_and_l2_normalize() {
    assert_pass(&check::pooling(&Runtime::emulator(), 5, 11, 45).unwrap());
}

#[test]
fn shape_mismatch_is_an_error_not_a_launch() {
    let rt = Runtime::emulator();
    let (a, b) = (rt.zeros::<f32>(6).unwrap(), rt.zeros::<f32>(5).unwrap());
    let mut out = rt.zeros::<f32>(6).unwrap();
    assert!(scalpel_cuda::ops::add(&rt, &a, &b, &mut out).is_err());
}
