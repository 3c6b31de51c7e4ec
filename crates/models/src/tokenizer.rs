//! Text to token ids with the checkpoint's own `tokenizer.json`, and padded batches.

use std::ops::Range;
use std::path::{Path, PathBuf};

use scalpel_tensor::Tensor;
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
        let mut inner =
            Tokenizer::from_bytes(bytes).map_err(|e| err(format!("unreadable: {e}")))?;
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
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                detail: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
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

/// Token ids padded to the longest sequence, with the attention mask the model needs.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[batch·seq]`, padding positions hold id 0.
    pub ids: Vec<usize>,
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
        let mask =
            Tensor::from_vec(&[sequences.len(), seq], mask).expect("mask length is batch·seq");
        Batch {
            ids,
            mask,
            batch: sequences.len(),
            seq,
        }
    }

    /// The sequences `range` of this batch, keeping its padded length.
    pub fn sequences(&self, range: Range<usize>) -> Batch {
        Batch {
            ids: self.ids[range.start * self.seq..range.end * self.seq].to_vec(),
            mask: self
                .mask
                .rows(range.clone())
                .expect("the mask is [batch, seq] and the range within the batch"),
            batch: range.len(),
            seq: self.seq,
        }
    }
}
