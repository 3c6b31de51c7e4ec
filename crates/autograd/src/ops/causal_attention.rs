use scalpel_tensor::{decoder_ops as dops, Tensor};

use crate::device::backend_of;
use crate::{Backward, Result, Var};

struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    lse: Tensor,
}

impl Backward for CausalAttention {
    fn name(&self) -> &'static str {
        "causal_attention"
    }

    fn backward(
        &self,
        inputs: &[Var],
        out: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let [q, k, v] = inputs else {
            unreachable!("causal attention has three inputs")
        };
        let (q, k, v) = (q.value(), k.value(), v.value());
        let (heads, kv_heads, lse) = (self.heads, self.kv_heads, &self.lse);
        let (dq, dk, dv) = match backend_of("causal_attention backward", &[q, k, v, grad])? {
            Some(be) => be.causal_attention_backward(q, k, v, heads, kv_heads, out, lse, grad)?,
            None => dops::causal_attention_backward(q, k, v, heads, kv_heads, out, lse, grad)?,
        };
        Ok(vec![
            needs[0].then_some(dq),
            needs[1].then_some(dk),
            needs[2].then_some(dv),
        ])
    }
}

/// Causal grouped-query attention as one op: `q` `[batch, q_len, heads·d]` against `k`, `v`
/// `[batch, kv_len, kv_heads·d]`, each key/value head shared by `heads/kv_heads` query heads.
/// The queries are the last `q_len` of the `kv_len` positions (with a KV cache, `k` and `v` hold
/// the cached positions first), and each sees only the keys at or before its own position.
/// Only the per-row log-sum-exp is saved.
pub fn causal_attention(q: &Var, k: &Var, v: &Var, heads: usize, kv_heads: usize) -> Result<Var> {
    let (qt, kt, vt) = (q.value(), k.value(), v.value());
    let (out, lse) = match backend_of("causal_attention", &[qt, kt, vt])? {
        Some(be) => be.causal_attention(qt, kt, vt, heads, kv_heads)?,
        None => dops::causal_attention(qt, kt, vt, heads, kv_heads)?,
    };
    let op = CausalAttention {
        heads,
        kv_heads,
        lse,
    };
    Ok(Var::from_op(out, op, vec![q.clone(), k.clone(), v.clone()]))
}
