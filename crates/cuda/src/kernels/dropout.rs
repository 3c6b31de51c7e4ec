//! `kernels/dropout.cu`: inverted dropout with the counter-based mask of
//! `scalpel_tensor::cpu::dropout` (forward and backward are the same kernel); and its check.

use scalpel_tensor::cpu::dropout::{self as cpu_dropout, dropout_threshold};

use super::{expect_len, grid_stride};
use crate::check::{check, max_rel_error, wide, Inputs, KernelCheck};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("dropout");

/// `y = x · mask(p, seed)`; `y` may not alias `x` here (the kernel allows it).
pub fn dropout(
    rt: &Runtime,
    p: f64,
    seed: u64,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    let keep = (1.0 / (1.0 - p)) as f32;
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    // SAFETY: lengths checked.
    unsafe {
        launch::dropout_f32(
            rt,
            grid_stride(n),
            n,
            lo,
            hi,
            dropout_threshold(p),
            keep,
            x.input(),
            y.output(),
        )
    }
}

/// The mask and the f32 product are exact on both sides, so the kernel must equal the CPU's f32
/// result bit for bit (tolerance 0), at a seed whose high word matters.
pub fn check_dropout(rt: &Runtime, n: usize, p: f64) -> Result<Vec<KernelCheck>> {
    let seed = 0x0123_4567_89ab_cdef;
    let x = Inputs::new(31).uniform(n, -2.0, 2.0);
    let mut y = rt.upload(&vec![f32::NAN; n])?;
    dropout(rt, p, seed, &rt.upload(&x)?, &mut y)?;
    let mut want = x.clone();
    cpu_dropout::dropout(&mut want, p, seed);
    Ok(vec![check(
        "dropout_f32",
        format!("n={n} p={p}"),
        max_rel_error(&y.to_host()?, &wide(&want)),
        0.0,
    )])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_dropout(rt, 1037, 0.3)
}
