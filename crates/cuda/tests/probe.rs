//! On a machine without a GPU (this one, CI) the probe reports what is missing and never panics.

use scalpel_cuda::{probe, Runtime};

#[test]
fn probe_reports_no_gpu_without_panicking() {
    let p = probe();
    if std::env::var_os("SCALPEL_EXPECT_GPU").is_some() {
        assert!(p.gpu_ready(), "{:?}", p.missing);
        return;
    }
    assert!(!p.gpu_ready(), "found a GPU: {:?}", p.gpu);
    assert!(!p.missing.is_empty(), "nothing reported missing");
    assert!(
        p.missing.iter().any(|m| m.contains("libcuda")),
        "{:?}",
        p.missing
    );
    assert!(Runtime::cuda(0).is_err());
    assert_eq!(Runtime::best_available().name(), "CPU emulator");
    serde_json::to_string(&p).unwrap();
}
