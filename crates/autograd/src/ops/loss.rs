//! Scalar losses. They are tiny next to the model (a `[batch, dim]` pair). On the CPU they are
//! computed in f64 whatever the input dtype, and cast back. On a CUDA device, MSE runs on the
//! elementwise and reduction kernels and cross-entropy on its kernels (f32); the cosine loss has
//! no kernel and runs on the CPU.

use scalpel_cuda::{ops as cuda, DeviceBuffer, Runtime};
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload, upload_ids};
use crate::{AutogradError, Backward, Result, Var};

fn check_pair(op: &str, s: &Var, t: &Var) -> Result<()> {
    if s.shape() != t.shape() || s.shape().is_empty() {
        return Err(AutogradError::Graph(format!(
            "{op}: prediction {:?} and target {:?} differ",
            s.shape(),
            t.shape()
        )));
    }
    Ok(())
}

fn scalar_like(v: f64, like: &Tensor) -> Tensor {
    Tensor::scalar(v).to_dtype(like.dtype())
}

fn from_f64(shape: &[usize], values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(shape, values)?.to_dtype(like.dtype()))
}

/// Gradients w.r.t. both operands from `ds` (the target's is `-ds`: both losses are odd in s−t
/// or symmetric in roles as handled by each op).
fn pair_grads(
    needs: &[bool],
    ds: Tensor,
    dt: impl FnOnce() -> Result<Tensor>,
) -> Result<Vec<Option<Tensor>>> {
    let dt = if needs[1] { Some(dt()?) } else { None };
    Ok(vec![needs[0].then_some(ds), dt])
}

struct Mse {
    rt: Option<Runtime>,
}

/// `s − t` on the device.
fn diff_cuda(rt: &Runtime, s: &Tensor, t: &Tensor) -> Result<DeviceBuffer<f32>> {
    let mut diff = upload(rt, s)?;
    cuda::axpy(rt, -1.0, &upload(rt, t)?, &mut diff)?;
    Ok(diff)
}

impl Backward for Mse {
    fn name(&self) -> &'static str {
        "mse_loss"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (s, t) = (inputs[0].value(), inputs[1].value());
        let g = grad.to_vec::<f64>()[0] * 2.0 / s.numel() as f64;
        if let Some(rt) = backward_runtime(&self.rt, grad) {
            let diff = diff_cuda(&rt, s, t)?;
            let scaled = |alpha: f64| -> Result<Tensor> {
                let mut d = rt.zeros::<f32>(diff.len())?;
                cuda::axpy(&rt, alpha as f32, &diff, &mut d)?;
                download(&d, s.shape())
            };
            let ds = scaled(g)?;
            return pair_grads(needs, ds, || scaled(-g));
        }
        let diff: Vec<f64> = s
            .to_vec::<f64>()
            .iter()
            .zip(t.to_vec::<f64>())
            .map(|(a, b)| g * (a - b))
            .collect();
        let ds = from_f64(s.shape(), diff.clone(), s)?;
        pair_grads(needs, ds, || {
            from_f64(s.shape(), diff.iter().map(|d| -d).collect(), s)
        })
    }
}

/// Mean over all elements of `(s − t)²`.
pub fn mse_loss(s: &Var, t: &Var) -> Result<Var> {
    check_pair("mse_loss", s, t)?;
    let n = s.value().numel() as f64;
    let rt = runtime_for(&[s.value(), t.value()]);
    if let Some(rt) = &rt {
        let diff = diff_cuda(rt, s.value(), t.value())?;
        let loss = cuda::sum_of_squares(rt, &diff)? as f64 / n;
        return Ok(Var::from_op(
            scalar_like(loss, s.value()),
            Mse {
                rt: Some(rt.clone()),
            },
            vec![s.clone(), t.clone()],
        ));
    }
    let loss: f64 = s
        .value()
        .to_vec::<f64>()
        .iter()
        .zip(t.value().to_vec::<f64>())
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / n;
    Ok(Var::from_op(
        scalar_like(loss, s.value()),
        Mse { rt: None },
        vec![s.clone(), t.clone()],
    ))
}

/// Per row: `(cos, ‖s‖, ‖t‖)`.
fn row_cosines(s: &Tensor, t: &Tensor) -> Vec<(f64, f64, f64)> {
    let dim = s.dim(-1);
    let (s, t) = (s.to_vec::<f64>(), t.to_vec::<f64>());
    s.chunks_exact(dim)
        .zip(t.chunks_exact(dim))
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            (dot / (na * nb), na, nb)
        })
        .collect()
}

struct Cosine;

impl Backward for Cosine {
    fn name(&self) -> &'static str {
        "cosine_loss"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (s, t) = (inputs[0].value(), inputs[1].value());
        let dim = s.dim(-1);
        let rows = row_cosines(s, t);
        let g = -grad.to_vec::<f64>()[0] / rows.len() as f64;
        // d cos(a, b)/da = b/(‖a‖‖b‖) − cos·a/‖a‖².
        let d_first = |a: &[f64], b: &[f64], swap: bool| -> Vec<f64> {
            let mut out = Vec::with_capacity(a.len());
            for ((ra, rb), &(cos, na, nb)) in
                a.chunks_exact(dim).zip(b.chunks_exact(dim)).zip(&rows)
            {
                let (na, nb) = if swap { (nb, na) } else { (na, nb) };
                out.extend(
                    ra.iter()
                        .zip(rb)
                        .map(|(x, y)| g * (y / (na * nb) - cos * x / (na * na))),
                );
            }
            out
        };
        let (sv, tv) = (s.to_vec::<f64>(), t.to_vec::<f64>());
        let ds = from_f64(s.shape(), d_first(&sv, &tv, false), s)?;
        pair_grads(needs, ds, || {
            from_f64(s.shape(), d_first(&tv, &sv, true), s)
        })
    }
}

/// Mean over rows of `1 − cos(s_i, t_i)`. On the CPU on every device (no kernel).
pub fn cosine_loss(s: &Var, t: &Var) -> Result<Var> {
    check_pair("cosine_loss", s, t)?;
    let rows = row_cosines(s.value(), t.value());
    let loss = rows.iter().map(|(c, _, _)| 1.0 - c).sum::<f64>() / rows.len() as f64;
    Ok(Var::from_op(
        scalar_like(loss, s.value()),
        Cosine,
        vec![s.clone(), t.clone()],
    ))
}

struct CrossEntropy {
    targets: Vec<usize>,
    probs: Tensor,
    rt: Option<Runtime>,
}

impl Backward for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let dloss = grad.to_vec::<f64>()[0];
        Ok(vec![Some(match backward_runtime(&self.rt, grad) {
            Some(rt) => {
                let cols = self.probs.dim(1);
                let mut d = rt.zeros::<f32>(self.probs.numel())?;
                cuda::cross_entropy_backward(
                    &rt,
                    cols,
                    &upload(&rt, &self.probs)?,
                    &upload_ids(&rt, &self.targets)?,
                    dloss as f32,
                    &mut d,
                )?;
                download(&d, self.probs.shape())?
            }
            None => tops::cross_entropy_backward(&self.probs, &self.targets, dloss)?,
        })])
    }
}

/// Mean softmax cross-entropy of `logits` `[rows, classes]` against class indices.
pub fn cross_entropy(logits: &Var, targets: &[usize]) -> Result<Var> {
    let l = logits.value();
    // Shapes and targets are checked on the host: the kernels do not check the targets.
    let valid = l.rank() == 2
        && l.dim(0) == targets.len()
        && !targets.is_empty()
        && targets.iter().all(|&t| t < l.dim(1));
    let rt = runtime_for(&[l]).filter(|_| valid);
    let (loss, probs) = match &rt {
        Some(rt) => {
            let cols = l.dim(1);
            let mut probs = rt.zeros::<f32>(l.numel())?;
            let targets = upload_ids(rt, targets)?;
            let loss =
                cuda::cross_entropy_forward(rt, cols, &upload(rt, l)?, &targets, &mut probs)?;
            (loss as f64, download(&probs, l.shape())?)
        }
        None => tops::cross_entropy(l, targets)?,
    };
    let op = CrossEntropy {
        targets: targets.to_vec(),
        probs,
        rt,
    };
    Ok(Var::from_op(
        scalar_like(loss, logits.value()),
        op,
        vec![logits.clone()],
    ))
}
