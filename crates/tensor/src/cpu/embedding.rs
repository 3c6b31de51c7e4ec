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

/// `out[i] = i mod period`: position ids of rows of equal length (`period` = the length), or
/// token types (`period` = 1). The CUDA twin is `repeated_range_i32`.
pub fn repeated_range<T: TryFrom<usize>>(period: usize, out: &mut [T]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = T::try_from(i % period.max(1))
            .unwrap_or_else(|_| panic!("index {} does not fit the output type", i % period));
    }
}
