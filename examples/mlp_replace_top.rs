//! Recipe 1: drop the last two layers of the base MLP (GELU, Linear 64→10), add a new final
//! layer (GELU + a freshly initialised Linear 64→10), and retrain everything on all ten digits.
//!
//!     scripts/fetch_digits.sh && cargo run --release --example mlp_replace_top

#[path = "mlp_common/mod.rs"]
mod common;

use scalpel::models::sequential::Layer;

fn main() -> common::Res {
    let d = common::load_digits()?;
    let (train, test) = common::split(d.x.len());
    let mut model = common::base_model(&d)?;
    println!(
        "base model, held-out accuracy (all digits): {:.4}",
        common::accuracy(&model, &d, &test)?
    );
    model.drop_last(2)?;
    model.push(Layer::Gelu, 0)?;
    model.push(
        Layer::Linear {
            in_features: 64,
            out_features: 10,
        },
        11,
    )?;
    println!(
        "after surgery ({} layers, new final layer untrained): held-out accuracy {:.4}",
        model.spec.layers.len(),
        common::accuracy(&model, &d, &test)?
    );
    let loss = common::train(&mut model, &d, &train, 20, 2e-3)?;
    println!(
        "after retraining on {} images (final batch loss {loss:.4}): held-out accuracy {:.4}",
        train.len(),
        common::accuracy(&model, &d, &test)?
    );
    Ok(())
}
