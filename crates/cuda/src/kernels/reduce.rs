//! `kernels/reduce.cu`: the deterministic sum of squares behind global-norm clipping; and its
//! check.

use super::BLOCK;
use crate::check::{check, max_rel_error, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, LaunchConfig, Result, Runtime};

launchers!("reduce");

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
    let mut totals = rt.uninit::<f32>(buffers.len())?;
    let mut partial = rt.uninit::<f32>(MAX_REDUCTION_BLOCKS)?;
    for (i, x) in buffers.iter().enumerate() {
        x.check_runtime(rt)?;
        let n = x.len();
        let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_REDUCTION_BLOCKS);
        // SAFETY: one partial per block of BLOCK threads, `blocks` ≤ the partial buffer's
        // length; then one block writing slot i of `totals`.
        unsafe {
            launch::sum_squares_partial_f32(
                rt,
                LaunchConfig::linear(blocks as u32, BLOCK),
                n,
                x.input(),
                partial.output(),
            )?;
            launch::sum_partials_f32(
                rt,
                LaunchConfig::linear(1, BLOCK),
                blocks,
                partial.input(),
                totals.output_at(i)?,
            )?;
        }
    }
    let mut total = rt.uninit::<f32>(1)?;
    // SAFETY: as above, over the per-buffer totals.
    unsafe {
        launch::sum_partials_f32(
            rt,
            LaunchConfig::linear(1, BLOCK),
            buffers.len(),
            totals.input(),
            total.output(),
        )?
    };
    Ok(total.to_host()?[0])
}

/// Both passes of the sum of squares, at each length in `lens`.
pub fn check_sum_of_squares(rt: &Runtime, lens: &[usize]) -> Result<Vec<KernelCheck>> {
    let mut rng = Inputs::new(14);
    let mut errors = Vec::new();
    for &n in lens {
        let x = rng.uniform(n, -3.0, 3.0);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        errors.push(max_rel_error(
            &[sum_of_squares(rt, &rt.upload(&x)?)?],
            &[want],
        ));
    }
    let case = format!("n in {lens:?}");
    let error = worst(&errors);
    Ok(vec![
        check(
            "sum_squares_partial_f32",
            case.clone(),
            error,
            F32_TOLERANCE,
        ),
        check("sum_partials_f32", case, error, F32_TOLERANCE),
    ])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_sum_of_squares(rt, &[1, 257, 5_003])
}
