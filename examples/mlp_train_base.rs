//! Trains the base MLP of the `mlp_*` examples (64→64→GELU→64→GELU→10 on digits 0–4) and saves
//! it to runs/mlp_base/ (mlp.json + model.safetensors). Run scripts/fetch_digits.sh first.
//!
//!     cargo run --release --example mlp_train_base

#[path = "mlp_common/mod.rs"]
mod common;

fn main() -> common::Res {
    let d = common::load_digits()?;
    common::train_base(&d, &common::base_dir())?;
    Ok(())
}
