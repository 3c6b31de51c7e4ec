//! Recipe 3: a new head on a frozen backbone. The base MLP loses its output layer, every
//! remaining parameter is frozen, and a freshly initialised Linear 64→10 is trained on top.
//!
//!     scripts/fetch_digits.sh && cargo run --release --example mlp_new_head

#[path = "mlp_common/mod.rs"]
mod common;

use scalpel::models::sequential::Layer;

fn main() -> common::Res {
    let d = common::load_digits()?;
    let (train, test) = common::split(d.x.len());
    let mut model = common::base_model(&d)?;
    model.drop_last(1)?;
    let frozen = model.params.freeze(|_| true);
    model.push(
        Layer::Linear {
            in_features: 64,
            out_features: 10,
        },
        33,
    )?;
    println!(
        "froze {frozen} backbone tensors; new head layers.4 untrained: held-out accuracy {:.4}",
        common::accuracy(&model, &d, &test)?
    );
    let loss = common::train(&mut model, &d, &train, 20, 5e-3)?;
    println!("after training the head on {} images (final batch loss {loss:.4}): held-out accuracy {:.4}", train.len(), common::accuracy(&model, &d, &test)?);
    Ok(())
}
