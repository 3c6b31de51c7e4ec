//! Prometheus metrics: requests by route and status, latency, the queue, batch shapes, tokens.

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::embedder::BatchReport;

/// The server's metrics, rendered by `GET /metrics`.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// Requests admitted and not yet answered.
    pub(super) in_flight: IntGauge,
    /// Sequences queued on the embedder, not yet in a forward (set when scraped).
    pub(super) queued_sequences: IntGauge,
    batch_sequences: Histogram,
    batch_requests: Histogram,
    batch_tokens: Histogram,
    tokens: IntCounter,
    tokens_per_second: Gauge,
}

impl Metrics {
    /// Creates and registers every metric (names start with `scalpel_`).
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "scalpel_requests_total",
                "HTTP requests answered, by route and status",
            ),
            &["route", "status"],
        )?;
        // 0.5 ms to 8 s.
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "scalpel_request_duration_seconds",
                "Time from the request's arrival to its answer, by route and status",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 15)?),
            &["route", "status"],
        )?;
        let in_flight = IntGauge::new(
            "scalpel_queue_requests",
            "Requests admitted and not yet answered (at most --max-concurrent-requests)",
        )?;
        let queued_sequences =
            IntGauge::new("scalpel_queue_sequences", "Sequences waiting for a forward")?;
        let batch_sequences = Histogram::with_opts(
            HistogramOpts::new("scalpel_batch_size", "Sequences per forward")
                .buckets(exponential_buckets(1.0, 2.0, 11)?),
        )?;
        let batch_requests = Histogram::with_opts(
            HistogramOpts::new("scalpel_batch_requests", "Requests served by one forward")
                .buckets(exponential_buckets(1.0, 2.0, 11)?),
        )?;
        let batch_tokens = Histogram::with_opts(
            HistogramOpts::new(
                "scalpel_batch_tokens",
                "Padded tokens per forward (sequences x longest)",
            )
            .buckets(exponential_buckets(16.0, 2.0, 12)?),
        )?;
        let tokens = IntCounter::new("scalpel_tokens_total", "Real (unpadded) tokens embedded")?;
        let tokens_per_second = Gauge::new(
            "scalpel_forward_tokens_per_second",
            "Real tokens per second of the latest forward",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(queued_sequences.clone()))?;
        registry.register(Box::new(batch_sequences.clone()))?;
        registry.register(Box::new(batch_requests.clone()))?;
        registry.register(Box::new(batch_tokens.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(tokens_per_second.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            in_flight,
            queued_sequences,
            batch_sequences,
            batch_requests,
            batch_tokens,
            tokens,
            tokens_per_second,
        })
    }

    /// Records one forward (pass this to the embedder's `on_batch`).
    pub fn observe_batch(&self, batch: &BatchReport) {
        self.batch_sequences.observe(batch.sequences as f64);
        self.batch_requests.observe(batch.requests as f64);
        self.batch_tokens.observe(batch.padded_tokens as f64);
        self.tokens.inc_by(batch.tokens as u64);
        if batch.seconds > 0.0 {
            self.tokens_per_second
                .set(batch.tokens as f64 / batch.seconds);
        }
    }

    pub(super) fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        self.requests.with_label_values(&[route, &status]).inc();
        self.latency
            .with_label_values(&[route, &status])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| format!("cannot render the metrics: {e}"))?;
        String::from_utf8(out).map_err(|e| format!("metrics are not UTF-8: {e}"))
    }
}
