//! Embedding lookup (a row gather) and its backward (a scatter-add into the table's gradient).

use crate::Float;

/// `out[i] = table[ids[i]]`; ids are checked against the table size by `ops`.
pub fn embedding_forward<F: Float>(dim: usize, table: &[F], ids: &[usize], out: &mut [F]) {
    for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
        o.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
}

/// `dtable[ids[i]] += dout[i]`; repeated ids accumulate.
pub fn embedding_backward<F: Float>(dim: usize, ids: &[usize], dout: &[F], dtable: &mut [F]) {
    for (d, &id) in dout.chunks_exact(dim).zip(ids) {
        for (t, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(d) {
            *t += g;
        }
    }
}
