use std::path::PathBuf;
use std::sync::Arc;

use scalpel::serve::{self, Metrics, ServeConfig};
use scalpel::tensor::DType;
use scalpel::Embedder;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json, sentence-transformers files).
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Padded tokens (sequences × longest) one forward may hold; concurrent requests are
    /// batched together up to it. At least the model's maximum sequence length.
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// The most requests one forward may serve (default: the token budget alone decides).
    #[arg(long)]
    max_batch_requests: Option<usize>,
    /// Requests in flight at once; past it a request gets 429 at once.
    #[arg(long, default_value_t = 512)]
    max_concurrent_requests: usize,
    /// The most inputs in one request (413 above).
    #[arg(long, default_value_t = 128)]
    max_client_batch_size: usize,
    /// The largest request body, in bytes (413 above).
    #[arg(long, default_value_t = 2_000_000)]
    payload_limit: usize,
    /// Truncate inputs longer than the model's limit instead of answering 413.
    #[arg(long)]
    auto_truncate: bool,
    /// Require `Authorization: Bearer KEY` on /embed, /v1/embeddings and /info (401 otherwise).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Linear layers in `f32` (exact) or `bf16`: weights held in bf16, each linear layer a bf16
    /// GEMM with f32 accumulation, the rest in f32 (CPU only). `/info` reports it.
    #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
    dtype: DType,
    /// Seconds after SIGTERM or Ctrl-C to wait for open connections to finish before closing
    /// them (a client stalled inside its request cannot hold the process longer).
    #[arg(long, default_value_t = 30.0, value_parser = flags::finite_positive)]
    shutdown_timeout: f64,
}

pub fn run(a: Args) -> CliResult {
    for (flag, value) in [
        ("--max-concurrent-requests", a.max_concurrent_requests),
        ("--max-client-batch-size", a.max_client_batch_size),
        ("--payload-limit", a.payload_limit),
    ] {
        if value == 0 {
            return Err(format!("{flag} must be at least 1").into());
        }
    }
    let metrics = Arc::new(Metrics::new()?);
    let mut builder = Embedder::builder(&a.model)
        .device(super::device().clone())
        .max_batch_tokens(a.max_batch_tokens)
        .dtype(a.dtype);
    if let Some(n) = a.max_batch_requests {
        builder = builder.max_batch_requests(n);
    }
    let observer = metrics.clone();
    let embedder = Arc::new(
        builder
            .on_batch(move |batch| observer.observe_batch(batch))
            .build()?,
    );
    let config = ServeConfig {
        max_concurrent_requests: a.max_concurrent_requests,
        max_client_batch_size: a.max_client_batch_size,
        payload_limit: a.payload_limit,
        auto_truncate: a.auto_truncate,
        api_key: a.api_key,
        max_batch_tokens: a.max_batch_tokens,
        max_batch_requests: a.max_batch_requests,
    };
    let app = serve::router(embedder, metrics, config);
    // Two threads parse HTTP and JSON and tokenize; the forwards run on the kernel pool.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| format!("cannot listen on {}:{}: {e}", a.host, a.port))?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        let drain_limit = std::time::Duration::from_secs_f64(a.shutdown_timeout);
        match serve::serve(listener, app, serve::shutdown_signal(), drain_limit).await? {
            serve::Stopped::Drained => {
                eprintln!("shutting down: every admitted request has been answered")
            }
            serve::Stopped::AtDrainLimit => eprintln!(
                "shutting down: connections still open {} s after the signal were closed \
                 (--shutdown-timeout)",
                a.shutdown_timeout
            ),
        }
        CliResult::Ok(())
    })
}
