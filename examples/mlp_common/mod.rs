//! Shared by the `mlp_*` examples: the 8×8 digits data (scripts/fetch_digits.sh), a seeded
//! train/test split, a small AdamW + cross-entropy training loop, accuracy, and the base model.
//!
//! The story of the examples: a base MLP is "pre-trained" on digits 0–4 only; each recipe then
//! adapts it to all ten digits and reports held-out accuracy (all ten digits) before and after.
#![allow(dead_code)] // each example uses a different subset

use std::io::Read;
use std::path::{Path, PathBuf};

use scalpel::autograd::optim::{decays_by_default, Adam, AdamConfig};
use scalpel::autograd::{ops, Var};
use scalpel::models::sequential::{Layer, Sequential, SequentialSpec};
use scalpel::surgery::heal::BatchOrder;
use scalpel::tensor::Tensor;

pub type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// All 1797 images (pixels scaled to [0, 1]) and their digits.
pub struct Digits {
    pub x: Vec<[f32; 64]>,
    pub y: Vec<usize>,
}

pub fn load_digits() -> Res<Digits> {
    let path = repo().join("data/digits/digits.csv.gz");
    let file = std::fs::File::open(&path).map_err(|e| {
        format!(
            "{}: {e} (run scripts/fetch_digits.sh first)",
            path.display()
        )
    })?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        if values.len() != 65 {
            return Err(format!("{}:{}: expected 65 values", path.display(), i + 1).into());
        }
        let mut row = [0f32; 64];
        for (r, v) in row.iter_mut().zip(&values) {
            *r = v / 16.0;
        }
        x.push(row);
        y.push(values[64] as usize);
    }
    Ok(Digits { x, y })
}

/// A seeded 80/20 split of example indices: (train, test).
pub fn split(n: usize) -> (Vec<usize>, Vec<usize>) {
    let order = BatchOrder::new(n, n, true, 2024).batch(0);
    let cut = n * 4 / 5;
    (order[..cut].to_vec(), order[cut..].to_vec())
}

pub fn batch_x(d: &Digits, idx: &[usize]) -> Res<Var> {
    let values: Vec<f32> = idx.iter().flat_map(|&i| d.x[i]).collect();
    Ok(Var::constant(Tensor::from_vec(&[idx.len(), 64], values)?))
}

pub fn accuracy(model: &Sequential, d: &Digits, idx: &[usize]) -> Res<f64> {
    let mut m = model.clone();
    m.params.freeze(|_| true); // inference: no graph
    let logits = m.forward(&batch_x(d, idx)?)?.value().to_vec::<f32>();
    let c = logits.len() / idx.len();
    let correct = logits
        .chunks_exact(c)
        .zip(idx)
        .filter(|&(row, &i)| {
            let best = (0..c).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            best == d.y[i]
        })
        .count();
    Ok(correct as f64 / idx.len() as f64)
}

/// Minibatch AdamW on cross-entropy over the trainable parameters of `model`.
pub fn train(
    model: &mut Sequential,
    d: &Digits,
    idx: &[usize],
    epochs: usize,
    lr: f64,
) -> Res<f64> {
    let mut opt = Adam::new(AdamConfig::adamw(0.01), decays_by_default);
    let order = BatchOrder::new(idx.len(), 32, true, 7);
    let mut last = f64::NAN;
    for k in 0..order.batches_per_epoch() * epochs {
        let b: Vec<usize> = order.batch(k).iter().map(|&j| idx[j]).collect();
        let gold: Vec<usize> = b.iter().map(|&i| d.y[i]).collect();
        let loss = ops::cross_entropy(&model.forward(&batch_x(d, &b)?)?, &gold)?;
        last = loss.value().to_vec::<f64>()[0];
        let grads = loss.backward()?;
        opt.step(&mut model.params, &grads, lr)?;
    }
    Ok(last)
}

pub fn base_dir() -> PathBuf {
    repo().join("runs/mlp_base")
}

/// 64 → 64 → GELU → 64 → GELU → 10.
pub fn base_spec() -> SequentialSpec {
    let lin = |i, o| Layer::Linear {
        in_features: i,
        out_features: o,
    };
    SequentialSpec {
        layers: vec![
            lin(64, 64),
            Layer::Gelu,
            lin(64, 64),
            Layer::Gelu,
            lin(64, 10),
        ],
    }
}

/// Trains the base MLP on the training images of digits 0–4 only and saves it to `dir`.
pub fn train_base(d: &Digits, dir: &Path) -> Res<Sequential> {
    let (train_idx, test_idx) = split(d.x.len());
    let low: Vec<usize> = train_idx.iter().copied().filter(|&i| d.y[i] < 5).collect();
    let low_test: Vec<usize> = test_idx.iter().copied().filter(|&i| d.y[i] < 5).collect();
    let mut model = Sequential::init(base_spec(), 1)?;
    let loss = train(&mut model, d, &low, 30, 3e-3)?;
    println!(
        "base MLP trained on {} images of digits 0-4 (final batch loss {loss:.4}): held-out accuracy {:.4} on digits 0-4, {:.4} on all digits",
        low.len(),
        accuracy(&model, d, &low_test)?,
        accuracy(&model, d, &test_idx)?
    );
    model.save(dir)?;
    println!("saved {}", dir.display());
    Ok(model)
}

/// The saved base model, trained first if absent.
pub fn base_model(d: &Digits) -> Res<Sequential> {
    let dir = base_dir();
    if dir.join("mlp.json").exists() {
        println!("loading base MLP from {}", dir.display());
        return Ok(Sequential::load(&dir)?);
    }
    train_base(d, &dir)
}
