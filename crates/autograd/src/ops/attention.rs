use scalpel_cuda::{ops as cuda, Runtime};
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload};
use crate::{Backward, Result, Var};

/// The widest head the CUDA kernels take (`ops::attention_forward`); wider heads run on the CPU.
const CUDA_MAX_HEAD_DIM: usize = 64;

struct Attention {
    heads: usize,
    lse: Tensor,
    rt: Option<Runtime>,
}

impl Backward for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn backward(
        &self,
        inputs: &[Var],
        out: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let [q, k, v, mask] = inputs else {
            unreachable!("attention has four inputs")
        };
        let (q, k, v, mask) = (q.value(), k.value(), v.value(), mask.value());
        let (dq, dk, dv) = match backward_runtime(&self.rt, grad) {
            Some(rt) => {
                let s = tops::attention_shape(q, k, v, mask, self.heads)?;
                if grad.shape() != q.shape() {
                    // The CPU op reports the mismatch.
                    tops::attention_backward(q, k, v, mask, self.heads, out, &self.lse, grad)?
                } else {
                    let up = |t: &Tensor| upload(&rt, t);
                    let n = q.numel();
                    let (mut dq, mut dk, mut dv) = (
                        rt.zeros::<f32>(n)?,
                        rt.zeros::<f32>(n)?,
                        rt.zeros::<f32>(n)?,
                    );
                    cuda::attention_backward(
                        &rt,
                        &s,
                        &up(q)?,
                        &up(k)?,
                        &up(v)?,
                        &up(mask)?,
                        &up(out)?,
                        &up(&self.lse)?,
                        &up(grad)?,
                        &mut dq,
                        &mut dk,
                        &mut dv,
                    )?;
                    (
                        download(&dq, q.shape())?,
                        download(&dk, q.shape())?,
                        download(&dv, q.shape())?,
                    )
                }
            }
            None => tops::attention_backward(q, k, v, mask, self.heads, out, &self.lse, grad)?,
        };
        Ok(vec![
            needs[0].then_some(dq),
            needs[1].then_some(dk),
            needs[2].then_some(dv),
            None,
        ])
    }
}

/// Multi-head scaled dot-product attention with a key-padding mask, as one op:
/// `softmax(q·kᵀ/√d + mask)·v` per head. `q`, `k`, `v` are `[batch, seq, heads·d]`; `mask` is a
/// constant `[batch, seq]` of 1 (token) / 0 (padding). Only the per-row log-sum-exp is saved.
pub fn attention(q: &Var, k: &Var, v: &Var, mask: &Var, heads: usize) -> Result<Var> {
    let (qt, kt, vt, mt) = (q.value(), k.value(), v.value(), mask.value());
    let s = tops::attention_shape(qt, kt, vt, mt, heads)?;
    let rt = runtime_for(&[qt, kt, vt, mt]).filter(|_| s.head_dim <= CUDA_MAX_HEAD_DIM);
    let (out, lse) = match &rt {
        Some(rt) => {
            let mut out = rt.zeros::<f32>(qt.numel())?;
            let mut lse = rt.zeros::<f32>(s.batch * s.heads * s.seq)?;
            cuda::attention_forward(
                rt,
                &s,
                &upload(rt, qt)?,
                &upload(rt, kt)?,
                &upload(rt, vt)?,
                &upload(rt, mt)?,
                &mut out,
                &mut lse,
            )?;
            (
                download(&out, qt.shape())?,
                download(&lse, &[s.batch, s.heads, s.seq])?,
            )
        }
        None => tops::attention(qt, kt, vt, mt, heads)?,
    };
    Ok(Var::from_op(
        out,
        Attention { heads, lse, rt },
        vec![q.clone(), k.clone(), v.clone(), mask.clone()],
    ))
}
