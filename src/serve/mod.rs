//! `scalpel serve`: sentence embeddings over HTTP, compatible with text-embeddings-inference
//! (`POST /embed`) and OpenAI (`POST /v1/embeddings`), with `GET /health`, `/info` and a
//! Prometheus `/metrics`.
//!
//! Every request is admitted or refused at once: at most `max_concurrent_requests` are in
//! flight, the next gets a 429. An admitted request is tokenized on the HTTP thread and queued
//! on the [`Embedder`], whose batching worker joins whatever is queued into forwards up to the
//! token budget; the handler awaits its rows. On shutdown the listener stops accepting, every
//! admitted request is answered, and the embedder drains its queue before the process exits;
//! connections still open after the drain limit (a client stalled inside its headers or body,
//! which no request timeout covers) are closed then, so no client can hold the process.
//!
//! The routes are an axum [`Router`], so a service can mount them in its own tokio runtime:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//! use scalpel::serve::{self, Metrics, ServeConfig};
//!
//! let metrics = Arc::new(Metrics::new()?);
//! let observer = metrics.clone();
//! let embedder = scalpel::Embedder::builder(&model)
//!     .on_batch(move |batch| observer.observe_batch(batch))
//!     .build()?;
//! let app = serve::router(Arc::new(embedder), metrics, ServeConfig::default());
//! let runtime = tokio::runtime::Runtime::new()?;
//! let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
//! let addr = listener.local_addr()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let drain_limit = std::time::Duration::from_secs(30);
//! let server = runtime.spawn(serve::serve(listener, app, async { stopped.await.ok(); }, drain_limit));
//!
//! let body = r#"{"inputs": ["A man is playing a guitar."]}"#;
//! let mut conn = std::net::TcpStream::connect(addr)?;
//! write!(conn, "POST /embed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
//!               Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
//! let mut response = String::new();
//! conn.read_to_string(&mut response)?;
//! assert!(response.starts_with("HTTP/1.1 200"), "{response}");
//!
//! stop.send(()).ok();
//! runtime.block_on(server)??; // returns once every open request is answered
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod api;
mod metrics;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::embedder::Embedder;

pub use metrics::Metrics;

/// The server's limits and access control (the embedder holds the batching limits).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Requests in flight at once; one more gets a 429 without waiting.
    pub max_concurrent_requests: usize,
    /// The most inputs one request may carry (413 above).
    pub max_client_batch_size: usize,
    /// The largest request body in bytes (413 above).
    pub payload_limit: usize,
    /// Truncate inputs longer than the model's limit instead of answering 413 (a request's
    /// own `truncate` field, where the route has one, takes precedence).
    pub auto_truncate: bool,
    /// When set, every route but `/health` and `/metrics` wants `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The token budget of one forward, for `/info`.
    pub max_batch_tokens: usize,
    /// The most requests one forward serves, for `/info`.
    pub max_batch_requests: Option<usize>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_concurrent_requests: 512,
            max_client_batch_size: 128,
            payload_limit: 2_000_000,
            auto_truncate: false,
            api_key: None,
            max_batch_tokens: 16384,
            max_batch_requests: None,
        }
    }
}

/// What every handler shares.
struct AppState {
    embedder: Arc<Embedder>,
    metrics: Arc<Metrics>,
    config: ServeConfig,
    /// One permit per request in flight.
    admission: Arc<Semaphore>,
    /// The model's name as routes report it (the folder's name).
    model_name: String,
}

/// The routes over `embedder`. `metrics` should be the one the embedder's
/// [`on_batch`](crate::embedder::EmbedderBuilder::on_batch) reports to, so `/metrics` shows
/// batch sizes.
pub fn router(embedder: Arc<Embedder>, metrics: Arc<Metrics>, config: ServeConfig) -> Router {
    let model_name = embedder.model().file_name().map_or_else(
        || embedder.model().display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let state = Arc::new(AppState {
        admission: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        embedder,
        metrics,
        config: config.clone(),
        model_name,
    });
    Router::new()
        .route("/embed", post(api::embed))
        .route("/v1/embeddings", post(api::openai_embeddings))
        .route("/health", get(api::health))
        .route("/info", get(api::info))
        .route("/metrics", get(api::metrics))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(config.payload_limit))
        .with_state(state)
}

/// How a server stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished: every admitted request was answered.
    Drained,
    /// Connections were still open `drain_limit` after the signal and were closed.
    AtDrainLimit,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and returns once
/// every open connection has finished, or `drain_limit` after the signal, whichever is first.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_limit: Duration,
) -> std::io::Result<Stopped> {
    let (begun, signalled) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = begun.send(());
    });
    let limit = async move {
        match signalled.await {
            Ok(()) => tokio::time::sleep(drain_limit).await,
            // The server returned without a signal: it is the other branch that completes.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server.into_future() => result.map(|()| Stopped::Drained),
        () = limit => Ok(Stopped::AtDrainLimit),
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
