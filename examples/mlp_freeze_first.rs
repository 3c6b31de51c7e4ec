//! Recipe 2: freeze the first N parameters of the base MLP (default 2: `layers.0.weight`,
//! `layers.0.bias`) and fine-tune the rest on all ten digits.
//!
//!     scripts/fetch_digits.sh && cargo run --release --example mlp_freeze_first [-- N]

#[path = "mlp_common/mod.rs"]
mod common;

fn main() -> common::Res {
    let n: usize = std::env::args().nth(1).map_or(Ok(2), |s| s.parse())?;
    let d = common::load_digits()?;
    let (train, test) = common::split(d.x.len());
    let mut model = common::base_model(&d)?;
    let frozen = model.freeze_first(n);
    let before = model.params.to_tensors();
    println!("frozen: {frozen:?}");
    println!(
        "before fine-tuning: held-out accuracy {:.4}",
        common::accuracy(&model, &d, &test)?
    );
    let loss = common::train(&mut model, &d, &train, 20, 2e-3)?;
    println!(
        "after fine-tuning on {} images (final batch loss {loss:.4}): held-out accuracy {:.4}",
        train.len(),
        common::accuracy(&model, &d, &test)?
    );
    let after = model.params.to_tensors();
    for name in model.param_names() {
        let same =
            before[&name].data().unwrap().as_bytes() == after[&name].data().unwrap().as_bytes();
        println!("  {name}: {}", if same { "unchanged" } else { "changed" });
    }
    Ok(())
}
