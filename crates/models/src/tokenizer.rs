//! Text to token ids with the checkpoint's own `tokenizer.json`, and padded batches.

use std::ops::Range;
use std::path::{Path, PathBuf};

use scalpel_autograd::ops::Indices;
use scalpel_tensor::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use crate::{ModelError, Result};

/// The checkpoint's tokenizer with truncation fixed to the model's `max_seq_length`.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    pub fn load(path: &Path, max_seq_length: usize) -> Result<TextTokenizer> {
        let err = |detail: String| ModelError::Tokenizer {
            path: path.to_owned(),
            detail,
        };
        if !path.exists() {
            return Err(err(
                "not found (scalpel needs the checkpoint's tokenizer.json)".into(),
            ));
        }
        let bytes = crate::read_limited(path, crate::MAX_JSON_BYTES)?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| err(format!("unreadable: not valid JSON: {e}")))?;
        check_tokenizer_json(&json).map_err(|e| err(format!("unreadable: {e}")))?;
        let mut inner = guarded(|| Tokenizer::from_bytes(&bytes))
            .map_err(|e| err(format!("unreadable: {e}")))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| err(format!("cannot set truncation: {e}")))?;
        inner.with_padding(None);
        Ok(TextTokenizer {
            inner,
            path: path.to_owned(),
        })
    }

    /// Token ids with special tokens (`[CLS] … [SEP]`), truncated to `max_seq_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_overflow(text)?.0)
    }

    /// Like [`encode`](Self::encode), also counting the tokens truncation cut off (0 when the
    /// text fits), so a caller can refuse long inputs instead of silently truncating them.
    pub fn encode_with_overflow(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        let enc = guarded(|| self.inner.encode(text, true)).map_err(|e| ModelError::Tokenizer {
            path: self.path.clone(),
            detail: format!("cannot encode {text:?}: {e}"),
        })?;
        // Each overflowing piece carries its own special tokens; only its text tokens count.
        let cut: usize = enc
            .get_overflowing()
            .iter()
            .map(|piece| {
                piece
                    .get_special_tokens_mask()
                    .iter()
                    .filter(|&&m| m == 0)
                    .count()
            })
            .sum();
        Ok((enc.get_ids().to_vec(), cut))
    }

    pub fn batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Batch> {
        let ids = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Batch::from_ids(&ids))
    }

    /// The vocabulary, so two tokenizers can be compared.
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }
}

/// The longest added token accepted. The `tokenizers` crate (0.21.4) loads and applies added
/// tokens in time quadratic in their length (measured by the fuzzer: 1,024 characters 0.08 s,
/// 4,096 1.2 s, 16,384 18 s), and real ones are short (special tokens, whitespace runs).
const MAX_ADDED_TOKEN_CHARS: usize = 256;

/// What the `tokenizers` crate would accept but then hang or panic on: an added token over
/// [`MAX_ADDED_TOKEN_CHARS`], and a `TemplateProcessing` post-processor whose template names a
/// special token it does not define (it panics at encode time; upstream pull request 2152).
fn check_tokenizer_json(json: &serde_json::Value) -> Result<(), String> {
    let tokens = json.get("added_tokens").and_then(|t| t.as_array());
    let contents = tokens
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("content")?.as_str());
    if let Some(n) = contents
        .map(|c| c.chars().count())
        .find(|&n| n > MAX_ADDED_TOKEN_CHARS)
    {
        return Err(format!(
            "an added token of {n} characters (at most {MAX_ADDED_TOKEN_CHARS} are accepted)"
        ));
    }
    let Some(template) = json
        .get("post_processor")
        .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing"))
    else {
        return Ok(());
    };
    let pieces = ["single", "pair"]
        .into_iter()
        .filter_map(|part| template.get(part)?.as_array())
        .flatten();
    let names = pieces.filter_map(|p| p.get("SpecialToken")?.get("id")?.as_str());
    match names.into_iter().find(|name| {
        template
            .get("special_tokens")
            .and_then(|s| s.get(name))
            .is_none()
    }) {
        Some(name) => Err(format!(
            "post_processor: the template uses special token `{name}`, which its special_tokens \
             do not define"
        )),
        None => Ok(()),
    }
}

/// Calls into the `tokenizers` crate with a panic turned into an error: some malformed
/// `tokenizer.json` files make its deserializers panic instead of failing (fuzzing found a
/// malformed `decoder` doing so in 0.21.4; upstream pull requests 2152 and 2156 fix a
/// post-processor that panics at encode time and a bad `Precompiled` normalizer).
fn guarded<T>(call: impl FnOnce() -> tokenizers::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!("the tokenizers crate panicked: {message}"))
        }
    }
}

/// Token ids padded to the longest sequence, with the attention mask the model needs.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[batch, seq]`, padding positions hold id 0.
    pub ids: Indices,
    /// `[batch, seq]` f32: 1 for real tokens, 0 for padding.
    pub mask: Tensor,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    pub fn from_ids(sequences: &[Vec<u32>]) -> Batch {
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![0usize; sequences.len() * seq];
        let mut mask = vec![0f32; sequences.len() * seq];
        for (b, s) in sequences.iter().enumerate() {
            for (t, &id) in s.iter().enumerate() {
                ids[b * seq + t] = id as usize;
                mask[b * seq + t] = 1.0;
            }
        }
        let shape = [sequences.len(), seq];
        let mask = Tensor::from_vec(&shape, mask).expect("mask length is batch·seq");
        Batch {
            ids: Indices::new(ids, &shape).expect("ids length is batch·seq"),
            mask,
            batch: sequences.len(),
            seq,
        }
    }

    /// This batch with its ids and mask on `device` (copied there once, then shared by every op
    /// of the forward and backward, and by the teacher's forward too when distilling).
    pub fn placed(&self, device: &Device) -> Result<Batch> {
        Ok(Batch {
            ids: self.ids.placed(device)?,
            mask: device.place(&self.mask)?,
            ..self.clone()
        })
    }

    /// The sequences `range` of this batch, keeping its padded length (a host batch).
    pub fn sequences(&self, range: Range<usize>) -> Batch {
        let ids = self.ids.values()[range.start * self.seq..range.end * self.seq].to_vec();
        Batch {
            ids: Indices::new(ids, &[range.len(), self.seq])
                .expect("the range is within the batch"),
            mask: self
                .mask
                .rows(range.clone())
                .expect("the mask is [batch, seq] and the range within the batch"),
            batch: range.len(),
            seq: self.seq,
        }
    }
}
