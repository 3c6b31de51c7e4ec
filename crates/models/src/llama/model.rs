//! The Llama decoder: token embedding; per layer RMSNorm → grouped-query causal self-attention
//! (q/k/v/o projections, RoPE on q and k) → residual → RMSNorm → SwiGLU MLP → residual; the final
//! RMSNorm and the LM head (the token embedding when tied). Written once against `Var`, so the
//! same forward serves inference (constants, no graph) and training (parameters thawed).
//!
//! A [`KvCache`] keeps each layer's rotated keys and values of the positions seen so far, so that
//! a decoding step runs the new tokens only, against every cached key.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel_autograd::ops::{self, Indices};
use scalpel_autograd::{Params, Var};
use scalpel_tensor::{DType, Device, Tensor};

use super::LlamaConfig;
use crate::{ModelError, Result};

/// The Hugging Face names and shapes of every tensor a model of `config` has.
pub fn expected_tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, kv, ffn) = (c.hidden_size, c.kv_dim(), c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let mut out = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    for l in 0..c.num_hidden_layers {
        let layer: [(&str, Vec<usize>); 9] = [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![ffn, h]),
            ("mlp.up_proj.weight", vec![ffn, h]),
            ("mlp.down_proj.weight", vec![h, ffn]),
        ];
        out.extend(
            layer
                .into_iter()
                .map(|(name, shape)| (format!("model.layers.{l}.{name}"), shape)),
        );
    }
    out
}

/// Per layer, the rotated keys and the values of every position seen so far, `[1, len, kv_dim]`
/// each (one sequence: decoding runs at batch 1).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &LlamaConfig) -> KvCache {
        KvCache {
            layers: vec![None; config.num_hidden_layers],
            len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends layer `layer`'s new keys and values and returns all of them. The cache is copied
    /// on each step: 2·len·kv_dim floats per layer, 9 MB a token over SmolLM2's 30 layers at 200
    /// positions, against the 540 MB of f32 weights the step reads.
    fn extend(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let joined = match self.layers[layer].take() {
            None => (k.clone(), v.clone()),
            Some((ck, cv)) => {
                let join = |cached: Tensor, new: &Tensor| -> Result<Tensor> {
                    let width = new.dim(2);
                    let rows = [
                        cached.reshape(&[self.len, width])?,
                        new.clone().reshape(&[new.dim(1), width])?,
                    ];
                    let len = self.len + new.dim(1);
                    Ok(Tensor::concat(&rows)?.reshape(&[1, len, width])?)
                };
                (join(ck, k)?, join(cv, v)?)
            }
        };
        self.layers[layer] = Some(joined.clone());
        Ok(joined)
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    /// Hugging Face names.
    pub params: Params,
}

impl Llama {
    /// Checks that `weights` are exactly the tensors `config` implies (none missing, none extra,
    /// every shape right, all finite) and builds the model; other float dtypes become f32.
    pub fn new(
        config: LlamaConfig,
        weights: BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<Llama> {
        let expected = expected_tensors(&config);
        for (name, shape) in &expected {
            let t = weights.get(name).ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                    actual: t.shape().to_vec(),
                });
            }
        }
        if let Some(extra) = weights
            .keys()
            .find(|n| !expected.iter().any(|(e, _)| e == *n))
        {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor `{extra}` is not part of a {}-layer Llama model",
                    config.num_hidden_layers
                ),
            });
        }
        let weights: BTreeMap<String, Tensor> = weights
            .into_iter()
            .map(|(n, t)| match t.dtype() {
                DType::F32 => (n, t),
                _ => (n, t.to_dtype(DType::F32)),
            })
            .collect();
        crate::check_finite(&weights, path)?;
        Ok(Llama {
            config,
            params: Params::from_tensors(weights),
        })
    }

    /// Moves the weights to `device`, once; forwards, their gradients and a [`KvCache`] then
    /// stay there.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        Ok(self.params.to_device(device)?)
    }

    fn p(&self, name: &str) -> Result<&Var> {
        Ok(self.params.get(name)?)
    }

    fn layer_p(&self, layer: usize, name: &str) -> Result<&Var> {
        self.p(&format!("model.layers.{layer}.{name}"))
    }

    /// The final-normalised hidden states `[batch, seq, hidden]` of `ids` (`batch` sequences of
    /// equal length, row-major). With a cache (one sequence), the tokens continue the cached
    /// positions and their keys and values are appended to it.
    pub fn hidden_states(
        &self,
        ids: &[u32],
        batch: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Var> {
        let start = cache.as_ref().map_or(0, |cache| cache.len());
        if cache.is_some() && batch != 1 {
            return Err(ModelError::Input(format!(
                "a KV cache holds one sequence, not {batch}"
            )));
        }
        let (mut x, positions) = self.embed(ids, batch, start)?;
        for l in 0..self.config.num_hidden_layers {
            x = self.layer(l, &x, &positions, cache.as_deref_mut())?;
        }
        if let Some(cache) = cache {
            cache.len += positions.len();
        }
        Ok(ops::rmsnorm(
            &x,
            self.p("model.norm.weight")?,
            self.config.rms_norm_eps,
        )?)
    }

    /// The residual stream entering each layer and leaving the last (`num_hidden_layers + 1`
    /// states `[batch, seq, hidden]`, before the final norm): what layer scoring compares.
    pub fn layer_states(&self, ids: &[u32], batch: usize) -> Result<Vec<Var>> {
        let (mut x, positions) = self.embed(ids, batch, 0)?;
        let mut states = vec![x.clone()];
        for l in 0..self.config.num_hidden_layers {
            x = self.layer(l, &x, &positions, None)?;
            states.push(x.clone());
        }
        Ok(states)
    }

    /// Decoder layer `l` alone on a residual stream `x` `[batch, seq, hidden]` at positions
    /// `0..seq`: what training one layer to stand in for a removed block runs.
    pub fn layer_forward(&self, l: usize, x: &Var) -> Result<Var> {
        let positions: Vec<usize> = (0..x.shape()[1]).collect();
        self.layer(l, x, &positions, None)
    }

    /// The token embeddings of `ids` (`batch` equal-length sequences) and their positions, the
    /// first at `start`.
    fn embed(&self, ids: &[u32], batch: usize, start: usize) -> Result<(Var, Vec<usize>)> {
        let c = &self.config;
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::Input(format!(
                "{} token ids do not form {batch} sequences of equal non-zero length",
                ids.len()
            )));
        }
        let seq = ids.len() / batch;
        if start + seq > c.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{} tokens exceed the model's context of {} (llama.context_length / \
                 max_position_embeddings)",
                start + seq,
                c.max_position_embeddings
            )));
        }
        let ids = Indices::new(ids.iter().map(|&i| i as usize).collect(), &[batch, seq])?;
        let x = ops::embedding(self.p("model.embed_tokens.weight")?, &ids)?;
        Ok((x, (start..start + seq).collect()))
    }

    /// Decoder layer `l` on the residual stream `x`; with a cache, its keys and values are
    /// appended and attention sees all the cached ones.
    fn layer(
        &self,
        l: usize,
        x: &Var,
        positions: &[usize],
        cache: Option<&mut KvCache>,
    ) -> Result<Var> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let lin = |x: &Var, name: &str| -> Result<Var> {
            Ok(ops::linear(
                x,
                self.layer_p(l, &format!("{name}.weight"))?,
                None,
            )?)
        };
        let h = ops::rmsnorm(
            x,
            self.layer_p(l, "input_layernorm.weight")?,
            c.rms_norm_eps,
        )?;
        let q = ops::rope(&lin(&h, "self_attn.q_proj")?, d, positions, c.rope_theta)?;
        let mut k = ops::rope(&lin(&h, "self_attn.k_proj")?, d, positions, c.rope_theta)?;
        let mut v = lin(&h, "self_attn.v_proj")?;
        if let Some(cache) = cache {
            let (all_k, all_v) = cache.extend(l, k.value(), v.value())?;
            (k, v) = (Var::constant(all_k), Var::constant(all_v));
        }
        let attn = ops::causal_attention(&q, &k, &v, heads, kv_heads)?;
        let x = ops::add(x, &lin(&attn, "self_attn.o_proj")?)?;
        let h = ops::rmsnorm(
            &x,
            self.layer_p(l, "post_attention_layernorm.weight")?,
            c.rms_norm_eps,
        )?;
        let gated = ops::swiglu(&lin(&h, "mlp.gate_proj")?, &lin(&h, "mlp.up_proj")?)?;
        Ok(ops::add(&x, &lin(&gated, "mlp.down_proj")?)?)
    }

    /// Next-token logits `[..., vocab]` of hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Var) -> Result<Var> {
        // A tied model has an `lm_head.weight` of its own only as the bf16 copy
        // `set_linear_dtype` makes.
        let head = match self.params.get("lm_head.weight") {
            Ok(head) => head,
            Err(_) => self.p("model.embed_tokens.weight")?,
        };
        Ok(ops::linear(hidden, head, None)?)
    }

    /// Holds every linear weight (the projections and the LM head) in `dtype`, F32 or BF16,
    /// rounded once, for inference on the CPU: a decoding step is bound by streaming the weights
    /// (0.54 GB in f32 for SmolLM2-135M), which bf16 halves. The token embedding stays f32 for
    /// the lookup, so a tied head gets a bf16 copy of its own (`lm_head.weight`).
    pub fn set_linear_dtype(&mut self, dtype: DType) -> Result<()> {
        let mut names: Vec<String> = expected_tensors(&self.config)
            .into_iter()
            .filter(|(name, shape)| shape.len() == 2 && name != "model.embed_tokens.weight")
            .map(|(name, _)| name)
            .collect();
        if self.config.tie_word_embeddings {
            let table = self.p("model.embed_tokens.weight")?.value();
            if dtype == DType::F32 {
                self.params.remove("lm_head.weight");
            } else {
                let head = Var::constant(table.clone());
                self.params.insert("lm_head.weight", head);
                names.push("lm_head.weight".into());
            }
        } else {
            names.push("lm_head.weight".into());
        }
        crate::set_weights_dtype(&mut self.params, &names, dtype)
    }

    /// The logits `[vocab]` after the last of `ids` (one sequence), through `cache`: what a
    /// decoding step needs. Only the last position goes through the LM head.
    pub fn next_token_logits(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let hidden = self.hidden_states(ids, 1, Some(cache))?;
        let h = self.config.hidden_size;
        let last = hidden
            .value()
            .clone()
            .reshape(&[ids.len(), h])?
            .rows(ids.len() - 1..ids.len())?;
        Ok(self.logits(&Var::constant(last))?.value().to_vec::<f32>())
    }
}
