//! Layer scores and STS evaluation against the PyTorch / sentence-transformers / scipy reference
//! (tests/fixtures/surgery/scores.json, from scripts/reference/make_fixtures.py).

use crate::common;

use std::process::Command;

use common::*;
use scalpel::models::sentence::SentenceEncoder;
use scalpel::surgery::eval::spearman;
use scalpel::surgery::score::{score_layers, Calibration, Metric, ScoreOptions};

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("surgery/scores.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, ours: &[Option<f64>], theirs: &[f64], rel: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: layer count");
    for (layer, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let a = a.unwrap_or_else(|| panic!("{what}: layer {layer} has no score"));
        assert!(
            (a - b).abs() <= rel * b.abs(),
            "{what} layer {layer}: ours {a:.6e}, PyTorch {b:.6e}"
        );
    }
}

#[test]
fn layer_scores_match_pytorch() {
    let fx = reference();
    let sentences: Vec<String> = fixture_sentences().into_iter().take(40).collect();
    let pairs: Vec<(String, String)> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let data = Calibration { sentences, pairs };
    let mut encoder = SentenceEncoder::load(&minilm_dir()).unwrap();
    let opts = ScoreOptions {
        metrics: Metric::ENCODER.to_vec(),
        span: 1,
        batch_size: 8,
        target_layers: Some(4),
    };
    let report = score_layers(&mut encoder, &data, &opts).unwrap();
    let scores = &fx["scores"];
    let get = |m: Metric| &report.get(m).unwrap().per_layer;
    // Token-level cosines in f32 against f64: agreement to a few parts in 10⁴.
    assert_close(
        "block influence",
        get(Metric::BlockInfluence),
        &floats(&scores["block_influence"]),
        1e-3,
    );
    assert_close(
        "angular span 1",
        get(Metric::Angular),
        &floats(&scores["angular_span1"]),
        1e-3,
    );
    assert_close(
        "gradient norm",
        get(Metric::GradNorm),
        &floats(&scores["grad_norm"]),
        2e-3,
    );
    // A small difference of nearby embeddings: f32 rounding shows at the 1% level.
    assert_close(
        "drop-loss",
        get(Metric::DropLoss),
        &floats(&scores["drop_loss"]),
        1e-2,
    );

    // Each suggestion keeps 4 layers; the block influence one keeps the 4 highest.
    for m in &report.metrics {
        assert_eq!(m.keep.as_ref().unwrap().len(), 4, "{:?}", m.metric);
    }
    let bi = floats(&scores["block_influence"]);
    let kept = report
        .get(Metric::BlockInfluence)
        .unwrap()
        .keep
        .clone()
        .unwrap();
    let lowest_kept = kept.iter().map(|&l| bi[l]).fold(f64::INFINITY, f64::min);
    assert!((0..6)
        .filter(|l| !kept.contains(l))
        .all(|l| bi[l] <= lowest_kept));

    // Span 2 scores the pairs (l, l+2); the last layer has none.
    let span2 = score_layers(
        &mut encoder,
        &data,
        &ScoreOptions {
            metrics: vec![Metric::Angular],
            span: 2,
            batch_size: 8,
            target_layers: None,
        },
    )
    .unwrap();
    let per_layer = &span2.metrics[0].per_layer;
    assert_eq!(per_layer[5], None);
    assert_close(
        "angular span 2",
        &per_layer[..5],
        &floats(&scores["angular_span2"]),
        1e-3,
    );
}

#[test]
fn spearman_with_ties_matches_scipy() {
    let ties = &reference()["spearman_ties"];
    let ours = spearman(&floats(&ties["x"]), &floats(&ties["y"]));
    let scipy = ties["spearman"].as_f64().unwrap();
    assert!((ours - scipy).abs() < 1e-12, "ours {ours}, scipy {scipy}");
}

#[test]
fn eval_matches_sentence_transformers_on_sts2015() {
    let rel = "semeval-2015/images.test.tsv";
    let file = repo().join("../shared/data/sts").join(rel);
    assert!(
        file.exists(),
        "{} is missing: the STS data lives in ../shared",
        file.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["eval", "--model"])
        .arg(minilm_dir())
        .arg("--sts")
        .arg(&file)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = &reference()["evaluation"][rel];
    let ours = &report["files"][0];
    assert_eq!(ours["pairs"], expected["pairs"]);
    let (a, b) = (
        ours["spearman"].as_f64().unwrap(),
        expected["spearman"].as_f64().unwrap(),
    );
    // Cosines agree to ~1e-6, so at most a rare rank swap separates the two.
    assert!(
        (a - b).abs() < 0.02,
        "ours {a:.4}, sentence-transformers {b:.4}"
    );
    assert_eq!(report["mean_spearman"], ours["spearman"]);
}
