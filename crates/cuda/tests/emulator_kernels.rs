//! Every kernel on the CPU emulator against the CPU backend: one test per kernel file (family)
//! running that family's standard checks (`check::all`, the same checks and sizes as the
//! `scalpel kernels` report: ragged sizes that are not multiples of any tile or block, forward
//! and backward), each test also requiring a check for every kernel its file defines; then the
//! checks beyond the standard set.

use scalpel_cuda::check::{self, KernelCheck};
use scalpel_cuda::kernels::{self, attention, elementwise, gemm, layernorm, softmax};
use scalpel_cuda::{kernel_files, Runtime};
use scalpel_tensor::cpu::attention::AttentionShape;
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

/// Runs the standard checks of `kernels/{file}` and requires one for each of its kernels.
fn family_passes(file: &str) {
    let checks = check::all(&Runtime::emulator(), &|f| f == file).unwrap();
    let defined = kernel_files()
        .iter()
        .find(|f| f.file == file)
        .unwrap_or_else(|| panic!("no kernels/{file}"))
        .kernels;
    for kernel in defined {
        assert!(
            checks.iter().any(|c| c.kernel == *kernel),
            "{kernel} of kernels/{file} has no emulator check"
        );
    }
    assert_pass(&checks);
}

/// The kernel files the tests below cover, one test each.
const FAMILIES: [&str; 14] = [
    "adamw.cu",
    "attention.cu",
    "dropout.cu",
    "elementwise.cu",
    "embedding.cu",
    "gelu.cu",
    "gemm.cu",
    "layernorm.cu",
    "pooling.cu",
    "reduce.cu",
    "rmsnorm.cu",
    "rope.cu",
    "softmax.cu",
    "swiglu.cu",
];

#[test]
fn every_kernel_file_has_a_family_test() {
    let mut files: Vec<&str> = kernel_files().iter().map(|f| f.file).collect();
    files.sort_unstable();
    assert_eq!(
        files, FAMILIES,
        "add a test below for each new kernels/*.cu"
    );
    let registered: Vec<&str> = kernels::FAMILIES.iter().map(|(file, _)| *file).collect();
    assert_eq!(
        registered, FAMILIES,
        "add each new kernels/*.cu to scalpel_cuda::kernels::FAMILIES"
    );
}

#[test]
fn adamw_family() {
    family_passes("adamw.cu");
}

#[test]
fn attention_family() {
    family_passes("attention.cu");
}

#[test]
fn dropout_family() {
    family_passes("dropout.cu");
}

#[test]
fn elementwise_family() {
    family_passes("elementwise.cu");
}

#[test]
fn embedding_family() {
    family_passes("embedding.cu");
}

#[test]
fn gelu_family() {
    family_passes("gelu.cu");
}

#[test]
fn gemm_family() {
    family_passes("gemm.cu");
}

#[test]
fn layernorm_family() {
    family_passes("layernorm.cu");
}

#[test]
fn pooling_family() {
    family_passes("pooling.cu");
}

#[test]
fn reduce_family() {
    family_passes("reduce.cu");
}

#[test]
fn rmsnorm_family() {
    family_passes("rmsnorm.cu");
}

#[test]
fn rope_family() {
    family_passes("rope.cu");
}

#[test]
fn softmax_family() {
    family_passes("softmax.cu");
}

#[test]
fn swiglu_family() {
    family_passes("swiglu.cu");
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
        .zip([false, true, true])
        .flat_map(|(s, gelu)| {
            gemm::check_f32(
                &rt,
                gemm::GemmCase {
                    s,
                    beta: 1.0,
                    bias: true,
                    gelu,
                },
            )
            .unwrap()
        })
        .collect();
    assert_pass(&checks);
}

#[test]
fn layernorm_rows_narrower_than_a_warp() {
    // A row narrower than a warp leaves lanes idle.
    assert_pass(&layernorm::check_layernorm(&Runtime::emulator(), 3, 7).unwrap());
}

#[test]
fn softmax_rows_narrower_than_a_warp() {
    assert_pass(&softmax::check_softmax(&Runtime::emulator(), 9, 5).unwrap());
}

#[test]
fn shape_mismatch_is_an_error_not_a_launch() {
    let rt = Runtime::emulator();
    let (a, b) = (rt.zeros::<f32>(6).unwrap(), rt.zeros::<f32>(5).unwrap());
    let mut out = rt.zeros::<f32>(6).unwrap();
    assert!(elementwise::add(&rt, &a, &b, &mut out).is_err());
}

#[test]
fn attention_wide_heads_use_larger_lane_groups() {
    let rt = Runtime::emulator();
    // head_dim 64 takes 4 lanes per row, 10 one lane (zero-padded to 16).
    for (seq, head_dim) in [(33, 64), (20, 10)] {
        let s = AttentionShape {
            batch: 2,
            seq,
            heads: 2,
            head_dim,
        };
        for causal in [false, true] {
            assert_pass(&attention::check_attention(&rt, s, causal).unwrap());
        }
    }
}

#[test]
fn attention_rejects_head_dim_over_64() {
    let rt = Runtime::emulator();
    let s = AttentionShape {
        batch: 1,
        seq: 2,
        heads: 1,
        head_dim: 65,
    };
    let x = rt.zeros::<f32>(2 * 65).unwrap();
    let mask = rt.zeros::<f32>(2).unwrap();
    let (mut out, mut lse) = (
        rt.zeros::<f32>(2 * 65).unwrap(),
        rt.zeros::<f32>(2).unwrap(),
    );
    let r = attention::attention_forward(&rt, &s, &x, &x, &x, &mask, false, &mut out, &mut lse);
    assert!(r.is_err());
}
