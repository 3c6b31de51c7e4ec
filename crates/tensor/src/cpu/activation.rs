//! GELU in the exact erf form BERT uses: `gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2))`.

use crate::Float;

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density's constant.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

pub fn gelu_forward_reference<F: Float>(x: &[F], y: &mut [F]) {
    let (half, c) = (F::from_f64(0.5), F::from_f64(FRAC_1_SQRT_2));
    for (y, &x) in y.iter_mut().zip(x) {
        *y = half * x * (F::ONE + (x * c).erf());
    }
}

/// `dx = dy · (Φ(x) + x·φ(x))`.
pub fn gelu_backward_reference<F: Float>(x: &[F], dy: &[F], dx: &mut [F]) {
    let (half, c, d) =
        (F::from_f64(0.5), F::from_f64(FRAC_1_SQRT_2), F::from_f64(FRAC_1_SQRT_2PI));
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        let cdf = half * (F::ONE + (x * c).erf());
        let pdf = d * (-half * x * x).exp();
        *dx = dy * (cdf + x * pdf);
    }
}

pub fn gelu_forward<F: Float>(x: &[F], y: &mut [F]) {
    gelu_forward_reference(x, y)
}

pub fn gelu_backward<F: Float>(x: &[F], dy: &[F], dx: &mut [F]) {
    gelu_backward_reference(x, dy, dx)
}
