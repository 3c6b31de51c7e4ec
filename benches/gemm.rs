//! f32 GEMM `C = A·B` at square sizes, and the bf16 linear layer at MiniLM's shapes with f32
//! activations against bf16 ones, on the default thread count (`SCALPEL_THREADS`, else all
//! cores; `SCALPEL_ISA` picks the bf16 path). `scalpel bench gemm --n N --threads T [--dtype
//! bf16]` times the first from the command line.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use scalpel::bench::{synthetic_values, GemmWorkload};
use scalpel::tensor::cpu::gemm::Activation;
use scalpel::tensor::ops::{self, WeightUse};
use scalpel::tensor::{DType, Tensor};

fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm_f32");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [256, 512, 1024, 2048] {
        let mut w = GemmWorkload::new(n);
        // Elements = FLOPs, so criterion's "elem/s" reads as FLOP/s.
        group.throughput(Throughput::Elements(w.flops() as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| b.iter(|| w.run()));
    }
    group.finish();
}

fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(shape, synthetic_values(len, seed)).expect("shape matches length")
}

/// `gelu(x·Wᵀ + b)` with a bf16 weight, as bf16 inference runs its linear layers: `f32` reads
/// an f32 `x` (rounded at the GEMM's input) and stores f32; `bf16` reads a bf16 `x` and stores
/// bf16, as the model's FFN does (`ops::linear_bf16_rounded`).
fn linear_bf16(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    // (rows, in, out): batch 1 and 32 of 128 tokens through FFN1, FFN2 and a 384-wide projection.
    for (rows, in_f, out_f) in [
        (128, 384, 1536),
        (128, 1536, 384),
        (4096, 384, 1536),
        (4096, 1536, 384),
        (4096, 384, 384),
    ] {
        let x = tensor(&[rows, in_f], 1);
        let x_bf16 = x.to_dtype(DType::BF16);
        let w = tensor(&[out_f, in_f], 2).to_dtype(DType::BF16);
        let bias = tensor(&[out_f], 3);
        group.throughput(Throughput::Elements((2 * rows * in_f * out_f) as u64));
        let shape = format!("{rows}x{in_f}x{out_f}");
        group.bench_function(BenchmarkId::new("f32", &shape), |b| {
            b.iter(|| {
                ops::linear(&x, &w, Some(&bias), Activation::Gelu, WeightUse::Constant)
                    .expect("valid shapes")
            })
        });
        group.bench_function(BenchmarkId::new("bf16", &shape), |b| {
            b.iter(|| {
                ops::linear_bf16_rounded(&x_bf16, &w, Some(&bias), Activation::Gelu)
                    .expect("valid shapes")
            })
        });
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
    targets = gemm, linear_bf16
}
criterion_main!(benches);
