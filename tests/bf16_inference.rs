//! bf16 inference (`--dtype bf16`): the linear layers' weights held in bf16 and multiplied by
//! the bf16 GEMM (inputs rounded to bf16, f32 accumulation), against the f32 references of
//! sentence-transformers (tests/fixtures/minilm, tests/fixtures/surgery/scores.json).

use std::process::Command;

use crate::common;

use common::*;
use scalpel::tensor::cpu::gemm_bf16::Bf16Path;
use scalpel::tensor::DType;
use scalpel::Embedder;

/// Every fixture sentence (the truncated 256-token line included) within cosine 0.999 of
/// sentence-transformers' f32 embedding, and far enough from it that bf16 is what ran (f32
/// agrees to 0.99999 on every line).
#[test]
fn bf16_embeddings_match_sentence_transformers_within_cosine_0_999() {
    let embedder = Embedder::builder(minilm_dir())
        .dtype(DType::BF16)
        .build()
        .unwrap();
    assert_eq!(embedder.dtype(), DType::BF16);
    let sentences = fixture_sentences();
    let got = embedder.embed(&sentences).unwrap();
    let want = load_fixture("minilm/embeddings.safetensors")["embeddings"].to_vec::<f32>();
    let cosines: Vec<f64> = got
        .iter()
        .zip(want.chunks_exact(384))
        .map(|(a, b)| cosine(a, b))
        .collect();
    for (i, &cos) in cosines.iter().enumerate() {
        assert!(cos >= 0.999, "line {}: cosine {cos} < 0.999", i + 1);
    }
    let worst = cosines.iter().copied().fold(1.0, f64::min);
    assert!(
        worst < 0.99999,
        "worst cosine {worst}: as close as f32, so bf16 did not run ({:?})",
        Bf16Path::best()
    );
}

/// STS 2015 (all five files) evaluated in bf16 through `scalpel eval --dtype bf16`: each file's
/// Spearman within 0.3 points of sentence-transformers' f32 score (which the f32 path matches
/// within 0.02, tests/surgery_scores.rs).
#[test]
fn bf16_sts2015_spearman_within_0_3_of_f32() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("surgery/scores.json")).unwrap())
            .unwrap();
    let files = [
        "images",
        "answers-students",
        "headlines",
        "belief",
        "answers-forums",
    ];
    let sts = repo().join("../shared/data/sts/semeval-2015");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalpel"));
    cmd.args(["eval", "--dtype", "bf16", "--json", "--model"])
        .arg(minilm_dir())
        .arg("--sts");
    for f in &files {
        let path = sts.join(format!("{f}.test.tsv"));
        assert!(
            path.exists(),
            "{} is missing: the STS data lives in ../shared",
            path.display()
        );
        cmd.arg(path);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (i, f) in files.iter().enumerate() {
        let expected = &reference["evaluation"][format!("semeval-2015/{f}.test.tsv")];
        let ours = &report["files"][i];
        assert_eq!(ours["pairs"], expected["pairs"], "{f}");
        let (bf16, f32) = (
            ours["spearman"].as_f64().unwrap(),
            expected["spearman"].as_f64().unwrap(),
        );
        eprintln!("{f}: bf16 {bf16:.3}, f32 {f32:.3}, Δ {:+.3}", bf16 - f32);
        assert!(
            (bf16 - f32).abs() <= 0.3,
            "{f}: bf16 Spearman {bf16:.3}, f32 {f32:.3}"
        );
    }
}

/// `--dtype` takes f32 or bf16 and nothing else, naming the flag.
#[test]
fn dtype_flag_refuses_other_formats() {
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["bench", "forward", "--dtype", "f16", "--model"])
        .arg(minilm_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--dtype") && stderr.contains("f32 or bf16"),
        "{stderr}"
    );
}

/// `set_linear_dtype(BF16)` holds each encoder linear weight once: as the packing the bf16 GEMM
/// reads (`Tensor::packed_for_linear`), which the forward then multiplies by, not as bf16
/// values beside a second, cached packing. The embeddings stay f32 values for the lookup.
#[test]
fn bf16_linear_weights_are_held_once_as_their_packing() {
    use scalpel::models::sentence::SentenceEncoder;
    use scalpel::tensor::cpu::gemm_weights;

    let mut encoder = SentenceEncoder::load(&minilm_dir()).unwrap();
    encoder.bert.set_linear_dtype(DType::BF16).unwrap();
    let sentences = fixture_sentences();
    encoder.embed(&sentences[..2], 2).unwrap();
    let mut linear = 0;
    for (name, var) in encoder.bert.params.iter() {
        let w = var.value();
        if name.contains("encoder.layer.") && w.rank() == 2 {
            linear += 1;
            assert!(w.is_packed() && w.dtype() == DType::BF16, "{name}: {w:?}");
            // Panels padded to 32 columns and a depth of 32 at most, of bf16 (f32 where the
            // CPU has no bf16 instructions).
            let packing = gemm_weights::cached(w).expect("a packed weight has its packing");
            let padded = w.dim(0).next_multiple_of(32) * w.dim(1).next_multiple_of(32);
            let size = if matches!(Bf16Path::best(), Bf16Path::F32(_)) {
                4
            } else {
                2
            };
            assert!(
                packing.bytes() <= size * padded,
                "{name}: {} bytes",
                packing.bytes()
            );
        } else {
            assert!(!w.is_packed(), "{name}: {w:?}");
        }
    }
    assert_eq!(linear, 6 * 6, "six linear weights in each of six layers");
}

/// A frozen encoder's bf16 forward rounds each GEMM input once where it is made (the layer
/// input once for query, key and value; the FFN's GELU output as its GEMM stores it) and gives
/// the bits of the forward that rounds at every GEMM, which runs where a parameter is trainable
/// (here the pooler, which the encoder does not read): with bf16 weights and with f32 weights
/// under a bf16 compute.
#[test]
fn bf16_rounding_once_gives_the_bits_of_rounding_at_each_gemm() {
    use scalpel::models::sentence::SentenceEncoder;

    let sentences = fixture_sentences();
    for weights in [DType::BF16, DType::F32] {
        let mut encoder = SentenceEncoder::load(&minilm_dir()).unwrap();
        match weights {
            DType::BF16 => encoder.bert.set_linear_dtype(DType::BF16).unwrap(),
            _ => encoder.bert.set_linear_compute(DType::BF16).unwrap(),
        }
        let once = encoder.embed(&sentences, 4).unwrap().to_vec::<f32>();
        let thawed = encoder
            .bert
            .params
            .unfreeze(|name| name.starts_with("pooler."));
        assert_eq!(thawed, 2, "the pooler's weight and bias");
        let each = encoder.embed(&sentences, 4).unwrap().to_vec::<f32>();
        let differing = once.iter().zip(&each).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{weights:?} weights: {differing} values differ"
        );
    }
}

/// `bench gemm --dtype bf16 --trans-a` times the weight gradient `Aᵀ·B` (`A` stored `k×m`): on
/// every bf16 path this CPU has, its output equals the f64 product of the bf16-rounded operands
/// within f32 accumulation, and `Aᵀ·Bᵀ` is refused by name.
#[test]
fn bench_gemm_bf16_with_trans_a_is_the_weight_gradient() {
    use scalpel::bench::GemmWorkload;
    use scalpel::tensor::cpu::gemm::GemmShape;
    let shape = GemmShape {
        m: 40,
        n: 70,
        k: 300,
        trans_a: true,
        trans_b: false,
    };
    let round = |v: f32| f64::from(half::bf16::from_f32(v).to_f32());
    for path in Bf16Path::available() {
        let mut w = GemmWorkload::with_bf16(shape, path).unwrap();
        assert_eq!(w.bf16_path(), Some(path));
        w.run();
        let (a, b, c) = w.operands_and_output();
        for i in 0..shape.m {
            for j in 0..shape.n {
                let (mut want, mut magnitude) = (0.0f64, 0.0f64);
                for p in 0..shape.k {
                    let t = round(a[p * shape.m + i]) * round(b[p * shape.n + j]);
                    want += t;
                    magnitude += t.abs();
                }
                let got = f64::from(c[i * shape.n + j]);
                let bound = (shape.k as f64 + 2.0) * f64::from(f32::EPSILON) * magnitude;
                assert!(
                    (got - want).abs() <= bound,
                    "{path:?} C[{i}, {j}] = {got}, want {want} ± {bound}"
                );
            }
        }
    }
    let both = GemmShape {
        trans_b: true,
        ..shape
    };
    let err = GemmWorkload::with_bf16(both, Bf16Path::best())
        .err()
        .unwrap();
    assert!(err.to_string().contains("Aᵀ·Bᵀ"), "{err}");
}
