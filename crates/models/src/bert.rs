//! BERT-family encoders (BERT, MiniLM, ...): config, checked weight loading, and the forward.
//!
//! The forward is written once against autograd [`Var`]s. With frozen (constant) weights and
//! constant inputs it records no graph and is the inference path; with trainable parameters it
//! records exactly the fused ops whose backward the training loop needs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use scalpel_autograd::{ops, Params, Var};
use scalpel_tensor::cpu::gemm_weights;
use scalpel_tensor::{safetensors, DType, Device, Tensor};
use serde::Deserialize;

use crate::error::read_json;
use crate::tokenizer::Batch;
use crate::{ModelError, Result};

/// The fields of a Hugging Face BERT `config.json` that the forward depends on.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Parses and checks a config; `raw` is kept by [`Bert`] so rewrites preserve unknown fields.
    pub fn from_json(raw: &serde_json::Value, path: &Path) -> Result<BertConfig> {
        let bad = |detail: String| ModelError::Config {
            path: path.to_owned(),
            detail,
        };
        let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let architectures: Vec<&str> = raw
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let is_bert = model_type == "bert"
            || (model_type.is_empty() && architectures.iter().any(|a| a.starts_with("Bert")));
        if !is_bert {
            let found = if model_type.is_empty() {
                format!("architectures {architectures:?}")
            } else {
                format!("model_type `{model_type}`")
            };
            return Err(bad(format!("unknown architecture ({found}): scalpel supports BERT-family encoders (model_type \"bert\")")));
        }
        let config: BertConfig = serde_json::from_value(raw.clone())
            .map_err(|e| bad(format!("not a BERT config: {e}")))?;
        if config.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (only the erf form `gelu`)",
                config.hidden_act
            )));
        }
        if let Some(p) = config
            .position_embedding_type
            .as_deref()
            .filter(|p| *p != "absolute")
        {
            return Err(bad(format!(
                "position_embedding_type `{p}` is not supported (only `absolute`)"
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }

    /// Every tensor the forward reads, with the shape this config implies (names without prefix).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".to_string(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".to_string(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".to_string(), vec![h]),
            ("embeddings.LayerNorm.bias".to_string(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            for (suffix, shape) in layer_tensor_shapes(h, i) {
                out.push((format!("encoder.layer.{l}.{suffix}"), shape));
            }
        }
        out
    }
}

/// The tensors of one encoder layer (suffixes after `encoder.layer.N.`) and their shapes.
fn layer_tensor_shapes(h: usize, i: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("attention.self.query.weight", vec![h, h]),
        ("attention.self.query.bias", vec![h]),
        ("attention.self.key.weight", vec![h, h]),
        ("attention.self.key.bias", vec![h]),
        ("attention.self.value.weight", vec![h, h]),
        ("attention.self.value.bias", vec![h]),
        ("attention.output.dense.weight", vec![h, h]),
        ("attention.output.dense.bias", vec![h]),
        ("attention.output.LayerNorm.weight", vec![h]),
        ("attention.output.LayerNorm.bias", vec![h]),
        ("intermediate.dense.weight", vec![i, h]),
        ("intermediate.dense.bias", vec![i]),
        ("output.dense.weight", vec![h, i]),
        ("output.dense.bias", vec![h]),
        ("output.LayerNorm.weight", vec![h]),
        ("output.LayerNorm.bias", vec![h]),
    ]
}

/// Encoder layer indices present among tensor names (after the prefix).
pub fn layer_indices<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> BTreeSet<usize> {
    let head = format!("{prefix}encoder.layer.");
    names
        .filter_map(|n| n.strip_prefix(head.as_str()))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// Training-time behaviour of the forward.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOptions {
    /// Dropout on embeddings and on each sub-layer output (hidden dropout). Attention-probability
    /// dropout is not applied: the fused attention op never materialises the probabilities.
    pub dropout: f64,
    /// Seed of this forward's dropout masks.
    pub seed: u64,
}

/// The most tokens an inference forward runs through the encoder at once (see
/// [`Bert::forward`]): a larger batch is split into equal groups, so that only one group's
/// activations exist at a time (peak RSS at 32 × 128: 206 → 176 MB, time unchanged).
pub const INFERENCE_CHUNK_TOKENS: usize = 2048;

/// A loaded BERT encoder.
#[derive(Clone)]
pub struct Bert {
    pub config: BertConfig,
    /// The `config.json` as read, so a rewritten config keeps every field it had.
    pub raw_config: serde_json::Value,
    /// `""` for MiniLM-style names, `"bert."` for checkpoints of `BertFor*` heads.
    pub prefix: String,
    /// Every tensor of the checkpoint (float ones as f32), including ones the encoder does not
    /// read (pooler, `position_ids`), so that a saved model loses nothing.
    pub params: Params,
    /// What the encoder's linear layers multiply in: `F32`, or `BF16` (mixed precision: bf16
    /// GEMMs with f32 accumulation over the f32 weights, [`ops::linear_bf16`]; CPU only).
    linear_compute: DType,
    /// What attention's two products multiply in: `BF16` with bf16 linear weights
    /// ([`Bert::set_linear_dtype`]), else `F32` (bf16 as well under a `BF16` linear compute).
    attention_products: DType,
}

impl Bert {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path) -> Result<Bert> {
        let config_path = dir.join("config.json");
        let raw: serde_json::Value = read_json(&config_path)?;
        let weights_path = dir.join("model.safetensors");
        if !weights_path.exists() {
            return Err(ModelError::Input(format!(
                "{}: not found (scalpel reads weights from model.safetensors)",
                weights_path.display()
            )));
        }
        let file = safetensors::load(&weights_path)?;
        Bert::from_parts(raw, file.tensors, &config_path, &weights_path)
    }

    /// Checks that `tensors` are exactly what `raw` describes and builds the model.
    pub fn from_parts(
        raw: serde_json::Value,
        tensors: BTreeMap<String, Tensor>,
        config_path: &Path,
        weights_path: &Path,
    ) -> Result<Bert> {
        let config = BertConfig::from_json(&raw, config_path)?;
        let prefix = ["", "bert."]
            .into_iter()
            .find(|p| tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or_else(|| ModelError::MissingTensor {
                path: weights_path.to_owned(),
                name: "embeddings.word_embeddings.weight".into(),
            })?
            .to_string();
        let present = layer_indices(tensors.keys().map(String::as_str), &prefix);
        // Compared lazily: a hostile num_hidden_layers must not be materialised.
        if !present.iter().copied().eq(0..config.num_hidden_layers) {
            return Err(ModelError::Config {
                path: config_path.to_owned(),
                detail: format!(
                    "num_hidden_layers is {} but {} holds encoder layers {:?}",
                    config.num_hidden_layers,
                    weights_path.display(),
                    present
                ),
            });
        }
        for (name, shape) in config.expected_tensors() {
            let full = format!("{prefix}{name}");
            let t = tensors
                .get(&full)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: weights_path.to_owned(),
                    name: full.clone(),
                })?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    path: weights_path.to_owned(),
                    name: full,
                    expected: shape,
                    actual: t.shape().to_vec(),
                });
            }
        }
        let tensors: BTreeMap<String, Tensor> = tensors
            .into_iter()
            .map(|(n, t)| {
                let t = if t.dtype().is_float() && t.dtype() != DType::F32 {
                    t.to_dtype(DType::F32)
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        crate::check_finite(&tensors, weights_path)?;
        Ok(Bert {
            config,
            raw_config: raw,
            prefix,
            params: Params::from_tensors(tensors),
            linear_compute: DType::F32,
            attention_products: DType::F32,
        })
    }

    /// Where the weights are (the token embedding's device).
    pub fn device(&self) -> Device {
        self.params
            .get(&format!("{}embeddings.word_embeddings.weight", self.prefix))
            .map(|v| v.value().device())
            .unwrap_or_default()
    }

    /// Moves the weights to `device`, once; forwards then run there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        Ok(self.params.to_device(device)?)
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn p(&self, name: &str) -> Result<&Var> {
        Ok(self.params.get(&format!("{}{name}", self.prefix))?)
    }

    fn layer_p(&self, layer: usize, name: &str) -> Result<&Var> {
        self.p(&format!("encoder.layer.{layer}.{name}"))
    }

    /// Packs every encoder linear weight for the CPU GEMM now, rather than during the first
    /// forward that wants it (about 25 ms for all-MiniLM-L6-v2 on 2 cores): for a
    /// latency-sensitive caller, at start-up. The packings are kept while the weights live
    /// (`scalpel_tensor::cpu::gemm_weights`); an f32 packing costs as much memory again as its
    /// weight, as that first call would. A trainable weight, or one on a device, is never packed.
    /// Returns the bytes the packings hold.
    pub fn prepack_linear_weights(&self) -> Result<usize> {
        let mut bytes = 0;
        for w in self.linear_weights()? {
            if !w.requires_grad() {
                bytes += gemm_weights::packed(w.value()).map_or(0, |p| p.bytes());
            }
        }
        Ok(bytes)
    }

    /// Holds every encoder linear weight in `dtype`, `F32` or `BF16`, in place of what it held.
    /// With `BF16` the weights are rounded once (half the memory) and every linear layer is a
    /// bf16 GEMM: its input rounded to bf16, the products accumulated in f32, the output f32;
    /// attention's two products are bf16 GEMMs too, its softmax f32; embeddings, biases,
    /// LayerNorm and pooling stay f32. For inference: the weights must be constants on the host.
    pub fn set_linear_dtype(&mut self, dtype: DType) -> Result<()> {
        let names = self.linear_weight_names();
        crate::set_weights_dtype(&mut self.params, &names, dtype)?;
        self.attention_products = dtype;
        Ok(())
    }

    /// Multiplies every encoder linear layer in `dtype` from now on: `F32`, or `BF16` (mixed
    /// precision, for training and inference alike: the input and an f32 weight rounded to bf16
    /// at the GEMM, f32 accumulation, outputs, biases and gradients of the weights in f32; the
    /// bf16 copy of a weight is packed once per value, so again after each optimiser step);
    /// attention's products, forward and backward, are bf16 too, its softmax and `dS` f32.
    /// `BF16` runs on the CPU only.
    pub fn set_linear_compute(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(ModelError::Input(format!(
                "linear layers multiply in F32 or BF16, not {dtype:?}"
            )));
        }
        if dtype == DType::BF16 && !self.device().is_cpu() {
            return Err(ModelError::Input(format!(
                "bf16 linear layers run on the CPU only (this model is on {})",
                self.device().name()
            )));
        }
        self.linear_compute = dtype;
        Ok(())
    }

    /// What the linear layers multiply in ([`Bert::set_linear_compute`]).
    pub fn linear_compute(&self) -> DType {
        self.linear_compute
    }

    /// The names of the encoder's linear weights (`[out, in]` matrices).
    fn linear_weight_names(&self) -> Vec<String> {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        (0..self.config.num_hidden_layers)
            .flat_map(|l| {
                layer_tensor_shapes(h, i)
                    .into_iter()
                    .filter(|(_, shape)| shape.len() == 2)
                    .map(move |(name, _)| format!("{}encoder.layer.{l}.{name}", self.prefix))
            })
            .collect()
    }

    fn linear_weights(&self) -> Result<Vec<&Var>> {
        self.linear_weight_names()
            .iter()
            .map(|name| Ok(self.params.get(name)?))
            .collect()
    }

    /// Last hidden state, `[batch, seq, hidden]`.
    ///
    /// At inference (no trainable parameter, no dropout) a batch of more than
    /// [`INFERENCE_CHUNK_TOKENS`] tokens runs through the encoder a group of sequences at a
    /// time. Every op works per token, or per sequence for attention, so the result is the
    /// same; what changes is that the activations alive at once (the FFN's 4×-wide one above
    /// all) are one group's rather than the whole batch's.
    pub fn forward(&self, batch: &Batch, opts: &ForwardOptions) -> Result<Var> {
        let last_state = |batch: &Batch| -> Result<Var> {
            Ok(self
                .encode(batch, opts, false)?
                .pop()
                .expect("the last state is always returned"))
        };
        // Grouping bounds host memory; a device holds the whole batch's activations.
        let inference = opts.dropout == 0.0
            && self.params.trainable().next().is_none()
            && self.device().is_cpu();
        let groups = (batch.batch * batch.seq)
            .div_ceil(INFERENCE_CHUNK_TOKENS)
            .min(batch.batch);
        if !inference || groups <= 1 {
            return last_state(batch);
        }
        // Equal groups (sizes differ by at most one sequence).
        let parts = (0..groups)
            .map(|g| {
                let group =
                    batch.sequences(g * batch.batch / groups..(g + 1) * batch.batch / groups);
                Ok(match last_state(&group)?.into_unshared_constant() {
                    Ok(state) => state,
                    Err(shared) => shared.value().clone(),
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        Ok(Var::constant(Tensor::concat(&parts)?))
    }

    /// The embedding output followed by every layer's output: `num_layers + 1` states.
    pub fn forward_hidden_states(&self, batch: &Batch, opts: &ForwardOptions) -> Result<Vec<Var>> {
        self.encode(batch, opts, true)
    }

    /// The forward pass; returns every state or only the last (inference then frees each layer's
    /// input as soon as the layer is done).
    fn encode(&self, batch: &Batch, opts: &ForwardOptions, all_states: bool) -> Result<Vec<Var>> {
        let c = &self.config;
        if batch.seq > c.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                batch.seq, c.max_position_embeddings
            )));
        }
        let device = self.device();
        let shape = [batch.batch, batch.seq];
        // Positions count from 0 in every sequence; a single sentence has token type 0. Both are
        // made where the model is (on a device, by a kernel: no index array is copied there).
        let positions = ops::Indices::repeating(&shape, batch.seq.max(1))?.placed(&device)?;
        let token_types = ops::Indices::repeating(&shape, 1)?.placed(&device)?;
        let mut x = ops::embedding(
            self.p("embeddings.word_embeddings.weight")?,
            &batch.ids.placed(&device)?,
        )?;
        x = ops::add(
            &x,
            &ops::embedding(self.p("embeddings.position_embeddings.weight")?, &positions)?,
        )?;
        x = ops::add(
            &x,
            &ops::embedding(
                self.p("embeddings.token_type_embeddings.weight")?,
                &token_types,
            )?,
        )?;
        x = ops::layernorm(
            &x,
            self.p("embeddings.LayerNorm.weight")?,
            self.p("embeddings.LayerNorm.bias")?,
            c.layer_norm_eps,
        )?;
        let mut dropout_site = 0u64;
        let mut dropout = |v: &Var| {
            dropout_site += 1;
            ops::dropout(
                v,
                opts.dropout,
                opts.seed
                    .wrapping_mul(0x9E37_79B9)
                    .wrapping_add(dropout_site),
            )
        };
        x = dropout(&x)?;
        let mask = Var::constant(device.place(&batch.mask)?);
        let bf16 = self.linear_compute == DType::BF16;
        // bf16 GEMMs: a bf16 compute over f32 weights, or bf16 weights.
        let bf16_products = bf16 || self.attention_products == DType::BF16;
        // A bf16 GEMM input is rounded to bf16 once, where it is made: the layer input once for
        // query, key and value (not three times), and the FFN's GELU output as it is stored
        // (half the bytes, and no pass of its own). The same bits as rounding at each GEMM, in
        // the forward and in the weight gradients, which read the rounded inputs too. Training
        // does it with bf16 compute (whose ops take bf16 inputs with gradients); inference
        // also with bf16 weights under f32 compute.
        let frozen = self.params.trainable().next().is_none();
        let round_once = bf16 || (bf16_products && frozen && device.is_cpu());
        let mut states = Vec::new();
        for l in 0..c.num_hidden_layers {
            if all_states {
                states.push(x.clone());
            }
            let lin = |x: &Var, name: &str| -> Result<Var> {
                let (w, b) = (
                    self.layer_p(l, &format!("{name}.weight"))?,
                    self.layer_p(l, &format!("{name}.bias"))?,
                );
                Ok(match bf16 {
                    true => ops::linear_bf16(x, w, Some(b))?,
                    false => ops::linear(x, w, Some(b))?,
                })
            };
            // Each sub-layer is a block so that its temporaries die as soon as they are consumed
            // (a shadowed binding would live to the end of the iteration): inference holds one
            // sub-layer's activations at a time.
            x = {
                let projected = {
                    let x = match round_once {
                        true => ops::round_to_bf16(&x)?,
                        false => x.clone(),
                    };
                    let q = lin(&x, "attention.self.query")?;
                    let k = lin(&x, "attention.self.key")?;
                    let v = lin(&x, "attention.self.value")?;
                    let heads = c.num_attention_heads;
                    let attended = match bf16_products {
                        true => ops::attention_bf16(&q, &k, &v, &mask, heads)?,
                        false => ops::attention(&q, &k, &v, &mask, heads)?,
                    };
                    dropout(&lin(&attended, "attention.output.dense")?)?
                };
                ops::add_layernorm(
                    projected,
                    &x,
                    self.layer_p(l, "attention.output.LayerNorm.weight")?,
                    self.layer_p(l, "attention.output.LayerNorm.bias")?,
                    c.layer_norm_eps,
                )?
            };
            x = {
                let projected = {
                    let (w, b) = (
                        self.layer_p(l, "intermediate.dense.weight")?,
                        self.layer_p(l, "intermediate.dense.bias")?,
                    );
                    let inner = match round_once {
                        true => ops::linear_gelu_bf16_rounded(&x, w, Some(b))?,
                        false => ops::linear_gelu(&x, w, Some(b))?,
                    };
                    dropout(&lin(&inner, "output.dense")?)?
                };
                ops::add_layernorm(
                    projected,
                    &x,
                    self.layer_p(l, "output.LayerNorm.weight")?,
                    self.layer_p(l, "output.LayerNorm.bias")?,
                    c.layer_norm_eps,
                )?
            };
        }
        states.push(x);
        Ok(states)
    }

    /// Parameter count and forward FLOPs per token of each encoder layer at sequence length `seq`
    /// (a multiply-add counts as two FLOPs; attention scores and the weighted sum grow with `seq`).
    pub fn layer_cost(&self, seq: usize) -> (usize, usize) {
        let (h, i) = (self.config.hidden_size, self.config.intermediate_size);
        let params: usize = layer_tensor_shapes(h, i)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let flops = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq * h;
        (params, flops)
    }
}
