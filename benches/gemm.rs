//! f32 GEMM `C = A·B` at square sizes, on the default thread count (`SCALPEL_THREADS`, else all
//! cores). `scalpel bench gemm --n N --threads T` times the same workload from the command line.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use scalpel::bench::GemmWorkload;

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

criterion_group!(benches, gemm);
criterion_main!(benches);
