//! Sequential models (MLPs) described by a small JSON file next to their weights:
//!
//! ```text
//! mlp.json           {"layers": [{"type": "linear", "in": 64, "out": 64}, {"type": "gelu"}, ...]}
//! model.safetensors  layers.0.weight [64, 64], layers.0.bias [64], ...
//! ```
//!
//! Tensor names follow PyTorch's `nn.Sequential`: `layers.{i}.weight` (`[out, in]`) and
//! `layers.{i}.bias` (`[out]`), `i` being the position in the JSON list (activations hold no
//! tensors). Loading checks that the tensors are exactly what the JSON describes.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel_autograd::{ops, Params, Var};
use scalpel_tensor::{safetensors, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::read_json;
use crate::{ModelError, Result};

/// The description file of a sequential model folder.
pub const SPEC_FILE: &str = "mlp.json";
/// The weights file of a sequential model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// One layer of the stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Layer {
    /// `y = x·Wᵀ + b`.
    Linear {
        #[serde(rename = "in")]
        in_features: usize,
        #[serde(rename = "out")]
        out_features: usize,
    },
    /// GELU (exact erf form).
    Gelu,
}

/// The whole JSON description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequentialSpec {
    pub layers: Vec<Layer>,
}

impl SequentialSpec {
    /// The tensors the spec implies, with their shapes, in layer order.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Layer::Linear {
                in_features,
                out_features,
            } = *layer
            {
                out.push((
                    format!("layers.{i}.weight"),
                    vec![out_features, in_features],
                ));
                out.push((format!("layers.{i}.bias"), vec![out_features]));
            }
        }
        out
    }

    /// Consecutive linear layers must agree on their widths.
    pub fn check(&self, path: &Path) -> Result<()> {
        let mut width: Option<(usize, usize)> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Layer::Linear {
                in_features,
                out_features,
            } = *layer
            {
                if in_features == 0 || out_features == 0 {
                    return Err(config_err(
                        path,
                        format!("layer {i}: widths must be positive"),
                    ));
                }
                if let Some((j, w)) = width {
                    if w != in_features {
                        return Err(config_err(
                            path,
                            format!(
                                "layer {i} takes {in_features} inputs but layer {j} outputs {w}"
                            ),
                        ));
                    }
                }
                width = Some((i, out_features));
            }
        }
        if width.is_none() {
            return Err(config_err(path, "no linear layer".into()));
        }
        Ok(())
    }

    pub fn input_width(&self) -> Option<usize> {
        self.layers.iter().find_map(|l| match *l {
            Layer::Linear { in_features, .. } => Some(in_features),
            Layer::Gelu => None,
        })
    }

    pub fn output_width(&self) -> Option<usize> {
        self.layers.iter().rev().find_map(|l| match *l {
            Layer::Linear { out_features, .. } => Some(out_features),
            Layer::Gelu => None,
        })
    }
}

fn config_err(path: &Path, detail: String) -> ModelError {
    ModelError::Config {
        path: path.to_owned(),
        detail,
    }
}

/// A sequential model: its description and its named parameters.
#[derive(Clone)]
pub struct Sequential {
    pub spec: SequentialSpec,
    pub params: Params,
}

/// PyTorch's `nn.Linear` default initialisation (weight and bias uniform in `±1/√in`), drawn
/// from a counter-based generator so a seed always gives the same tensors.
pub fn init_linear(in_features: usize, out_features: usize, seed: u64) -> (Tensor, Tensor) {
    let bound = 1.0 / (in_features as f64).sqrt();
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * u - 1.0) * bound) as f32
    };
    let w: Vec<f32> = (0..in_features * out_features).map(|_| uniform()).collect();
    let b: Vec<f32> = (0..out_features).map(|_| uniform()).collect();
    (
        Tensor::from_vec(&[out_features, in_features], w).expect("shape matches"),
        Tensor::from_vec(&[out_features], b).expect("shape matches"),
    )
}

fn layer_seed(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

impl Sequential {
    /// A freshly initialised model (seeded; see [`init_linear`]).
    pub fn init(spec: SequentialSpec, seed: u64) -> Result<Sequential> {
        spec.check(Path::new(SPEC_FILE))?;
        let mut tensors = BTreeMap::new();
        for (i, layer) in spec.layers.iter().enumerate() {
            if let Layer::Linear {
                in_features,
                out_features,
            } = *layer
            {
                let (w, b) = init_linear(in_features, out_features, layer_seed(seed, i));
                tensors.insert(format!("layers.{i}.weight"), w);
                tensors.insert(format!("layers.{i}.bias"), b);
            }
        }
        Ok(Sequential {
            spec,
            params: Params::from_tensors(tensors),
        })
    }

    /// Reads `dir/mlp.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path) -> Result<Sequential> {
        let spec_path = dir.join(SPEC_FILE);
        let spec: SequentialSpec = read_json(&spec_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.exists() {
            return Err(ModelError::Input(format!(
                "{}: not found",
                weights_path.display()
            )));
        }
        let tensors = safetensors::load(&weights_path)?.tensors;
        Sequential::from_parts(spec, tensors, &spec_path, &weights_path)
    }

    /// Checks that `tensors` are exactly the ones `spec` describes (names and shapes; no extra
    /// tensors) and builds the model. Float tensors are converted to f32.
    pub fn from_parts(
        spec: SequentialSpec,
        mut tensors: BTreeMap<String, Tensor>,
        spec_path: &Path,
        weights_path: &Path,
    ) -> Result<Sequential> {
        spec.check(spec_path)?;
        let mut kept = BTreeMap::new();
        for (name, shape) in spec.expected_tensors() {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: weights_path.to_owned(),
                    name: name.clone(),
                })?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    path: weights_path.to_owned(),
                    name,
                    expected: shape,
                    actual: t.shape().to_vec(),
                });
            }
            if !t.dtype().is_float() {
                return Err(config_err(
                    weights_path,
                    format!("tensor `{name}` has non-float dtype {:?}", t.dtype()),
                ));
            }
            kept.insert(name, t.to_dtype(DType::F32));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(config_err(
                weights_path,
                format!(
                    "tensor `{extra}` is not described by {} ({} unexpected tensors)",
                    spec_path.display(),
                    tensors.len()
                ),
            ));
        }
        crate::check_finite(&kept, weights_path)?;
        Ok(Sequential {
            spec,
            params: Params::from_tensors(kept),
        })
    }

    /// Writes `dir/mlp.json` and `dir/model.safetensors` (creating `dir`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let spec_path = dir.join(SPEC_FILE);
        let json = serde_json::to_string_pretty(&self.spec).expect("a spec serialises") + "\n";
        std::fs::write(&spec_path, json).map_err(|source| ModelError::Io {
            path: spec_path.clone(),
            source,
        })?;
        safetensors::save(
            &dir.join(WEIGHTS_FILE),
            &self.params.to_tensors(),
            &BTreeMap::new(),
        )?;
        Ok(())
    }

    /// `x` `[rows, in]` through every layer. Differentiable w.r.t. trainable parameters.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for (i, layer) in self.spec.layers.iter().enumerate() {
            h = match layer {
                Layer::Linear { .. } => ops::linear(
                    &h,
                    self.params.get(&format!("layers.{i}.weight"))?,
                    Some(self.params.get(&format!("layers.{i}.bias"))?),
                )?,
                Layer::Gelu => ops::gelu(&h)?,
            };
        }
        Ok(h)
    }

    /// Removes the last `n` layers (and their tensors).
    pub fn drop_last(&mut self, n: usize) -> Result<()> {
        if n >= self.spec.layers.len() {
            return Err(ModelError::Input(format!(
                "cannot drop {n} of {} layers",
                self.spec.layers.len()
            )));
        }
        let keep = self.spec.layers.len() - n;
        for i in keep..self.spec.layers.len() {
            self.params.remove(&format!("layers.{i}.weight"));
            self.params.remove(&format!("layers.{i}.bias"));
        }
        self.spec.layers.truncate(keep);
        Ok(())
    }

    /// Appends a layer; a linear one is freshly initialised from `seed` (never loaded).
    pub fn push(&mut self, layer: Layer, seed: u64) -> Result<()> {
        let i = self.spec.layers.len();
        self.spec.layers.push(layer.clone());
        if let Err(e) = self.spec.check(Path::new(SPEC_FILE)) {
            self.spec.layers.pop();
            return Err(e);
        }
        if let Layer::Linear {
            in_features,
            out_features,
        } = layer
        {
            let (w, b) = init_linear(in_features, out_features, layer_seed(seed, i));
            self.params
                .insert(format!("layers.{i}.weight"), Var::parameter(w));
            self.params
                .insert(format!("layers.{i}.bias"), Var::parameter(b));
        }
        Ok(())
    }

    /// Parameter names in model order (layer by layer, weight before bias): what "the first N
    /// parameters" means.
    pub fn param_names(&self) -> Vec<String> {
        self.spec
            .expected_tensors()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// Freezes the first `n` parameters in model order; returns their names.
    pub fn freeze_first(&mut self, n: usize) -> Vec<String> {
        let names: Vec<String> = self.param_names().into_iter().take(n).collect();
        self.params.freeze(|name| names.iter().any(|n| n == name));
        names
    }
}
