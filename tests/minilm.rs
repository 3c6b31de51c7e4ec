//! The real all-MiniLM-L6-v2 against PyTorch: token ids, hidden states and pooled embeddings
//! (fixtures from `scripts/reference/make_fixtures.py`).

use crate::common;

use common::*;
use scalpel::models::bert::{ForwardOptions, INFERENCE_CHUNK_TOKENS};
use scalpel::models::sentence::SentenceEncoder;
use scalpel::models::tokenizer::Batch;

fn encoder() -> SentenceEncoder {
    SentenceEncoder::load(&minilm_dir()).expect("load all-MiniLM-L6-v2")
}

#[test]
fn token_ids_equal_pytorch_exactly() {
    let enc = encoder();
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/tokens.json")).unwrap())
            .unwrap();
    let expected: Vec<Vec<u32>> = serde_json::from_value(fixture["tokens"].clone()).unwrap();
    let sentences = fixture_sentences();
    assert_eq!(sentences.len(), expected.len());
    for (i, (s, want)) in sentences.iter().zip(&expected).enumerate() {
        assert_eq!(
            &enc.tokenizer.encode(s).unwrap(),
            want,
            "line {} ({s:?})",
            i + 1
        );
    }
    assert_eq!(
        expected.last().unwrap().len(),
        256,
        "the long line is truncated to max_seq_length"
    );
}

#[test]
fn last_hidden_state_matches_pytorch_within_1e4() {
    let enc = encoder();
    let fx = load_fixture("minilm/hidden.safetensors");
    for j in 0..4 {
        let ids: Vec<u32> = fx[&format!("ids.{j}")]
            .to_vec::<i64>()
            .iter()
            .map(|&i| i as u32)
            .collect();
        let want = &fx[&format!("hidden.{j}")];
        let hidden = enc
            .bert
            .forward(
                &Batch::from_ids(std::slice::from_ref(&ids)),
                &ForwardOptions::default(),
            )
            .unwrap();
        assert_eq!(hidden.shape(), &[1, ids.len(), 384]);
        let diff = max_abs_diff(&hidden.value().to_vec::<f32>(), &want.to_vec::<f32>());
        assert!(
            diff <= 1e-4,
            "sentence {j} ({} tokens): max |Δ| = {diff:e} > 1e-4",
            ids.len()
        );
    }
}

#[test]
fn pooled_embeddings_match_sentence_transformers() {
    let enc = encoder();
    let sentences = fixture_sentences();
    let want = load_fixture("minilm/embeddings.safetensors")["embeddings"].to_vec::<f32>();
    let got = enc.embed(&sentences, 8).unwrap().to_vec::<f32>();
    for (i, (a, b)) in got
        .chunks_exact(384)
        .zip(want.chunks_exact(384))
        .enumerate()
    {
        let cos = cosine(a, b);
        assert!(cos >= 0.99999, "line {}: cosine {cos} < 0.99999", i + 1);
    }
}

#[test]
fn padding_in_a_mixed_batch_does_not_change_embeddings() {
    let enc = encoder();
    // Very different lengths, including the truncated 256-token line, in one padded batch.
    let sentences = fixture_sentences();
    let picked: Vec<&String> = [0usize, 40, 41, 43, 23]
        .iter()
        .map(|&i| &sentences[i])
        .collect();
    let together = enc.embed(&picked, picked.len()).unwrap().to_vec::<f32>();
    for (i, s) in picked.iter().enumerate() {
        let alone = enc.embed(&[s], 1).unwrap().to_vec::<f32>();
        let diff = max_abs_diff(&together[i * 384..(i + 1) * 384], &alone);
        assert!(
            diff <= 1e-5,
            "sentence {i}: padded vs alone max |Δ| = {diff:e}"
        );
    }
}

/// A batch of more than `INFERENCE_CHUNK_TOKENS` tokens runs through the encoder in groups of
/// sequences; its embeddings are still sentence-transformers' and those of small batches.
#[test]
fn a_large_batch_in_groups_matches_sentence_transformers() {
    let enc = encoder();
    let sentences = fixture_sentences();
    let ids: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| enc.tokenizer.encode(s).unwrap())
        .collect();
    let batch = Batch::from_ids(&ids);
    assert!(
        batch.batch * batch.seq > INFERENCE_CHUNK_TOKENS * 2,
        "the batch must span several groups"
    );
    let got = enc
        .embed_batch(&batch, &ForwardOptions::default())
        .unwrap()
        .value()
        .to_vec::<f32>();
    let want = load_fixture("minilm/embeddings.safetensors")["embeddings"].to_vec::<f32>();
    let small_batches = enc.embed(&sentences, 4).unwrap().to_vec::<f32>();
    for (i, ((a, b), c)) in got
        .chunks_exact(384)
        .zip(want.chunks_exact(384))
        .zip(small_batches.chunks_exact(384))
        .enumerate()
    {
        let cos = cosine(a, b);
        assert!(cos >= 0.99999, "line {}: cosine {cos} < 0.99999", i + 1);
        let diff = max_abs_diff(a, c);
        assert!(
            diff <= 1e-5,
            "line {}: grouped vs batches of 4 max |Δ| = {diff:e}",
            i + 1
        );
    }
}

/// Prepacking packs the frozen encoder linear weights (all 36 of them: their floats, padded to
/// whole panels) and no weight that trains.
#[test]
fn prepacking_covers_every_frozen_linear_weight() {
    let enc = encoder();
    let c = &enc.bert.config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let weight_bytes = c.num_hidden_layers * (4 * h * h + 2 * h * i) * std::mem::size_of::<f32>();

    let mut trainable = enc.bert.clone();
    trainable.params.unfreeze(|_| true);
    assert_eq!(trainable.prepack_linear_weights().unwrap(), 0);

    let packed = enc.bert.prepack_linear_weights().unwrap();
    assert!(
        packed >= weight_bytes && packed < weight_bytes + weight_bytes / 10,
        "packed {packed} bytes for {weight_bytes} bytes of linear weights"
    );
}
