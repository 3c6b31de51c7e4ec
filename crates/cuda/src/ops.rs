//! Host-side operations: check shapes, compute the launch configuration, launch by name. The
//! same code drives the GPU and the emulator. Semantics are those of the CPU kernels in
//! `scalpel_tensor::cpu` (overwrite vs accumulate included); sizes must fit the kernels' `int`.

use half::{bf16, f16};
use scalpel_tensor::cpu::attention::AttentionShape;
use scalpel_tensor::cpu::gemm::GemmShape;
use scalpel_tensor::cpu::layernorm::LayerNormShape;

use crate::{CudaError, DeviceBuffer, DeviceElement, KernelArg, LaunchConfig, Result, Runtime};

/// Threads per block of the elementwise and row kernels.
const BLOCK: u32 = 256;
/// Rows per block of the warp-per-row kernels (one warp each).
const ROWS_PER_BLOCK: u32 = BLOCK / 32;
/// Grid-stride kernels need no more blocks than this to fill an H100 (132 SMs x 16).
const MAX_GRID_STRIDE_BLOCKS: usize = 132 * 16;
/// Columns per block of the column-reduction kernels (block 32 x 8).
const REDUCTION_COLS: u32 = 32;

fn int(what: &str, v: usize) -> Result<KernelArg> {
    i32::try_from(v)
        .map(KernelArg::I32)
        .map_err(|_| CudaError::Shape(format!("{what} = {v} does not fit a 32-bit int")))
}

fn expect_len<T: DeviceElement>(
    rt: &Runtime,
    what: &str,
    buffer: &DeviceBuffer<T>,
    len: usize,
) -> Result<()> {
    buffer.check_runtime(rt)?;
    if buffer.len() != len {
        return Err(CudaError::Shape(format!(
            "{what} has {} elements, expected {len}",
            buffer.len()
        )));
    }
    Ok(())
}

fn div_ceil(a: usize, b: usize) -> u32 {
    a.div_ceil(b) as u32
}

fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig::linear(
        n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID_STRIDE_BLOCKS) as u32,
        BLOCK,
    )
}

fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(div_ceil(rows, ROWS_PER_BLOCK as usize).max(1), BLOCK)
}

fn column_reduction(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [div_ceil(cols, REDUCTION_COLS as usize).max(1), 1, 1],
        block: [REDUCTION_COLS, 8, 1],
        shared_bytes: 0,
    }
}

/// `out = a + b`.
pub fn add(
    rt: &Runtime,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = a.len();
    expect_len(rt, "b", b, n)?;
    expect_len(rt, "out", out, n)?;
    // SAFETY: add_f32(int n, const float* a, const float* b, float* out), lengths checked.
    unsafe {
        rt.launch(
            "add_f32",
            grid_stride(n),
            &[int("n", n)?, a.arg(), b.arg(), out.arg()],
        )
    }
}

/// `y += alpha·x`.
pub fn axpy(
    rt: &Runtime,
    alpha: f32,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    // SAFETY: axpy_f32(int n, float alpha, const float* x, float* y), lengths checked.
    unsafe {
        rt.launch(
            "axpy_f32",
            grid_stride(n),
            &[int("n", n)?, KernelArg::F32(alpha), x.arg(), y.arg()],
        )
    }
}

/// `x *= alpha`.
pub fn scale(rt: &Runtime, alpha: f32, x: &mut DeviceBuffer<f32>) -> Result<()> {
    let n = x.len();
    x.check_runtime(rt)?;
    // SAFETY: scale_f32(int n, float alpha, float* x).
    unsafe {
        rt.launch(
            "scale_f32",
            grid_stride(n),
            &[int("n", n)?, KernelArg::F32(alpha), x.arg()],
        )
    }
}

fn rows_of(what: &str, len: usize, cols: usize) -> Result<usize> {
    match len.checked_div(cols) {
        Some(rows) if rows * cols == len => Ok(rows),
        _ => Err(CudaError::Shape(format!(
            "{what} has {len} elements, not a whole number of {cols}-wide rows"
        ))),
    }
}

/// Adds the `cols`-wide `bias` to every row of `x`.
pub fn add_bias(
    rt: &Runtime,
    cols: usize,
    bias: &DeviceBuffer<f32>,
    x: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("x", x.len(), cols)?;
    expect_len(rt, "bias", bias, cols)?;
    x.check_runtime(rt)?;
    let config = grid_stride(x.len());
    // SAFETY: add_bias_f32(int rows, int cols, const float* bias, float* x), lengths checked.
    unsafe {
        rt.launch(
            "add_bias_f32",
            config,
            &[int("rows", rows)?, int("cols", cols)?, bias.arg(), x.arg()],
        )
    }
}

/// `dbias += Σ_rows dy`.
pub fn bias_backward(
    rt: &Runtime,
    cols: usize,
    dy: &DeviceBuffer<f32>,
    dbias: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("dy", dy.len(), cols)?;
    expect_len(rt, "dbias", dbias, cols)?;
    dy.check_runtime(rt)?;
    // SAFETY: bias_backward_f32(int rows, int cols, const float* dy, float* dbias).
    unsafe {
        rt.launch(
            "bias_backward_f32",
            column_reduction(cols),
            &[
                int("rows", rows)?,
                int("cols", cols)?,
                dy.arg(),
                dbias.arg(),
            ],
        )
    }
}

/// Half-precision element types the tensor-core GEMM takes.
pub trait HalfElement: DeviceElement {
    /// Kernel name prefix (`gemm_f16`) and cast kernel (`cast_f32_to_f16`).
    const GEMM: &'static str;
    const CAST: &'static str;
}
impl HalfElement for f16 {
    const GEMM: &'static str = "gemm_f16";
    const CAST: &'static str = "cast_f32_to_f16";
}
impl HalfElement for bf16 {
    const GEMM: &'static str = "gemm_bf16";
    const CAST: &'static str = "cast_f32_to_bf16";
}

/// Rounds `x` to `T` elementwise on the device.
pub fn cast<T: HalfElement>(
    rt: &Runtime,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    // SAFETY: cast_f32_to_{f16,bf16}(int n, const float* x, T* y), lengths checked.
    unsafe { rt.launch(T::CAST, grid_stride(n), &[int("n", n)?, x.arg(), y.arg()]) }
}

/// A GEMM kernel family: entry points `{prefix}_{nn,nt,tn,tt}`, square block tiles of `tile`.
struct GemmKernel {
    prefix: &'static str,
    tile: usize,
    threads: u32,
}

/// A matrix operand: a buffer and the element offset of the matrix in it (a batch's i-th).
type Operand<'a, B> = (B, usize);

fn gemm_launch<T: DeviceElement>(
    rt: &Runtime,
    kernel: GemmKernel,
    s: GemmShape,
    (a, a_at): Operand<&DeviceBuffer<T>>,
    (b, b_at): Operand<&DeviceBuffer<T>>,
    (c, c_at): Operand<&mut DeviceBuffer<f32>>,
    beta: f32,
) -> Result<()> {
    expect_len_at(rt, "A", a, a_at, s.m * s.k)?;
    expect_len_at(rt, "B", b, b_at, s.k * s.n)?;
    expect_len_at(rt, "C", c, c_at, s.m * s.n)?;
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    let variant = match (s.trans_a, s.trans_b) {
        (false, false) => "nn",
        (false, true) => "nt",
        (true, false) => "tn",
        (true, true) => "tt",
    };
    let config = LaunchConfig {
        grid: [div_ceil(s.n, kernel.tile), div_ceil(s.m, kernel.tile), 1],
        block: [kernel.threads, 1, 1],
        shared_bytes: 0,
    };
    let args = [
        int("m", s.m)?,
        int("n", s.n)?,
        int("k", s.k)?,
        a.arg_at(a_at)?,
        b.arg_at(b_at)?,
        c.arg_at(c_at)?,
        KernelArg::F32(beta),
    ];
    // SAFETY: gemm_*(int m, int n, int k, const T* a, const T* b, float* c, float beta), each
    // matrix checked to lie inside its buffer.
    unsafe { rt.launch(&format!("{}_{variant}", kernel.prefix), config, &args) }
}

/// Checks that `len` elements from `at` lie inside `buffer`.
fn expect_len_at<T: DeviceElement>(
    rt: &Runtime,
    what: &str,
    buffer: &DeviceBuffer<T>,
    at: usize,
    len: usize,
) -> Result<()> {
    buffer.check_runtime(rt)?;
    if at + len > buffer.len() {
        return Err(CudaError::Shape(format!(
            "{what}: {len} elements from offset {at} in a buffer of {}",
            buffer.len()
        )));
    }
    Ok(())
}

const GEMM_F32: GemmKernel = GemmKernel {
    prefix: "gemm_f32",
    tile: 64,
    threads: 256,
};

/// [`gemm`] on matrices inside larger buffers (one matrix of a batch each), `beta` = 0.
pub fn gemm_at(
    rt: &Runtime,
    s: GemmShape,
    a: Operand<&DeviceBuffer<f32>>,
    b: Operand<&DeviceBuffer<f32>>,
    c: Operand<&mut DeviceBuffer<f32>>,
) -> Result<()> {
    gemm_launch(rt, GEMM_F32, s, a, b, c, 0.0)
}

/// `C = op(A)·op(B) + beta·C` in f32 (beta = 0 overwrites C without reading it).
pub fn gemm(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    c: &mut DeviceBuffer<f32>,
    beta: f32,
) -> Result<()> {
    expect_len(rt, "A", a, s.m * s.k)?;
    expect_len(rt, "B", b, s.k * s.n)?;
    expect_len(rt, "C", c, s.m * s.n)?;
    gemm_launch(rt, GEMM_F32, s, (a, 0), (b, 0), (c, 0), beta)
}

/// [`gemm`] on tensor cores: f16 or bf16 operands, f32 accumulation and output.
pub fn gemm_half<T: HalfElement>(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    c: &mut DeviceBuffer<f32>,
    beta: f32,
) -> Result<()> {
    expect_len(rt, "A", a, s.m * s.k)?;
    expect_len(rt, "B", b, s.k * s.n)?;
    expect_len(rt, "C", c, s.m * s.n)?;
    gemm_launch(
        rt,
        GemmKernel {
            prefix: T::GEMM,
            tile: 64,
            threads: 128,
        },
        s,
        (a, 0),
        (b, 0),
        (c, 0),
        beta,
    )
}

pub fn gelu_forward(rt: &Runtime, x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    // SAFETY: gelu_forward_f32(int n, const float* x, float* y), lengths checked.
    unsafe {
        rt.launch(
            "gelu_forward_f32",
            grid_stride(n),
            &[int("n", n)?, x.arg(), y.arg()],
        )
    }
}

/// Overwrites `dx`.
pub fn gelu_backward(
    rt: &Runtime,
    x: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "dy", dy, n)?;
    expect_len(rt, "dx", dx, n)?;
    // SAFETY: gelu_backward_f32(int n, const float* x, const float* dy, float* dx), lengths checked.
    unsafe {
        rt.launch(
            "gelu_backward_f32",
            grid_stride(n),
            &[int("n", n)?, x.arg(), dy.arg(), dx.arg()],
        )
    }
}

/// Saves `mean` and `rstd` (one per row) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    rt: &Runtime,
    s: &LayerNormShape,
    x: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f32>,
    beta: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
    mean: &mut DeviceBuffer<f32>,
    rstd: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = s.rows * s.cols;
    expect_len(rt, "x", x, n)?;
    expect_len(rt, "y", y, n)?;
    expect_len(rt, "gamma", gamma, s.cols)?;
    expect_len(rt, "beta", beta, s.cols)?;
    expect_len(rt, "mean", mean, s.rows)?;
    expect_len(rt, "rstd", rstd, s.rows)?;
    let args = [
        int("rows", s.rows)?,
        int("cols", s.cols)?,
        KernelArg::F32(s.eps as f32),
        x.arg(),
        gamma.arg(),
        beta.arg(),
        y.arg(),
        mean.arg(),
        rstd.arg(),
    ];
    // SAFETY: layernorm_forward_f32(int rows, int cols, float eps, x, gamma, beta, y, mean, rstd).
    unsafe { rt.launch("layernorm_forward_f32", warp_per_row(s.rows), &args) }
}

/// Overwrites `dx`; accumulates into `dgamma` and `dbeta` (parameter gradients).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    rt: &Runtime,
    s: &LayerNormShape,
    x: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f32>,
    mean: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
    dgamma: &mut DeviceBuffer<f32>,
    dbeta: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = s.rows * s.cols;
    for (what, b, len) in [
        ("x", x, n),
        ("dy", dy, n),
        ("dx", &*dx, n),
        ("gamma", gamma, s.cols),
    ] {
        expect_len(rt, what, b, len)?;
    }
    for (what, b, len) in [
        ("mean", mean, s.rows),
        ("rstd", rstd, s.rows),
        ("dgamma", &*dgamma, s.cols),
        ("dbeta", &*dbeta, s.cols),
    ] {
        expect_len(rt, what, b, len)?;
    }
    let (rows, cols) = (int("rows", s.rows)?, int("cols", s.cols)?);
    // SAFETY: layernorm_backward_dx_f32(rows, cols, x, gamma, mean, rstd, dy, dx), lengths checked.
    unsafe {
        rt.launch(
            "layernorm_backward_dx_f32",
            warp_per_row(s.rows),
            &[
                rows,
                cols,
                x.arg(),
                gamma.arg(),
                mean.arg(),
                rstd.arg(),
                dy.arg(),
                dx.arg(),
            ],
        )?;
    }
    // SAFETY: layernorm_backward_params_f32(rows, cols, x, mean, rstd, dy, dgamma, dbeta).
    unsafe {
        rt.launch(
            "layernorm_backward_params_f32",
            column_reduction(s.cols),
            &[
                rows,
                cols,
                x.arg(),
                mean.arg(),
                rstd.arg(),
                dy.arg(),
                dgamma.arg(),
                dbeta.arg(),
            ],
        )
    }
}

/// Softmax of each `cols`-wide row.
pub fn softmax_forward(
    rt: &Runtime,
    cols: usize,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("x", x.len(), cols)?;
    expect_len(rt, "y", y, x.len())?;
    // SAFETY: softmax_forward_f32(int rows, int cols, const float* x, float* y), lengths checked.
    unsafe {
        rt.launch(
            "softmax_forward_f32",
            warp_per_row(rows),
            &[int("rows", rows)?, int("cols", cols)?, x.arg(), y.arg()],
        )
    }
}

/// `dx = y ∘ (dy − Σ dy∘y)` per row; overwrites `dx`.
pub fn softmax_backward(
    rt: &Runtime,
    cols: usize,
    y: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("y", y.len(), cols)?;
    expect_len(rt, "dy", dy, y.len())?;
    expect_len(rt, "dx", dx, y.len())?;
    let args = [
        int("rows", rows)?,
        int("cols", cols)?,
        y.arg(),
        dy.arg(),
        dx.arg(),
    ];
    // SAFETY: softmax_backward_f32(int rows, int cols, y, dy, dx), lengths checked.
    unsafe { rt.launch("softmax_backward_f32", warp_per_row(rows), &args) }
}

/// Mean over rows of `−log softmax(logits)[target]`; writes the softmax into `probs` for the
/// backward. Targets must be `< cols` (not checked on the device).
pub fn cross_entropy_forward(
    rt: &Runtime,
    cols: usize,
    logits: &DeviceBuffer<f32>,
    targets: &DeviceBuffer<i32>,
    probs: &mut DeviceBuffer<f32>,
) -> Result<f32> {
    let rows = rows_of("logits", logits.len(), cols)?;
    expect_len(rt, "targets", targets, rows)?;
    expect_len(rt, "probs", probs, logits.len())?;
    let row_loss = rt.zeros::<f32>(rows)?;
    let args = [
        int("rows", rows)?,
        int("cols", cols)?,
        logits.arg(),
        targets.arg(),
        probs.arg(),
        row_loss.arg(),
    ];
    // SAFETY: cross_entropy_forward_f32(rows, cols, logits, int* targets, probs, row_loss).
    unsafe { rt.launch("cross_entropy_forward_f32", warp_per_row(rows), &args)? };
    let losses = row_loss.to_host()?;
    Ok(losses.iter().sum::<f32>() / rows as f32)
}

/// `dlogits = dloss · (probs − onehot(target)) / rows`; overwrites `dlogits`.
pub fn cross_entropy_backward(
    rt: &Runtime,
    cols: usize,
    probs: &DeviceBuffer<f32>,
    targets: &DeviceBuffer<i32>,
    dloss: f32,
    dlogits: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("probs", probs.len(), cols)?;
    expect_len(rt, "targets", targets, rows)?;
    expect_len(rt, "dlogits", dlogits, probs.len())?;
    let args = [
        int("rows", rows)?,
        int("cols", cols)?,
        probs.arg(),
        targets.arg(),
        KernelArg::F32(dloss),
        dlogits.arg(),
    ];
    // SAFETY: cross_entropy_backward_f32(rows, cols, probs, int* targets, float dloss, dlogits).
    unsafe {
        rt.launch(
            "cross_entropy_backward_f32",
            grid_stride(probs.len()),
            &args,
        )
    }
}

/// `out[i] = i mod period` (position ids for `period = seq`, token types for `period = 1`).
pub fn repeated_range(rt: &Runtime, period: usize, out: &mut DeviceBuffer<i32>) -> Result<()> {
    out.check_runtime(rt)?;
    if period == 0 {
        return Err(CudaError::Shape("a range with period 0".into()));
    }
    let n = out.len();
    // SAFETY: repeated_range_i32(int n, int period, int* out), `n` the buffer's length.
    unsafe {
        rt.launch(
            "repeated_range_i32",
            grid_stride(n),
            &[int("n", n)?, int("period", period)?, out.arg()],
        )
    }
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
    let args = [
        int("rows", rows)?,
        int("dim", dim)?,
        table.arg(),
        ids.arg(),
        out.arg(),
    ];
    // SAFETY: embedding_forward_f32(int rows, int dim, table, const int* ids, out), lengths checked.
    unsafe { rt.launch("embedding_forward_f32", grid_stride(rows * dim), &args) }
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
    let args = [
        int("rows", rows)?,
        int("dim", dim)?,
        ids.arg(),
        dout.arg(),
        dtable.arg(),
    ];
    // SAFETY: embedding_backward_f32(int rows, int dim, const int* ids, dout, dtable), lengths checked.
    unsafe { rt.launch("embedding_backward_f32", grid_stride(rows * dim), &args) }
}

/// `x` is `[batch, seq, dim]`, `mask` `[batch, seq]`, `out` `[batch, dim]`.
pub fn mean_pool_forward(
    rt: &Runtime,
    seq: usize,
    dim: usize,
    x: &DeviceBuffer<f32>,
    mask: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let batch = rows_of("mask", mask.len(), seq)?;
    expect_len(rt, "x", x, batch * seq * dim)?;
    expect_len(rt, "out", out, batch * dim)?;
    let args = [
        int("batch", batch)?,
        int("seq", seq)?,
        int("dim", dim)?,
        x.arg(),
        mask.arg(),
        out.arg(),
    ];
    // SAFETY: mean_pool_forward_f32(int batch, int seq, int dim, x, mask, out), lengths checked.
    unsafe { rt.launch("mean_pool_forward_f32", grid_stride(batch * dim), &args) }
}

/// Overwrites `dx`: each unmasked token receives `mask·dout / count`.
pub fn mean_pool_backward(
    rt: &Runtime,
    seq: usize,
    dim: usize,
    mask: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let batch = rows_of("mask", mask.len(), seq)?;
    expect_len(rt, "dout", dout, batch * dim)?;
    expect_len(rt, "dx", dx, batch * seq * dim)?;
    let args = [
        int("batch", batch)?,
        int("seq", seq)?,
        int("dim", dim)?,
        mask.arg(),
        dout.arg(),
        dx.arg(),
    ];
    // SAFETY: mean_pool_backward_f32(int batch, int seq, int dim, mask, dout, dx), lengths checked.
    unsafe { rt.launch("mean_pool_backward_f32", warp_per_row(batch * seq), &args) }
}

/// `y = x / max(‖x‖, ε)` per `dim`-wide row; `norms` saves `‖x‖` for the backward.
pub fn l2_normalize_forward(
    rt: &Runtime,
    dim: usize,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
    norms: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("x", x.len(), dim)?;
    expect_len(rt, "y", y, x.len())?;
    expect_len(rt, "norms", norms, rows)?;
    let args = [
        int("rows", rows)?,
        int("dim", dim)?,
        x.arg(),
        y.arg(),
        norms.arg(),
    ];
    // SAFETY: l2_normalize_forward_f32(int rows, int dim, x, y, norms), lengths checked.
    unsafe { rt.launch("l2_normalize_forward_f32", warp_per_row(rows), &args) }
}

/// `dx = (dy − y·(y·dy)) / ‖x‖`, or `dy/ε` where the norm was clamped; overwrites `dx`.
pub fn l2_normalize_backward(
    rt: &Runtime,
    dim: usize,
    y: &DeviceBuffer<f32>,
    norms: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("y", y.len(), dim)?;
    expect_len(rt, "norms", norms, rows)?;
    expect_len(rt, "dy", dy, y.len())?;
    expect_len(rt, "dx", dx, y.len())?;
    let args = [
        int("rows", rows)?,
        int("dim", dim)?,
        y.arg(),
        norms.arg(),
        dy.arg(),
        dx.arg(),
    ];
    // SAFETY: l2_normalize_backward_f32(int rows, int dim, y, norms, dy, dx), lengths checked.
    unsafe { rt.launch("l2_normalize_backward_f32", warp_per_row(rows), &args) }
}

/// Threads per block of the attention kernels (`BLOCK_THREADS` in attention.cu).
const ATTENTION_THREADS: u32 = 128;
/// Rows of the streamed operand staged per shared-memory tile (`TILE_ROWS` in attention.cu).
const ATTENTION_TILE_ROWS: u32 = 32;
/// Head dims each lane of a row's lane group owns (`4 * LANE_CHUNKS` in attention.cu).
const ATTENTION_DIMS_PER_LANE: usize = 16;
/// The largest lane group, so head_dim ≤ 64: wider heads would need over 48 KiB of shared
/// memory per block (an opt-in the launch path does not make).
const ATTENTION_MAX_GROUP: usize = 4;

/// Lanes per row for `head_dim`, and the launch: one block per (row tile, head, batch). Shared
/// memory per staged row (`AttentionShared`): two tiles of `4·group` float4 chunks, one partial
/// sum per thread, and `stats_per_row` floats (key bias, or lse and delta).
fn attention_launch(s: &AttentionShape, stats_per_row: u32) -> Result<(KernelArg, LaunchConfig)> {
    let group = s
        .head_dim
        .div_ceil(ATTENTION_DIMS_PER_LANE)
        .next_power_of_two();
    if group > ATTENTION_MAX_GROUP {
        return Err(CudaError::Shape(format!(
            "attention head_dim {} is over the kernels' {}",
            s.head_dim,
            ATTENTION_DIMS_PER_LANE * ATTENTION_MAX_GROUP
        )));
    }
    let rows_per_block = ATTENTION_THREADS as usize / group;
    let lane_row_bytes = (ATTENTION_DIMS_PER_LANE * 4) as u32;
    let config = LaunchConfig {
        grid: [
            div_ceil(s.seq, rows_per_block),
            u32::try_from(s.heads).map_err(|_| CudaError::Shape("too many heads".into()))?,
            u32::try_from(s.batch).map_err(|_| CudaError::Shape("batch too large".into()))?,
        ],
        block: [ATTENTION_THREADS, 1, 1],
        shared_bytes: ATTENTION_TILE_ROWS
            * (2 * group as u32 * lane_row_bytes + 4 * ATTENTION_THREADS + 4 * stats_per_row),
    };
    Ok((int("group", group)?, config))
}

fn attention_lengths(
    rt: &Runtime,
    s: &AttentionShape,
    tensors: &[(&str, &DeviceBuffer<f32>)],
    mask: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
) -> Result<()> {
    for (what, t) in tensors {
        expect_len(rt, what, t, s.batch * s.seq * s.width())?;
    }
    expect_len(rt, "mask", mask, s.batch * s.seq)?;
    expect_len(rt, "lse", lse, s.batch * s.heads * s.seq)?;
    int("batch·seq·width", s.batch * s.seq * s.width())?;
    Ok(())
}

fn attention_common(s: &AttentionShape) -> Result<[KernelArg; 4]> {
    Ok([
        int("seq", s.seq)?,
        int("heads", s.heads)?,
        int("head_dim", s.head_dim)?,
        KernelArg::F32(1.0 / (s.head_dim as f32).sqrt()),
    ])
}

/// Fused attention forward: `q`, `k`, `v`, `out` are `[batch, seq, heads·head_dim]`, `mask`
/// `[batch, seq]` (1 token, 0 padding); saves `lse` (`[batch, heads, seq]`) for the backward.
/// Rows whose keys are all padding get zero output and `lse = −∞`. `head_dim` ≤ 64.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    rt: &Runtime,
    s: &AttentionShape,
    q: &DeviceBuffer<f32>,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    mask: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    attention_lengths(
        rt,
        s,
        &[("q", q), ("k", k), ("v", v), ("out", out)],
        mask,
        lse,
    )?;
    if s.batch * s.seq * s.heads == 0 {
        return Ok(());
    }
    let (group, config) = attention_launch(s, 1)?;
    let [seq, heads, head_dim, scale] = attention_common(s)?;
    let args = [
        seq,
        heads,
        head_dim,
        group,
        scale,
        q.arg(),
        k.arg(),
        v.arg(),
        mask.arg(),
        out.arg(),
        lse.arg(),
    ];
    // SAFETY: attention_forward_f32(seq, heads, head_dim, group, scale, q, k, v, mask, out, lse),
    // lengths checked, grid and shared memory from attention_launch.
    unsafe { rt.launch("attention_forward_f32", config, &args) }
}

/// Gradients of [`attention_forward`] from its saved `out` and `lse`; overwrites `dq`, `dk`,
/// `dv`. Deterministic (no atomics): a dQ kernel per query tile, then a dK/dV kernel per key tile.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    rt: &Runtime,
    s: &AttentionShape,
    q: &DeviceBuffer<f32>,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    mask: &DeviceBuffer<f32>,
    out: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<f32>,
    dq: &mut DeviceBuffer<f32>,
    dk: &mut DeviceBuffer<f32>,
    dv: &mut DeviceBuffer<f32>,
) -> Result<()> {
    attention_lengths(
        rt,
        s,
        &[
            ("q", q),
            ("k", k),
            ("v", v),
            ("out", out),
            ("dout", dout),
            ("dq", dq),
            ("dk", dk),
            ("dv", dv),
        ],
        mask,
        lse,
    )?;
    if s.batch * s.seq * s.heads == 0 {
        return Ok(());
    }
    let delta = rt.zeros::<f32>(lse.len())?;
    let [seq, heads, head_dim, scale] = attention_common(s)?;
    let (group, config) = attention_launch(s, 1)?;
    let args = [
        seq,
        heads,
        head_dim,
        group,
        scale,
        q.arg(),
        k.arg(),
        v.arg(),
        mask.arg(),
        out.arg(),
        lse.arg(),
        dout.arg(),
        dq.arg(),
        delta.arg(),
    ];
    // SAFETY: attention_backward_dq_f32(seq, heads, head_dim, group, scale, q, k, v, mask, out,
    // lse, dout, dq, delta), lengths checked (delta has lse's), launch from attention_launch.
    unsafe { rt.launch("attention_backward_dq_f32", config, &args)? };
    let (group, config) = attention_launch(s, 2)?;
    let args = [
        seq,
        heads,
        head_dim,
        group,
        scale,
        q.arg(),
        k.arg(),
        v.arg(),
        mask.arg(),
        lse.arg(),
        delta.arg(),
        dout.arg(),
        dk.arg(),
        dv.arg(),
    ];
    // SAFETY: attention_backward_dkdv_f32(seq, heads, head_dim, group, scale, q, k, v, mask, lse,
    // delta, dout, dk, dv), lengths checked, launch from attention_launch.
    unsafe { rt.launch("attention_backward_dkdv_f32", config, &args) }
}

/// How an Adam step applies weight decay (crates/autograd/src/optim.rs `Decay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDecay {
    /// AdamW: `p *= 1 − lr·wd` before the update.
    Decoupled,
    /// Adam with L2: `g += wd·p`.
    L2,
}

/// The hyper-parameters of one Adam step; `step` is 1-based.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay: WeightDecay,
    pub step: u32,
}

/// One fused Adam/AdamW step over flat buffers, exactly as optim.rs's `update`: updates `params`
/// and the moments `m`, `v` in place from `grads`.
pub fn adam_step(
    rt: &Runtime,
    c: &AdamStep,
    params: &mut DeviceBuffer<f32>,
    grads: &DeviceBuffer<f32>,
    m: &mut DeviceBuffer<f32>,
    v: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = params.len();
    expect_len(rt, "params", params, n)?;
    expect_len(rt, "grads", grads, n)?;
    expect_len(rt, "m", m, n)?;
    expect_len(rt, "v", v, n)?;
    if c.step == 0 {
        return Err(CudaError::Shape("Adam steps count from 1".into()));
    }
    let t = c.step as i32;
    let decoupled = c.decay == WeightDecay::Decoupled;
    let f = |x: f64| KernelArg::F32(x as f32);
    let args = [
        int("n", n)?,
        f(c.lr / (1.0 - c.beta1.powi(t))),
        f((1.0 - c.beta2.powi(t)).sqrt()),
        f(c.beta1),
        f(c.beta2),
        f(1.0 - c.beta1),
        f(1.0 - c.beta2),
        f(c.eps),
        f(if decoupled {
            1.0 - c.lr * c.weight_decay
        } else {
            1.0
        }),
        f(if decoupled { 0.0 } else { c.weight_decay }),
        params.arg(),
        grads.arg(),
        m.arg(),
        v.arg(),
    ];
    // SAFETY: adamw_step_f32(int n, 9 floats, float* p, const float* g, float* m, float* v),
    // lengths checked.
    unsafe { rt.launch("adamw_step_f32", grid_stride(n), &args) }
}

/// Blocks of the first sum-of-squares pass: enough to fill an H100, few enough for one block
/// to finish.
const MAX_REDUCTION_BLOCKS: usize = 1024;

/// `Σ x²` over the whole buffer (for global-norm gradient clipping), deterministic for a given
/// length: per-block partial sums, then one block sums them.
pub fn sum_of_squares(rt: &Runtime, x: &DeviceBuffer<f32>) -> Result<f32> {
    sum_of_squares_all(rt, &[x])
}

/// `Σ` over `buffers` of `Σ x²`, read back once: each buffer's sum lands in one slot of a device
/// array, and one more pass adds the slots (the global gradient norm costs 4 bytes of traffic,
/// not one read-back per parameter).
pub fn sum_of_squares_all(rt: &Runtime, buffers: &[&DeviceBuffer<f32>]) -> Result<f32> {
    if buffers.is_empty() {
        return Ok(0.0);
    }
    let totals = rt.uninit::<f32>(buffers.len())?;
    let partial = rt.uninit::<f32>(MAX_REDUCTION_BLOCKS)?;
    for (i, x) in buffers.iter().enumerate() {
        x.check_runtime(rt)?;
        let n = x.len();
        let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_REDUCTION_BLOCKS);
        // SAFETY: sum_squares_partial_f32(int n, const float* x, float* partial), one partial
        // per block of BLOCK threads, `blocks` ≤ the partial buffer's length.
        unsafe {
            rt.launch(
                "sum_squares_partial_f32",
                LaunchConfig::linear(blocks as u32, BLOCK),
                &[int("n", n)?, x.arg(), partial.arg()],
            )?
        };
        // SAFETY: sum_partials_f32(int count, const float* partial, float* out), one block,
        // writing slot i of `totals`.
        unsafe {
            rt.launch(
                "sum_partials_f32",
                LaunchConfig::linear(1, BLOCK),
                &[int("count", blocks)?, partial.arg(), totals.arg_at(i)?],
            )?
        };
    }
    let total = rt.uninit::<f32>(1)?;
    // SAFETY: as above, over the per-buffer totals.
    unsafe {
        rt.launch(
            "sum_partials_f32",
            LaunchConfig::linear(1, BLOCK),
            &[int("count", buffers.len())?, totals.arg(), total.arg()],
        )?
    };
    Ok(total.to_host()?[0])
}
