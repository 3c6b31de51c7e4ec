//! The `scalpel kernels` report: one row per kernel of the selected files, with the field names
//! the `--json` output promises. Every family's emulator checks run as tests of their own in
//! tests/emulator_kernels.rs (the same `check::all` the report calls), so here the report is
//! built for one small family only.

use scalpel_cuda::kernel_files;
use scalpel_cuda::report::kernels_report;

#[test]
fn report_rows_match_the_selected_files_and_serialise_as_documented() {
    let report = kernels_report(Some("gelu"));
    let expected: Vec<&str> = kernel_files()
        .iter()
        .filter(|f| f.file.contains("gelu"))
        .flat_map(|f| f.kernels.iter().copied())
        .collect();
    let names: Vec<&str> = report.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, expected);
    for k in &report.kernels {
        let err = k
            .emu_max_rel_err
            .expect("every kernel has an emulator check");
        assert!(err <= 1e-5, "{}: {err}", k.name);
        assert_eq!(k.file, "kernels/gelu.cu");
    }
    assert!(report.all_pass(), "{}", report.to_table());

    let json = serde_json::to_value(&report).unwrap();
    let row = &json["kernels"][0];
    for field in [
        "name",
        "file",
        "sm_80",
        "sm_90",
        "registers",
        "spill_bytes",
        "emu_max_rel_err",
        "pass",
    ] {
        assert!(row.get(field).is_some(), "missing {field} in {row}");
    }
}
