//! Shared helpers of the workspace-level tests.

pub mod gguf_writer;

use std::path::PathBuf;

use scalpel::tensor::{safetensors, Tensor};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real all-MiniLM-L6-v2, fetched by `scripts/fetch_model.sh` (CI runs it before the tests).
/// A missing model is a failure with instructions, never a skip.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("SCALPEL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no model: run scripts/fetch_model.sh first",
        dir.display()
    );
    dir
}

/// The real SmolLM2-135M-Instruct GGUF, fetched by `scripts/fetch_smollm2.sh` (scripts/test.sh
/// runs it before the tests). A missing file is a failure with instructions, never a skip.
pub fn smollm2_gguf() -> PathBuf {
    let path = repo().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch_smollm2.sh first",
        path.display()
    );
    path
}

/// Asserts that an error `message` of case `case` names the file at `path` and says each of `needles`.
pub fn assert_error_says(case: &str, message: &str, path: &std::path::Path, needles: &[&str]) {
    assert!(
        message.contains(&path.display().to_string()),
        "{case}: `{message}` does not name the file"
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "{case}: `{message}` lacks `{needle}`"
        );
    }
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

pub fn load_fixture(rel: &str) -> std::collections::BTreeMap<String, Tensor> {
    safetensors::load(&fixture(rel))
        .unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
        .tensors
}

pub fn fixture_sentences() -> Vec<String> {
    std::fs::read_to_string(fixture("minilm/sentences.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A scratch directory unique to one test, under Cargo's target tmp dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
