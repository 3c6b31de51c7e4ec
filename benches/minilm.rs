//! all-MiniLM-L6-v2 end to end: the inference forward (with pooling) and one training step of the
//! 4-layer cut (layers 4 and 5 removed) with AdamW. Needs the model at `models/all-MiniLM-L6-v2`
//! (`scripts/fetch_model.sh`); skipped with a note when it is absent. `scalpel bench forward` and
//! `scalpel bench train` time the same workloads at any size.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use scalpel::bench::{ForwardWorkload, TrainWorkload};
use scalpel::tensor::{DType, Device};

fn model_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipping MiniLM benches: {} not found (run scripts/fetch_model.sh)",
            dir.display()
        );
        None
    }
}

fn forward(c: &mut Criterion) {
    let Some(dir) = model_dir() else { return };
    let mut group = c.benchmark_group("minilm_forward");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // 1×8 takes the packed GEMM path with the 8-row edge kernel; 1×16 a full and a 2-row tile.
    for (batch, seq) in [(1, 8), (1, 16), (1, 128), (8, 128)] {
        let w =
            ForwardWorkload::new(&dir, batch, seq, &Device::Cpu, DType::F32).expect("model loads");
        group.bench_function(BenchmarkId::from_parameter(format!("{batch}x{seq}")), |b| {
            b.iter(|| w.run().expect("forward runs"))
        });
    }
    group.finish();
}

fn train_step(c: &mut Criterion) {
    let Some(dir) = model_dir() else { return };
    let mut group = c.benchmark_group("minilm_train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    let (batch, seq) = (8, 128);
    let mut w = TrainWorkload::new(&dir, batch, seq, &[4, 5], &Device::Cpu).expect("model loads");
    group.bench_function(
        BenchmarkId::from_parameter(format!("4layers_{batch}x{seq}")),
        |b| b.iter(|| w.step().expect("step runs")),
    );
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
    targets = forward, train_step
}
criterion_main!(benches);
