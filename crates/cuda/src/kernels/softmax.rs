//! `kernels/softmax.cu`: row softmax and softmax cross-entropy, forward and backward; and their
//! checks.

use scalpel_tensor::cpu::softmax;

use super::{expect_len, grid_stride, rows_of, warp_per_row};
use crate::check::{check, max_rel_error, narrow, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("softmax");

/// Softmax of each `cols`-wide row.
pub fn softmax_forward(
    rt: &Runtime,
    cols: usize,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("x", x.len(), cols)?;
    expect_len(rt, "y", y, x.len())?;
    // SAFETY: lengths checked.
    unsafe {
        launch::softmax_forward_f32(rt, warp_per_row(rows), rows, cols, x.input(), y.output())
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
    // SAFETY: lengths checked.
    unsafe {
        launch::softmax_backward_f32(
            rt,
            warp_per_row(rows),
            rows,
            cols,
            y.input(),
            dy.input(),
            dx.output(),
        )
    }
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
    let mut row_loss = rt.zeros::<f32>(rows)?;
    // SAFETY: lengths checked, one loss per row.
    unsafe {
        launch::cross_entropy_forward_f32(
            rt,
            warp_per_row(rows),
            rows,
            cols,
            logits.input(),
            targets.input(),
            probs.output(),
            row_loss.output(),
        )?
    };
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
    // SAFETY: lengths checked.
    unsafe {
        launch::cross_entropy_backward_f32(
            rt,
            grid_stride(probs.len()),
            rows,
            cols,
            probs.input(),
            targets.input(),
            dloss,
            dlogits.output(),
        )
    }
}

pub fn check_softmax(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(7);
    let (x, dy) = (rng.uniform(n, -8.0, 8.0), rng.uniform(n, -1.0, 1.0));
    let mut y = rt.zeros(n)?;
    softmax_forward(rt, cols, &rt.upload(&x)?, &mut y)?;
    let mut want_y = vec![0.0; n];
    softmax::softmax_forward_reference(cols, &wide(&x), &mut want_y);
    let forward = check(
        "softmax_forward_f32",
        case.clone(),
        max_rel_error(&y.to_host()?, &want_y),
        F32_TOLERANCE,
    );

    let y32 = narrow(&want_y);
    let mut dx = rt.upload(&vec![f32::NAN; n])?;
    softmax_backward(rt, cols, &rt.upload(&y32)?, &rt.upload(&dy)?, &mut dx)?;
    let mut want_dx = vec![0.0; n];
    softmax::softmax_backward_reference(cols, &wide(&y32), &wide(&dy), &mut want_dx);
    let backward = check(
        "softmax_backward_f32",
        case,
        max_rel_error(&dx.to_host()?, &want_dx),
        F32_TOLERANCE,
    );
    Ok(vec![forward, backward])
}

pub fn check_cross_entropy(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(8);
    let logits = rng.uniform(n, -6.0, 6.0);
    let targets = rng.below(rows, cols);
    let device_targets = rt.upload(&targets.iter().map(|&t| t as i32).collect::<Vec<_>>())?;
    let mut probs = rt.zeros(n)?;
    let loss = cross_entropy_forward(rt, cols, &rt.upload(&logits)?, &device_targets, &mut probs)?;
    let mut want_probs = vec![0.0; n];
    let want_loss = softmax::cross_entropy_forward(cols, &wide(&logits), &targets, &mut want_probs);
    let forward = worst(&[
        max_rel_error(&probs.to_host()?, &want_probs),
        max_rel_error(&[loss], &[want_loss]),
    ]);

    let p32 = narrow(&want_probs);
    let mut dlogits = rt.upload(&vec![f32::NAN; n])?;
    cross_entropy_backward(
        rt,
        cols,
        &rt.upload(&p32)?,
        &device_targets,
        1.7,
        &mut dlogits,
    )?;
    let mut want = vec![0.0; n];
    softmax::cross_entropy_backward(cols, &wide(&p32), &targets, 1.7f32 as f64, &mut want);
    Ok(vec![
        check(
            "cross_entropy_forward_f32",
            case.clone(),
            forward,
            F32_TOLERANCE,
        ),
        check(
            "cross_entropy_backward_f32",
            case,
            max_rel_error(&dlogits.to_host()?, &want),
            F32_TOLERANCE,
        ),
    ])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = check_softmax(rt, 19, 133)?;
    out.extend(check_cross_entropy(rt, 13, 150)?);
    Ok(out)
}
