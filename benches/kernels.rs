//! The fused attention (forward and backward, f32 and bf16 products) and LayerNorm kernels at
//! MiniLM shapes (hidden 384, 12 heads), through the
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

/// Forward, and backward of the forward's own output and `lse`, with f32 products and with bf16
/// ones (`--dtype bf16` inference and `--precision bf16` training: the best bf16 path this CPU
/// has, the f32 fallback without AVX512-BF16).
fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (batch, seq) in [(1, 16), (1, 128), (32, 128)] {
        let shape = [batch, seq, HIDDEN];
        let (q, k, v) = (tensor(&shape, 1), tensor(&shape, 2), tensor(&shape, 3));
        let dout = tensor(&shape, 4);
        let mask = Tensor::full(&[batch, seq], 1.0f32);
        for products in ["f32", "bf16"] {
            let forward = |q: &Tensor, k: &Tensor, v: &Tensor| {
                match products {
                    "bf16" => ops::attention_bf16(q, k, v, &mask, HEADS),
                    _ => ops::attention(q, k, v, &mask, HEADS),
                }
                .expect("valid shapes")
            };
            let name = format!("{products} {batch}x{seq}");
            group.bench_function(BenchmarkId::new("forward", &name), |b| {
                b.iter(|| forward(&q, &k, &v))
            });
            let (out, lse) = forward(&q, &k, &v);
            group.bench_function(BenchmarkId::new("backward", &name), |b| {
                b.iter(|| {
                    match products {
                        "bf16" => ops::attention_backward_bf16(
                            &q, &k, &v, &mask, HEADS, &out, &lse, &dout,
                        ),
                        _ => ops::attention_backward(&q, &k, &v, &mask, HEADS, &out, &lse, &dout),
                    }
                    .expect("valid shapes")
                })
            });
        }
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

// Allocated as the `scalpel` binary allocates (cache-line-aligned buffers, freed ones kept for
// reuse), so that a kernel is not timed with page faults the binary does not pay.
#[global_allocator]
static ALLOCATOR: scalpel::tensor::heap::TensorHeap = scalpel::tensor::heap::TensorHeap;

criterion_group! {
    name = benches;
    config = {
        scalpel::tensor::heap::keep_freed_buffers();
        Criterion::default()
    };
    targets = attention, layernorm
}
criterion_main!(benches);
