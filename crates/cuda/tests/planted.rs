//! The emulator catches the bugs it exists to catch: each planted kernel (tests/kernels/planted.cu)
//! must fail its comparison or be reported, and its correct twin must pass.

use scalpel_cuda::check::{max_rel_error, Inputs, F32_TOLERANCE};
use scalpel_cuda::{CudaError, KernelArg, LaunchConfig, Runtime};
use scalpel_tensor::cpu::gemm::{gemm_reference, GemmShape};

/// Runs a 16 x 16-tile planted GEMM at a ragged size; returns its error against the reference.
fn planted_gemm_error(kernel: &str) -> f64 {
    let rt = Runtime::emulator();
    let s = GemmShape {
        m: 37,
        n: 29,
        k: 41,
        trans_a: false,
        trans_b: false,
    };
    let mut rng = Inputs::new(11);
    let (a, b) = (
        rng.uniform(s.m * s.k, -1.0, 1.0),
        rng.uniform(s.k * s.n, -1.0, 1.0),
    );
    let mut want = vec![0.0f64; s.m * s.n];
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    gemm_reference(s, &wide(&a), &wide(&b), &mut want, 0.0);
    let (da, db, dc) = (
        rt.upload(&a).unwrap(),
        rt.upload(&b).unwrap(),
        rt.zeros::<f32>(s.m * s.n).unwrap(),
    );
    let config = LaunchConfig {
        grid: [s.n.div_ceil(16) as u32, s.m.div_ceil(16) as u32, 1],
        block: [16, 16, 1],
        shared_bytes: 0,
    };
    let args = [
        KernelArg::I32(37),
        KernelArg::I32(29),
        KernelArg::I32(41),
        da.arg(),
        db.arg(),
        dc.arg(),
        KernelArg::F32(0.0),
    ];
    // SAFETY: the planted GEMMs take (m, n, k, a, b, c, beta); buffers sized for them.
    unsafe { rt.launch(kernel, config, &args) }.unwrap();
    max_rel_error(&dc.to_host().unwrap(), &want)
}

#[test]
fn correct_planted_twin_passes() {
    let e = planted_gemm_error("planted_gemm_correct");
    assert!(e <= F32_TOLERANCE, "the bug-free tile GEMM fails: {e}");
}

#[test]
fn missing_syncthreads_fails_comparison() {
    let e = planted_gemm_error("planted_gemm_missing_sync");
    assert!(
        e.is_nan() || e > F32_TOLERANCE,
        "a GEMM missing __syncthreads passed with error {e}"
    );
}

#[test]
fn off_by_one_tile_bound_fails_comparison() {
    let e = planted_gemm_error("planted_gemm_off_by_one");
    assert!(
        e.is_nan() || e > F32_TOLERANCE,
        "a GEMM with an off-by-one tile bound passed with error {e}"
    );
}

fn launch_reported(kernel: &str, threads: u32) -> String {
    let rt = Runtime::emulator();
    let out = rt.zeros::<f32>(threads as usize).unwrap();
    // SAFETY: these kernels take one float* with one element per thread.
    match unsafe { rt.launch(kernel, LaunchConfig::linear(2, threads), &[out.arg()]) } {
        Err(CudaError::Emulator(message)) => message,
        other => panic!("{kernel}: expected the emulator to report a fault, got {other:?}"),
    }
}

#[test]
fn divergent_barrier_is_reported_with_both_sites() {
    let message = launch_reported("planted_divergent_barrier", 64);
    assert!(message.contains("divergent __syncthreads"), "{message}");
    assert!(
        message.matches("planted.cu:").count() == 2,
        "both barrier sites named: {message}"
    );
}

#[test]
fn deadlock_is_reported_not_hung() {
    let message = launch_reported("planted_deadlock", 32);
    assert!(message.contains("deadlock"), "{message}");
}

#[test]
fn partial_mask_shuffle_is_reported() {
    let message = launch_reported("planted_partial_mask_shuffle", 32);
    assert!(message.contains("mask"), "{message}");
}

#[test]
fn correct_collectives_with_exited_threads_pass() {
    let rt = Runtime::emulator();
    let out = rt.upload(&vec![f32::NAN; 128]).unwrap();
    // SAFETY: planted_collectives_ok(int live, float* out), out has one element per thread.
    unsafe {
        rt.launch(
            "planted_collectives_ok",
            LaunchConfig::linear(3, 128),
            &[KernelArg::I32(64), out.arg()],
        )
    }
    .unwrap();
    let got = out.to_host().unwrap();
    assert!(got[..64].iter().all(|&v| v == 496.0), "{:?}", &got[..64]);
    assert!(got[64..].iter().all(|v| v.is_nan()), "exited threads wrote");
}

#[test]
fn warp_votes_follow_cuda() {
    let rt = Runtime::emulator();
    let out = rt.zeros::<u32>(4 * 64).unwrap();
    // SAFETY: planted_votes_ok(unsigned* out), four entries per thread.
    unsafe {
        rt.launch(
            "planted_votes_ok",
            LaunchConfig::linear(1, 64),
            &[out.arg()],
        )
    }
    .unwrap();
    for votes in out.to_host().unwrap().chunks(4) {
        assert_eq!(votes, [0x4924_9249, 1, 1, 0]);
    }
}

#[test]
fn unknown_kernel_is_an_error() {
    let rt = Runtime::emulator();
    // SAFETY: nothing runs.
    let r = unsafe { rt.launch("no_such_kernel", LaunchConfig::linear(1, 32), &[]) };
    assert!(matches!(r, Err(CudaError::UnknownKernel(_))), "{r:?}");
}
