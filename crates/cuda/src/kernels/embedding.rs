//! `kernels/embedding.cu`: embedding gather and scatter-add backward, and the position/token-type
//! ranges made on the device; and their checks.

use scalpel_tensor::cpu::embedding;

use super::{expect_len, grid_stride, rows_of};
use crate::check::{check, max_rel_error, wide, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{CudaError, DeviceBuffer, Result, Runtime};

launchers!("embedding");

/// `out[i] = i mod period` (position ids for `period = seq`, token types for `period = 1`).
pub fn repeated_range(rt: &Runtime, period: usize, out: &mut DeviceBuffer<i32>) -> Result<()> {
    out.check_runtime(rt)?;
    if period == 0 {
        return Err(CudaError::Shape("a range with period 0".into()));
    }
    let n = out.len();
    // SAFETY: `n` is the buffer's length.
    unsafe { launch::repeated_range_i32(rt, grid_stride(n), n, period, out.output()) }
}

/// `out[i] = table[ids[i]]` for `dim`-wide rows. Ids must be below the table's row count: the
/// device does not check them (check on the host where they come from).
pub fn embedding_forward(
    rt: &Runtime,
    dim: usize,
    table: &DeviceBuffer<f32>,
    ids: &DeviceBuffer<i32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    rows_of("table", table.len(), dim)?;
    let rows = ids.len();
    expect_len(rt, "out", out, rows * dim)?;
    ids.check_runtime(rt)?;
    table.check_runtime(rt)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::embedding_forward_f32(
            rt,
            grid_stride(rows * dim),
            rows,
            dim,
            table.input(),
            ids.input(),
            out.output(),
        )
    }
}

/// `dtable[ids[i]] += dout[i]`; repeated ids accumulate. Ids as for [`embedding_forward`].
pub fn embedding_backward(
    rt: &Runtime,
    dim: usize,
    ids: &DeviceBuffer<i32>,
    dout: &DeviceBuffer<f32>,
    dtable: &mut DeviceBuffer<f32>,
) -> Result<()> {
    rows_of("dtable", dtable.len(), dim)?;
    let rows = ids.len();
    expect_len(rt, "dout", dout, rows * dim)?;
    ids.check_runtime(rt)?;
    dtable.check_runtime(rt)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::embedding_backward_f32(
            rt,
            grid_stride(rows * dim),
            rows,
            dim,
            ids.input(),
            dout.input(),
            dtable.output(),
        )
    }
}

pub fn check_embedding(
    rt: &Runtime,
    vocab: usize,
    rows: usize,
    dim: usize,
) -> Result<Vec<KernelCheck>> {
    let case = format!("vocab={vocab} rows={rows} dim={dim}");
    let mut rng = Inputs::new(9);
    let table = rng.uniform(vocab * dim, -1.0, 1.0);
    // Few distinct ids, so the backward's scatter-add accumulates repeats.
    let ids = rng.below(rows, vocab.min(7));
    let dout = rng.uniform(rows * dim, -1.0, 1.0);
    let dtable0 = rng.uniform(vocab * dim, -1.0, 1.0);
    let device_ids = rt.upload(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;

    let mut out = rt.zeros(rows * dim)?;
    embedding_forward(rt, dim, &rt.upload(&table)?, &device_ids, &mut out)?;
    let mut want = vec![0.0; rows * dim];
    embedding::embedding_forward(dim, &wide(&table), &ids, &mut want);
    let forward = check(
        "embedding_forward_f32",
        case.clone(),
        max_rel_error(&out.to_host()?, &want),
        F32_TOLERANCE,
    );

    let mut dtable = rt.upload(&dtable0)?;
    embedding_backward(rt, dim, &device_ids, &rt.upload(&dout)?, &mut dtable)?;
    let mut want = wide(&dtable0);
    embedding::embedding_backward(dim, &ids, &wide(&dout), &mut want);
    let backward = check(
        "embedding_backward_f32",
        case.clone(),
        max_rel_error(&dtable.to_host()?, &want),
        F32_TOLERANCE,
    );

    let period = dim.max(2) - 1;
    let mut positions = rt.zeros::<i32>(rows * dim)?;
    repeated_range(rt, period, &mut positions)?;
    let mut want = vec![0i32; rows * dim];
    embedding::repeated_range(period, &mut want);
    let as_f32 = |v: &[i32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let ranges = check(
        "repeated_range_i32",
        format!("{case} period={period}"),
        max_rel_error(
            &as_f32(&positions.to_host()?),
            &want.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        ),
        0.0,
    );
    Ok(vec![forward, backward, ranges])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_embedding(rt, 23, 41, 37)
}
