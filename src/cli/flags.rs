//! Value parsers for numeric flags (`#[arg(value_parser = flags::positive)]`): each rejects NaN,
//! infinities and out-of-range values when the command line is parsed, and clap's error names
//! the flag and the value (`invalid value 'NaN' for '--lr <LR>': not a finite number`).

/// A count that must be at least 1 (steps, epochs, batch sizes, samples).
pub fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

/// The format of a model's linear layers at inference (`--dtype`): `f32` (exact) or `bf16`.
pub fn inference_dtype(text: &str) -> Result<scalpel::tensor::DType, String> {
    match text {
        "f32" => Ok(scalpel::tensor::DType::F32),
        "bf16" => Ok(scalpel::tensor::DType::BF16),
        _ => Err("must be f32 or bf16".into()),
    }
}

/// A finite number greater than 0 (learning rates, clipping norms, minutes).
pub fn finite_positive(text: &str) -> Result<f64, String> {
    finite_in(text, |x| x > 0.0, "must be greater than 0")
}

/// A finite number of at least 0 (weight decay).
pub fn finite_non_negative(text: &str) -> Result<f64, String> {
    finite_in(text, |x| x >= 0.0, "must be at least 0")
}

/// A probability in [0, 1) (dropout: 1 would drop everything).
pub fn probability(text: &str) -> Result<f64, String> {
    finite_in(
        text,
        |x| (0.0..1.0).contains(&x),
        "must be in [0, 1): at least 0 and below 1",
    )
}

fn finite_in(text: &str, in_range: fn(f64) -> bool, range: &str) -> Result<f64, String> {
    let x: f64 = text.parse().map_err(|e| format!("not a number ({e})"))?;
    if !x.is_finite() {
        return Err("not a finite number".into());
    }
    if !in_range(x) {
        return Err(range.into());
    }
    Ok(x)
}

/// A fraction in (0, 1] (nucleus sampling's top-p: 1 keeps every token).
pub fn nucleus(text: &str) -> Result<f64, String> {
    finite_in(
        text,
        |x| x > 0.0 && x <= 1.0,
        "must be in (0, 1]: above 0 and at most 1",
    )
}
