//! Scalar losses. They are tiny next to the model (a `[batch, dim]` pair). On the CPU they are
//! computed in f64 whatever the input dtype, and cast back. On a device, MSE runs on the
//! elementwise and reduction kernels and cross-entropy on its kernels (f32), and only the loss
//! (4 bytes) is read back; the cosine loss is MSE between L2-normalised rows. A loss is a host scalar on every device: it is read back
//! anyway, and its backward takes the upstream gradient from the host.

use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
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

/// `values` as a tensor of `like`'s dtype, on `like`'s device.
fn from_f64(shape: &[usize], values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    let host = Tensor::from_vec(shape, values)?.to_dtype(like.dtype());
    Ok(like.device().place(&host)?)
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

struct Mse;

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
        let g = grad.to_host()?.to_vec::<f64>()[0] * 2.0 / s.numel() as f64;
        if let Some(be) = backend_of("mse_loss backward", &[s, t])? {
            let ds = be.scaled_difference(s, t, g)?;
            return pair_grads(needs, ds, || Ok(be.scaled_difference(s, t, -g)?));
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
    let (st, tt) = (s.value(), t.value());
    let n = st.numel() as f64;
    let loss = match backend_of("mse_loss", &[st, tt])? {
        Some(be) => be.sum_of_squares(&[&be.scaled_difference(st, tt, 1.0)?])? / n,
        None => {
            st.to_vec::<f64>()
                .iter()
                .zip(tt.to_vec::<f64>())
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                / n
        }
    };
    Ok(Var::from_op(
        scalar_like(loss, st),
        Mse,
        vec![s.clone(), t.clone()],
    ))
}

/// Per row: `(cos, ‖s‖, ‖t‖)`.
/// Mean over rows of `1 − cos(s_i, t_i)`, as `(dim/2)·mse(ŝ, t̂)` of the L2-normalised rows:
/// `‖ŝ − t̂‖² = 2 − 2cos`. Built from ops that every device has (so it stays on the device, and
/// its gradient is theirs), and better conditioned than `1 − cos` where the rows nearly agree.
pub fn cosine_loss(s: &Var, t: &Var) -> Result<Var> {
    check_pair("cosine_loss", s, t)?;
    let dim = s.shape()[s.shape().len() - 1];
    let loss = mse_loss(&super::l2_normalize(s)?, &super::l2_normalize(t)?)?;
    super::scale(&loss, dim as f64 / 2.0)
}

struct Distill {
    /// `p − q`, from the forward.
    diff: Tensor,
    temperature: f64,
}

impl Backward for Distill {
    fn name(&self) -> &'static str {
        "distill_kl"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        // d/ds of T²·KL(q ‖ softmax(s/T)) per row is T·(p − q); the loss is a mean over rows.
        let rows = self.diff.dim(0) as f64;
        let g = grad.to_host()?.to_vec::<f64>()[0] * self.temperature / rows;
        Ok(vec![Some(tops::scale(&self.diff, g)?)])
    }
}

/// Knowledge distillation of a next-token distribution (Hinton et al. 2015):
/// `T²·mean_rows KL(softmax(teacher/T) ‖ softmax(student/T))` over `[rows, vocab]` logits; the
/// `T²` keeps the gradient's scale independent of the temperature. The teacher is a constant.
/// CPU only so far (a vocabulary-wide row per token; no kernel yet).
pub fn distill_kl(student: &Var, teacher: &Tensor, temperature: f64) -> Result<Var> {
    if let Some(be) = backend_of("distill_kl", &[student.value(), teacher])? {
        return Err(AutogradError::Graph(format!(
            "distill_kl has no kernel on {} yet: distil decoders on the CPU",
            be.name()
        )));
    }
    let (kl, diff) = tops::kl_divergence(student.value(), teacher, temperature)?;
    let loss = temperature * temperature * kl / student.shape()[0] as f64;
    Ok(Var::from_op(
        scalar_like(loss, student.value()),
        Distill { diff, temperature },
        vec![student.clone()],
    ))
}

struct CrossEntropy {
    targets: Vec<usize>,
    probs: Tensor,
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
        let dloss = grad.to_host()?.to_vec::<f64>()[0];
        let (probs, targets) = (&self.probs, &self.targets);
        Ok(vec![Some(
            match backend_of("cross_entropy backward", &[probs])? {
                Some(be) => be.cross_entropy_backward(probs, targets, dloss)?,
                None => tops::cross_entropy_backward(probs, targets, dloss)?,
            },
        )])
    }
}

/// Mean softmax cross-entropy of `logits` `[rows, classes]` against class indices.
pub fn cross_entropy(logits: &Var, targets: &[usize]) -> Result<Var> {
    let l = logits.value();
    let (loss, probs) = match backend_of("cross_entropy", &[l])? {
        Some(be) => be.cross_entropy(l, targets)?,
        None => tops::cross_entropy(l, targets)?,
    };
    let op = CrossEntropy {
        targets: targets.to_vec(),
        probs,
    };
    Ok(Var::from_op(
        scalar_like(loss, logits.value()),
        op,
        vec![logits.clone()],
    ))
}
