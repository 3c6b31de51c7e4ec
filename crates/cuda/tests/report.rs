//! The `scalpel kernels` report covers every kernel and serialises. This is also the one run of
//! every standard emulator check (`check::all`): tests/emulator_kernels.rs holds only the cases
//! beyond it.

use scalpel_cuda::kernel_files;
use scalpel_cuda::report::kernels_report;

#[test]
fn report_lists_every_kernel_with_emulator_errors() {
    let report = kernels_report();
    let expected: usize = kernel_files().iter().map(|f| f.kernels.len()).sum();
    assert_eq!(report.kernels.len(), expected);
    for k in &report.kernels {
        assert!(
            k.emulator_max_rel_error.is_some(),
            "{} has no emulator check",
            k.kernel
        );
    }
    eprintln!("{}", report.to_table());
    assert!(report.all_pass(), "{}", report.to_table());
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["kernels"][0]["kernel"].is_string());
}
