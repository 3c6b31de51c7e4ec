//! The fused attention and LayerNorm kernels at MiniLM shapes (hidden 384, 12 heads), through the
//! `scalpel_tensor::ops` entry points the model uses.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use scalpel::bench::synthetic_values;
use scalpel::tensor::{ops, Tensor};

const HIDDEN: usize = 384;
const HEADS: usize = 12;

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(shape, synthetic_values(len, seed)).expect("shape matches length")
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (batch, seq) in [(1, 16), (1, 128), (32, 128)] {
        let shape = [batch, seq, HIDDEN];
        let (q, k, v) = (tensor(&shape, 1), tensor(&shape, 2), tensor(&shape, 3));
        let mask = Tensor::full(&[batch, seq], 1.0f32);
        group.bench_function(BenchmarkId::from_parameter(format!("{batch}x{seq}")), |b| {
            b.iter(|| ops::attention(&q, &k, &v, &mask, HEADS).expect("valid shapes"))
        });
    }
    group.finish();
}

fn layernorm(c: &mut Criterion) {
    let mut group = c.benchmark_group("layernorm");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let gamma = tensor(&[HIDDEN], 4);
    let beta = tensor(&[HIDDEN], 5);
    for rows in [128, 4096] {
        let x = tensor(&[rows, HIDDEN], 6);
        group.bench_function(
            BenchmarkId::from_parameter(format!("{rows}x{HIDDEN}")),
            |b| b.iter(|| ops::layernorm(&x, &gamma, &beta, 1e-12).expect("valid shapes")),
        );
    }
    group.finish();
}

criterion_group!(benches, attention, layernorm);
criterion_main!(benches);
