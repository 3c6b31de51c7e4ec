//! Central finite differences in f64: the independent reference every op's backward is tested
//! against (`cargo test -p scalpel-autograd`).

use scalpel_tensor::Tensor;

use crate::{Result, Var};

/// Compares the analytic gradient of `f(inputs)` (a scalar) with central differences, for every
/// element of every input. Returns the worst `|analytic − numeric| / max(1, |numeric|)`.
pub fn max_gradient_error(
    inputs: &[Tensor],
    f: impl Fn(&[Var]) -> Result<Var>,
    step: f64,
) -> Result<f64> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::parameter(t.to_dtype(scalpel_tensor::DType::F64)))
        .collect();
    let grads = f(&vars)?.backward()?;
    let mut worst = 0.0f64;
    for (i, var) in vars.iter().enumerate() {
        let analytic = grads
            .get(var)
            .map(|g| g.to_vec::<f64>())
            .unwrap_or_else(|| vec![0.0; var.value().numel()]);
        let base = var.value().to_vec::<f64>();
        for (j, &a) in analytic.iter().enumerate() {
            let eval = |delta: f64| -> Result<f64> {
                let mut shifted = base.clone();
                shifted[j] += delta;
                let mut probe: Vec<Var> = vars
                    .iter()
                    .map(|v| Var::constant(v.value().clone()))
                    .collect();
                probe[i] = Var::constant(Tensor::from_vec(var.shape(), shifted)?);
                Ok(f(&probe)?.value().to_vec::<f64>()[0])
            };
            let numeric = (eval(step)? - eval(-step)?) / (2.0 * step);
            worst = worst.max((a - numeric).abs() / numeric.abs().max(1.0));
        }
    }
    Ok(worst)
}
