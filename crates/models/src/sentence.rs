//! Sentence embeddings as sentence-transformers computes them: encoder, pooling, normalisation,
//! configured by the checkpoint's `modules.json`, `sentence_bert_config.json` and pooling config.

use std::path::{Path, PathBuf};

use scalpel_autograd::{ops, Var};
use scalpel_tensor::{Device, Tensor};
use serde::Deserialize;

use crate::bert::{Bert, ForwardOptions};
use crate::error::read_json;
use crate::tokenizer::{Batch, TextTokenizer};
use crate::{ModelError, Result};

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// How token states become one sentence vector.
#[derive(Clone, Debug, PartialEq)]
pub struct SentenceConfig {
    pub max_seq_length: usize,
    /// Whether a `Normalize` module follows pooling.
    pub normalize: bool,
}

impl SentenceConfig {
    /// Reads the sentence-transformers files in `dir`. A plain Hugging Face checkpoint (no
    /// `modules.json`) gets mean pooling without normalisation.
    pub fn load(dir: &Path, bert: &Bert) -> Result<SentenceConfig> {
        let modules_path = dir.join("modules.json");
        let mut normalize = false;
        if modules_path.exists() {
            let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
            for m in &modules {
                if m.kind.ends_with("Pooling") {
                    check_pooling(&dir.join(&m.path).join("config.json"))?;
                } else if m.kind.ends_with("Normalize") {
                    normalize = true;
                } else if !m.kind.ends_with("Transformer") {
                    return Err(ModelError::Config {
                        path: modules_path.clone(),
                        detail: format!("module type `{}` is not supported (Transformer, Pooling, Normalize are)", m.kind),
                    });
                }
            }
        }
        let sbert_path = dir.join("sentence_bert_config.json");
        let declared = if sbert_path.exists() {
            read_json::<SentenceBertConfig>(&sbert_path)?.max_seq_length
        } else {
            None
        };
        let limit = bert.config.max_position_embeddings;
        Ok(SentenceConfig {
            max_seq_length: declared.unwrap_or(limit).min(limit),
            normalize,
        })
    }
}

fn check_pooling(path: &Path) -> Result<()> {
    let p: PoolingConfig = read_json(path)?;
    if !p.pooling_mode_mean_tokens
        || p.pooling_mode_cls_token
        || p.pooling_mode_max_tokens
        || p.pooling_mode_mean_sqrt_len_tokens
    {
        return Err(ModelError::Config {
            path: path.to_owned(),
            detail: "only mean pooling (pooling_mode_mean_tokens alone) is supported".into(),
        });
    }
    Ok(())
}

/// Text in, sentence embeddings out: the model behind `scalpel embed`.
pub struct SentenceEncoder {
    pub bert: Bert,
    pub tokenizer: TextTokenizer,
    pub config: SentenceConfig,
    pub dir: PathBuf,
}

impl SentenceEncoder {
    pub fn load(dir: &Path) -> Result<SentenceEncoder> {
        if !dir.is_dir() {
            return Err(ModelError::Input(format!(
                "{}: no such model directory",
                dir.display()
            )));
        }
        let mut bert = Bert::load(dir)?;
        // Inference by default: constant weights record no graph. Training thaws what it trains.
        bert.params.freeze(|_| true);
        let config = SentenceConfig::load(dir, &bert)?;
        let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"), config.max_seq_length)?;
        Ok(SentenceEncoder {
            bert,
            tokenizer,
            config,
            dir: dir.to_owned(),
        })
    }

    /// Moves the model's weights to `device` once; embeddings are then computed there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        self.bert.to_device(device)
    }

    /// Pooled (and, if configured, normalised) embeddings of a batch: `[batch, hidden]`, on the
    /// model's device. Differentiable when the model's parameters are trainable.
    pub fn embed_batch(&self, batch: &Batch, opts: &ForwardOptions) -> Result<Var> {
        let batch = batch.placed(&self.bert.device())?;
        let hidden = self.bert.forward(&batch, opts)?;
        self.pool(&hidden, &batch)
    }

    /// Mean pooling over real tokens, then L2 normalisation if the checkpoint asks for it.
    pub fn pool(&self, hidden: &Var, batch: &Batch) -> Result<Var> {
        let mask = self.bert.device().place(&batch.mask)?;
        let pooled = ops::mean_pool(hidden, &Var::constant(mask))?;
        Ok(if self.config.normalize {
            ops::l2_normalize(&pooled)?
        } else {
            pooled
        })
    }

    /// Embeds `texts` in batches of `batch_size` and returns `[texts.len(), hidden]` in input
    /// order. Sentences are grouped by length first so batches carry little padding; padding
    /// never changes a sentence's embedding.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S], batch_size: usize) -> Result<Tensor> {
        let hidden = self.bert.config.hidden_size;
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![0f32; texts.len() * hidden];
        for chunk in order.chunks(batch_size.max(1)) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let emb = self.embed_batch(&Batch::from_ids(&seqs), &ForwardOptions::default())?;
            let values = emb.value().to_host()?.to_vec::<f32>();
            // Finite weights can still overflow (e.g. huge but finite values): an embedding
            // of NaNs is an error, never a vector of `null`s in someone's output file.
            if let Some((_, &i)) = values
                .chunks_exact(hidden)
                .zip(chunk)
                .find(|(row, _)| row.iter().any(|x| !x.is_finite()))
            {
                let text: String = texts[i].as_ref().chars().take(60).collect();
                return Err(ModelError::Input(format!(
                    "{}: the embedding of sentence {} of {} ({text:?}) is not finite (NaN or \
                     infinite values)",
                    self.dir.display(),
                    i + 1,
                    texts.len()
                )));
            }
            for (row, &i) in values.chunks_exact(hidden).zip(chunk) {
                out[i * hidden..(i + 1) * hidden].copy_from_slice(row);
            }
        }
        Ok(Tensor::from_vec(&[texts.len(), hidden], out)?)
    }
}
