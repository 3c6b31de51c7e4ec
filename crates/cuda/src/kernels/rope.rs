//! `kernels/rope.cu`: rotary position embeddings ("rotate half"), either way round (the backward
//! is the inverse rotation); and their checks.

use scalpel_tensor::cpu::rope::{self as cpu_rope, RopeTable, Rotation};

use super::{expect_len, grid_stride, int, rows_of};
use crate::check::{check, max_rel_error, wide, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{CudaError, DeviceBuffer, Result, Runtime};

launchers!("rope");

/// Where the rows of a rotation are: `seq` rows per sequence of `width = heads·head_dim`
/// channels, row `t` of each sequence at position `position0 + t`, base `theta`.
#[derive(Clone, Copy, Debug)]
pub struct RopePositions {
    pub seq: usize,
    pub width: usize,
    pub head_dim: usize,
    pub position0: usize,
    pub theta: f64,
}

/// Writes `x` rotated (`Rotation::Inverse`: by the opposite angles) into `y`.
pub fn rope(
    rt: &Runtime,
    p: &RopePositions,
    rotation: Rotation,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    if p.head_dim == 0 || !p.head_dim.is_multiple_of(2) || !p.width.is_multiple_of(p.head_dim) {
        return Err(CudaError::Shape(format!(
            "rope: {} channels are not heads of an even head_dim {}",
            p.width, p.head_dim
        )));
    }
    let rows = rows_of("rope x", x.len(), p.width)?;
    if p.seq == 0 || !rows.is_multiple_of(p.seq) {
        return Err(CudaError::Shape(format!(
            "rope: {rows} rows are not sequences of {}",
            p.seq
        )));
    }
    expect_len(rt, "y", y, x.len())?;
    int("rope's last position", p.position0 + p.seq)?;
    let pairs = rows * p.head_dim / 2;
    int("rope rows·head_dim/2", pairs)?;
    let sign = match rotation {
        Rotation::Forward => 1.0,
        Rotation::Inverse => -1.0,
    };
    // SAFETY: lengths checked; one thread per (row, frequency) in a grid-stride loop.
    unsafe {
        launch::rope_f32(
            rt,
            grid_stride(pairs),
            rows,
            p.seq,
            p.width,
            p.head_dim,
            p.position0,
            p.theta as f32,
            sign,
            x.input(),
            y.output(),
        )
    }
}

/// Both rotations against the CPU kernel in f64 on the same f32 angles. Positions far from 0
/// test that the angles are the CPU's: at 4000 an f32 angle's rounding is ~2e-4, so an angle
/// computed any other way (in double throughout, say) fails the tolerance.
pub fn check_rope(rt: &Runtime, batch: usize, p: RopePositions) -> Result<Vec<KernelCheck>> {
    let case = format!(
        "batch={batch} seq={} width={} head_dim={} positions from {}, theta={}",
        p.seq, p.width, p.head_dim, p.position0, p.theta
    );
    let n = batch * p.seq * p.width;
    let x = Inputs::new(16).uniform(n, -2.0, 2.0);
    let dx = rt.upload(&x)?;
    let positions: Vec<usize> = (p.position0..p.position0 + p.seq).collect();
    let table = RopeTable::<f64>::new(p.head_dim, p.theta, &positions);
    let mut worst = 0.0f64;
    for rotation in [Rotation::Forward, Rotation::Inverse] {
        let mut y = rt.upload(&vec![f32::NAN; n])?;
        rope(rt, &p, rotation, &dx, &mut y)?;
        let mut want = vec![0.0; n];
        cpu_rope::rope(&table, rotation, p.width, &wide(&x), &mut want);
        worst = crate::check::worst(&[worst, max_rel_error(&y.to_host()?, &want)]);
    }
    Ok(vec![check("rope_f32", case, worst, F32_TOLERANCE)])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let positions = |seq, width, head_dim, position0, theta| RopePositions {
        seq,
        width,
        head_dim,
        position0,
        theta,
    };
    let mut out = check_rope(rt, 2, positions(13, 3 * 20, 20, 0, 1e4))?;
    // SmolLM2's heads at positions in the thousands, as a decoding step late in a long text.
    out.extend(check_rope(rt, 1, positions(3, 3 * 64, 64, 4000, 1e5))?);
    Ok(out)
}
