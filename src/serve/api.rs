//! The routes: request parsing, validation, errors as JSON `{"error", "error_type"}`.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::AppState;
use crate::embedder::{EmbedError, Normalize};
use scalpel_tensor::DType;

/// A refused or failed request, answered as `{"error": message, "error_type": kind}`.
pub(super) struct ApiError {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error_type,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message, "error_type": self.error_type }));
        (self.status, body).into_response()
    }
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> Self {
        let (status, kind) = match &e {
            EmbedError::TooLong { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "validation"),
            EmbedError::UnknownToken { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            EmbedError::EmptyInput { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "empty"),
            EmbedError::Model(scalpel_models::ModelError::Tokenizer { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "tokenizer")
            }
            EmbedError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
            EmbedError::Model(_) | EmbedError::OutputSize { .. } | EmbedError::Config(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "backend")
            }
        };
        ApiError::new(status, kind, e.to_string())
    }
}

/// A request admitted past the concurrency limit; dropping it frees its place.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    state: Arc<AppState>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.state.metrics.in_flight.dec();
    }
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.config.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key (send `Authorization: Bearer KEY`)",
            ))
        }
    }

    fn admit(self: &Arc<Self>) -> Result<Admitted, ApiError> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "{} requests are in flight (--max-concurrent-requests); retry later",
                    self.config.max_concurrent_requests
                ),
            )
        })?;
        self.metrics.in_flight.inc();
        Ok(Admitted {
            _permit: permit,
            state: self.clone(),
        })
    }

    /// Records the request's status and latency under `route`.
    fn finish(
        &self,
        route: &str,
        started: Instant,
        result: Result<Response, ApiError>,
    ) -> Response {
        let response = result.unwrap_or_else(IntoResponse::into_response);
        self.metrics.observe_request(
            route,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
        response
    }

    /// Tokenizes (or checks) `inputs`, queues them on the embedder and awaits the rows:
    /// `inputs × dim` floats and the number of tokens embedded.
    async fn embeddings(
        &self,
        inputs: Vec<Input>,
        truncate: bool,
        normalize: Normalize,
    ) -> Result<(Vec<f32>, usize), ApiError> {
        if inputs.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "empty",
                "no inputs",
            ));
        }
        if inputs.len() > self.config.max_client_batch_size {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "validation",
                format!(
                    "{} inputs in one request, more than --max-client-batch-size {}",
                    inputs.len(),
                    self.config.max_client_batch_size
                ),
            ));
        }
        let sequences = inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| match input {
                Input::Text(text) => self.embedder.tokenize(i, &text, truncate),
                Input::Ids(ids) => self.embedder.check_ids(i, ids, truncate),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tokens = sequences.iter().map(Vec::len).sum();
        let (send, receive) = tokio::sync::oneshot::channel();
        self.embedder.submit(sequences, normalize, move |rows| {
            // The receiver is gone only if the client hung up; nobody is left to tell.
            let _ = send.send(rows);
        });
        let rows = receive.await.map_err(|_| EmbedError::Stopped)??;
        Ok((rows, tokens))
    }
}

/// The body as `T`: 413 past the payload limit, 400 for text that is not JSON, 422 for JSON of
/// the wrong shape.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "validation"
        };
        ApiError::new(status, kind, rejection.body_text())
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, "validation", format!("invalid request body: {e}"))
    })
}

/// One input: text to tokenize, or token ids to use as given.
enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// `str | [str]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Texts {
    One(String),
    Many(Vec<String>),
}

impl Texts {
    fn into_inputs(self) -> Vec<Input> {
        match self {
            Texts::One(t) => vec![Input::Text(t)],
            Texts::Many(ts) => ts.into_iter().map(Input::Text).collect(),
        }
    }
}

/// text-embeddings-inference's `POST /embed` body.
#[derive(Deserialize)]
struct EmbedRequest {
    inputs: Texts,
    #[serde(default = "yes")]
    normalize: bool,
    truncate: Option<bool>,
}

fn yes() -> bool {
    true
}

/// Authorizes, admits and parses a POST body as `T`, then answers with `handler`, recording the
/// status and latency under `route`.
async fn post_route<T, Answer>(
    state: Arc<AppState>,
    route: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    handler: impl FnOnce(Arc<AppState>, T) -> Answer,
) -> Response
where
    T: DeserializeOwned,
    Answer: Future<Output = Result<Response, ApiError>>,
{
    let started = Instant::now();
    let result = async {
        state.authorize(&headers)?;
        let _admitted = state.admit()?;
        handler(state.clone(), parse(body)?).await
    }
    .await;
    state.finish(route, started, result)
}

pub(super) async fn embed(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    post_route(
        state,
        "/embed",
        headers,
        body,
        |state, request: EmbedRequest| async move {
            let truncate = request.truncate.unwrap_or(state.config.auto_truncate);
            let normalize = if request.normalize {
                Normalize::Yes
            } else {
                Normalize::No
            };
            let (rows, _) = state
                .embeddings(request.inputs.into_inputs(), truncate, normalize)
                .await?;
            let vectors: Vec<&[f32]> = rows.chunks_exact(state.embedder.dim()).collect();
            Ok(Json(vectors).into_response())
        },
    )
    .await
}

/// OpenAI's `input`: `str | [str] | [int] | [[int]]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OpenAiInput {
    Texts(Texts),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// OpenAI's `POST /v1/embeddings` body (`model` is accepted and not checked: one model is
/// served; `user` and `dimensions` are ignored).
#[derive(Deserialize)]
struct OpenAiRequest {
    input: OpenAiInput,
    #[serde(default)]
    encoding_format: EncodingFormat,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OpenAiVector<'a> {
    Float(&'a [f32]),
    /// Little-endian f32 bytes, base64: what OpenAI's clients decode.
    Base64(String),
}

#[derive(Serialize)]
struct OpenAiEmbedding<'a> {
    object: &'static str,
    index: usize,
    embedding: OpenAiVector<'a>,
}

pub(super) async fn openai_embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    post_route(
        state,
        "/v1/embeddings",
        headers,
        body,
        |state, request: OpenAiRequest| async move {
            let inputs = match request.input {
                OpenAiInput::Texts(texts) => texts.into_inputs(),
                OpenAiInput::Ids(ids) => vec![Input::Ids(ids)],
                OpenAiInput::IdLists(lists) => lists.into_iter().map(Input::Ids).collect(),
            };
            let (rows, tokens) = state
                .embeddings(inputs, state.config.auto_truncate, Normalize::AsModel)
                .await?;
            let data: Vec<OpenAiEmbedding> = rows
                .chunks_exact(state.embedder.dim())
                .enumerate()
                .map(|(index, row)| OpenAiEmbedding {
                    object: "embedding",
                    index,
                    embedding: match request.encoding_format {
                        EncodingFormat::Float => OpenAiVector::Float(row),
                        EncodingFormat::Base64 => OpenAiVector::Base64(
                            base64::engine::general_purpose::STANDARD.encode(le_bytes(row)),
                        ),
                    },
                })
                .collect();
            Ok(Json(json!({
                "object": "list",
                "data": data,
                "model": state.model_name,
                "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
            }))
            .into_response())
        },
    )
    .await
}

/// The floats' little-endian bytes.
fn le_bytes(row: &[f32]) -> Vec<u8> {
    row.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(super) async fn health(State(state): State<Arc<AppState>>) -> Response {
    let started = Instant::now();
    let result = if state.embedder.is_running() {
        Ok(Json(json!({ "status": "ok" })).into_response())
    } else {
        Err(EmbedError::Stopped.into())
    };
    state.finish("/health", started, result)
}

pub(super) async fn info(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let result = state.authorize(&headers).map(|()| {
        let c = &state.config;
        Json(json!({
            "model_id": state.model_name,
            "model_path": state.embedder.model().display().to_string(),
            "dim": state.embedder.dim(),
            "max_input_length": state.embedder.max_seq_len(),
            "dtype": if state.embedder.dtype() == DType::BF16 { "bfloat16" } else { "float32" },
            "device": state.embedder.device_name(),
            "max_batch_tokens": c.max_batch_tokens,
            "max_batch_requests": c.max_batch_requests,
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_client_batch_size": c.max_client_batch_size,
            "payload_limit": c.payload_limit,
            "auto_truncate": c.auto_truncate,
            "version": env!("CARGO_PKG_VERSION"),
        }))
        .into_response()
    });
    state.finish("/info", started, result)
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state
        .metrics
        .queued_sequences
        .set(state.embedder.queued_sequences() as i64);
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", e).into_response(),
    }
}

pub(super) async fn not_found() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route (POST /embed, POST /v1/embeddings, GET /health, /info, /metrics)",
    )
    .into_response()
}
