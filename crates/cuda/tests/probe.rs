//! The probe on whatever machine runs the tests: with a GPU, that the runtime it reports really
//! runs a kernel correctly; without one, that it names what is missing, and never panics. A run
//! meant for a GPU machine sets `SCALPEL_EXPECT_GPU`, so that a GPU the probe cannot use is an
//! error rather than a silent fallback to the second case.

use scalpel_cuda::kernels::gelu;
use scalpel_cuda::{probe, Runtime};

#[test]
fn probe_matches_the_machine_and_names_what_is_missing() {
    let p = probe();
    serde_json::to_string(&p).unwrap();
    if std::env::var_os("SCALPEL_EXPECT_GPU").is_some() {
        assert!(p.gpu_ready(), "a GPU was expected: {:?}", p.missing);
    }
    if p.gpu_ready() {
        let rt = Runtime::cuda(0).expect("the probe found a GPU");
        assert!(!rt.is_emulator());
        assert_eq!(Some(rt.name()), p.gpu);
        assert!(!Runtime::best_available().is_emulator());
        for c in gelu::check_gelu(&rt, 1037).unwrap() {
            assert!(
                c.passed(),
                "{} on {}: {:e}",
                c.kernel,
                rt.name(),
                c.max_rel_error
            );
        }
        return;
    }
    // No GPU: each absent piece is named, in the order the probe needs them.
    let names = |needle: &str| p.missing.iter().any(|m| m.contains(needle));
    if !p.driver_library {
        assert!(names("libcuda"), "{:?}", p.missing);
    } else if p.nvrtc.is_none() {
        assert!(names("NVRTC") || names("nvrtc"), "{:?}", p.missing);
    } else {
        assert!(names("GPU: "), "{:?}", p.missing);
    }
    assert!(Runtime::cuda(0).is_err());
    assert_eq!(Runtime::best_available().name(), "CPU emulator");
}
