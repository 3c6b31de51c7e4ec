//! Sentence-pair features for classification heads (SBERT's softmax classifier input).

use scalpel_tensor::Tensor;

use crate::{AutogradError, Backward, Result, Var};

struct PairFeatures;

impl Backward for PairFeatures {
    fn name(&self) -> &'static str {
        "pair_features"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (u, v) = (inputs[0].value(), inputs[1].value());
        let d = u.dim(-1);
        let (uv, vv, g) = (u.to_vec::<f64>(), v.to_vec::<f64>(), grad.to_vec::<f64>());
        let mut du = vec![0.0; uv.len()];
        let mut dv = vec![0.0; vv.len()];
        for (r, gr) in g.chunks_exact(4 * d).enumerate() {
            for j in 0..d {
                let (a, b) = (uv[r * d + j], vv[r * d + j]);
                // d|a−b|/da = sign(a−b) (0 at a = b, as PyTorch's abs).
                let s = if a > b {
                    1.0
                } else if a < b {
                    -1.0
                } else {
                    0.0
                };
                du[r * d + j] = gr[j] + s * gr[2 * d + j] + b * gr[3 * d + j];
                dv[r * d + j] = gr[d + j] - s * gr[2 * d + j] + a * gr[3 * d + j];
            }
        }
        let out = |vals: Vec<f64>, like: &Tensor| -> Result<Tensor> {
            Ok(Tensor::from_vec(like.shape(), vals)?.to_dtype(like.dtype()))
        };
        Ok(vec![
            if needs[0] { Some(out(du, u)?) } else { None },
            if needs[1] { Some(out(dv, v)?) } else { None },
        ])
    }
}

/// `[u, v, |u − v|, u ∘ v]` concatenated along the last dimension: `[rows, d]` × 2 → `[rows, 4d]`.
pub fn pair_features(u: &Var, v: &Var) -> Result<Var> {
    if u.shape() != v.shape() || u.shape().len() != 2 {
        return Err(AutogradError::Graph(format!(
            "pair_features: needs two [rows, dim] inputs of one shape, got {:?} and {:?}",
            u.shape(),
            v.shape()
        )));
    }
    let (rows, d) = (u.shape()[0], u.shape()[1]);
    let (uv, vv) = (u.value().to_vec::<f64>(), v.value().to_vec::<f64>());
    let mut f = Vec::with_capacity(rows * 4 * d);
    for r in 0..rows {
        let (a, b) = (&uv[r * d..(r + 1) * d], &vv[r * d..(r + 1) * d]);
        f.extend_from_slice(a);
        f.extend_from_slice(b);
        f.extend(a.iter().zip(b).map(|(x, y)| (x - y).abs()));
        f.extend(a.iter().zip(b).map(|(x, y)| x * y));
    }
    let value = Tensor::from_vec(&[rows, 4 * d], f)?.to_dtype(u.value().dtype());
    Ok(Var::from_op(
        value,
        PairFeatures,
        vec![u.clone(), v.clone()],
    ))
}
