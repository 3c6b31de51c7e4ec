//! The embedding façade and `scalpel serve`: embeddings against the sentence-transformers
//! fixture over both routes (float and base64) and against `scalpel embed`, every error status,
//! the bounded queue, dynamic batching within the token budget, concurrent callers, and a
//! SIGTERM that drains. Servers listen on 127.0.0.1, port 0; every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use scalpel::embedder::{BatchReport, EmbedError, Normalize};
use scalpel::serve::{self, Metrics, ServeConfig};
use scalpel::Embedder;
use serde_json::{json, Value};

use crate::common::{cosine, fixture, fixture_sentences, load_fixture, max_abs_diff, minilm_dir};

const DIM: usize = 384;
/// Line 44 of the fixture sentences is longer than the model's 256 tokens.
const LONG_LINE: usize = 43;

/// One embedder for the servers of these tests (loading and packing the model once), with the
/// metrics its batches report to.
fn shared() -> &'static (Arc<Embedder>, Arc<Metrics>) {
    static SHARED: OnceLock<(Arc<Embedder>, Arc<Metrics>)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let metrics = Arc::new(Metrics::new().unwrap());
        let observer = metrics.clone();
        let embedder = Embedder::builder(minilm_dir())
            .threads(2)
            .on_batch(move |b| observer.observe_batch(b))
            .build()
            .unwrap();
        (Arc::new(embedder), metrics)
    })
}

fn fixture_embeddings() -> Vec<f32> {
    load_fixture("minilm/embeddings.safetensors")["embeddings"].to_vec::<f32>()
}

fn assert_match_fixture(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got
        .chunks_exact(DIM)
        .zip(want.chunks_exact(DIM))
        .enumerate()
    {
        let cos = cosine(a, b);
        assert!(
            cos >= 0.99999,
            "{what}, line {}: cosine {cos} < 0.99999",
            i + 1
        );
    }
}

/// A server on its own runtime and thread; dropping it shuts it down and waits for it.
struct TestServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(config: ServeConfig) -> TestServer {
        let (embedder, metrics) = shared().clone();
        TestServer::over(embedder, metrics, config)
    }

    fn over(embedder: Arc<Embedder>, metrics: Arc<Metrics>, config: ServeConfig) -> TestServer {
        let app = serve::router(embedder, metrics, config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, addr) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                bound.send(listener.local_addr().unwrap()).unwrap();
                let shutdown = async {
                    let _ = stopped.await;
                };
                serve::serve(listener, app, shutdown, Duration::from_secs(60))
                    .await
                    .unwrap();
            });
        });
        let addr = addr
            .recv_timeout(Duration::from_secs(30))
            .expect("server bound");
        TestServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 exchange on a fresh connection: `(status, body)`.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    // The server may answer (413) before reading the whole body and close; that is not an error.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this client reads content-length bodies only"
    );
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    post_with(addr, path, &[], body.to_string().as_bytes())
}

fn post_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let (status, text) = http(addr, "POST", path, headers, body);
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path} {status}: not JSON ({e}): {text}"));
    (status, value)
}

/// Asserts a JSON error of `status` whose `error_type` is `kind`.
fn assert_error(got: (u16, Value), status: u16, kind: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["error_type"], kind, "{what}: {}", got.1);
    assert!(
        got.1["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        got.1
    );
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn embed_route_matches_sentence_transformers() {
    let server = TestServer::start(ServeConfig {
        auto_truncate: true,
        ..ServeConfig::default()
    });
    let (status, body) = post(
        server.addr,
        "/embed",
        &json!({ "inputs": fixture_sentences() }),
    );
    assert_eq!(status, 200, "{body}");
    let got: Vec<f32> = body.as_array().unwrap().iter().flat_map(floats).collect();
    assert_match_fixture(&got, &fixture_embeddings(), "/embed");

    let (status, one) = post(
        server.addr,
        "/embed",
        &json!({ "inputs": fixture_sentences()[3] }),
    );
    assert_eq!(status, 200);
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_match_fixture(
        &floats(&one[0]),
        &fixture_embeddings()[3 * DIM..4 * DIM],
        "/embed one string",
    );

    // normalize: false gives the mean-pooled vector, the same direction at another length.
    let (status, raw) = post(
        server.addr,
        "/embed",
        &json!({ "inputs": [fixture_sentences()[3].clone()], "normalize": false }),
    );
    assert_eq!(status, 200);
    let raw = floats(&raw[0]);
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 0.01, "not normalised: |v| = {norm}");
    assert!(cosine(&raw, &fixture_embeddings()[3 * DIM..4 * DIM]) >= 0.99999);
}

#[test]
fn openai_route_float_base64_and_token_ids_match_sentence_transformers() {
    let server = TestServer::start(ServeConfig {
        auto_truncate: true,
        ..ServeConfig::default()
    });
    let want = fixture_embeddings();
    let tokens: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm/tokens.json")).unwrap())
            .unwrap();
    let token_count: usize = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().len())
        .sum();
    for format in ["float", "base64"] {
        let (status, body) = post(
            server.addr,
            "/v1/embeddings",
            &json!({ "input": fixture_sentences(), "model": "all-MiniLM-L6-v2", "encoding_format": format }),
        );
        assert_eq!(status, 200, "{format}: {body}");
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "all-MiniLM-L6-v2");
        assert_eq!(
            body["usage"]["prompt_tokens"], token_count,
            "{format}: tokens after truncation"
        );
        assert_eq!(body["usage"]["total_tokens"], token_count);
        let data = body["data"].as_array().unwrap();
        let mut got = Vec::new();
        for (i, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            got.extend(match format {
                "float" => floats(&item["embedding"]),
                _ => base64::engine::general_purpose::STANDARD
                    .decode(item["embedding"].as_str().unwrap())
                    .unwrap()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            });
        }
        assert_match_fixture(&got, &want, &format!("/v1/embeddings {format}"));
    }
    // Token ids as sentence-transformers' tokenizer made them, one list and a list of lists.
    let (status, body) = post(
        server.addr,
        "/v1/embeddings",
        &json!({ "input": tokens["tokens"], "model": "m" }),
    );
    assert_eq!(status, 200, "{body}");
    let got: Vec<f32> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| floats(&d["embedding"]))
        .collect();
    assert_match_fixture(&got, &want, "/v1/embeddings token ids");
    let (status, body) = post(
        server.addr,
        "/v1/embeddings",
        &json!({ "input": tokens["tokens"][5], "model": "m" }),
    );
    assert_eq!(status, 200, "{body}");
    assert_match_fixture(
        &floats(&body["data"][0]["embedding"]),
        &want[5 * DIM..6 * DIM],
        "one id list",
    );
}

#[test]
fn server_embeddings_equal_scalpel_embed_through_stdin_and_stdout() {
    let sentences = fixture_sentences();
    let mut child = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args([
            "embed",
            "--input",
            "-",
            "--output",
            "-",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--model",
        ])
        .arg(minilm_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sentences.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), sentences.len());

    let server = TestServer::start(ServeConfig {
        auto_truncate: true,
        ..ServeConfig::default()
    });
    let (status, body) = post(server.addr, "/embed", &json!({ "inputs": sentences }));
    assert_eq!(status, 200);
    for (i, (line, served)) in lines.iter().zip(body.as_array().unwrap()).enumerate() {
        assert_eq!(line["text"], sentences[i]);
        let diff = max_abs_diff(&floats(&line["embedding"]), &floats(served));
        // Different batch compositions (32 per forward on the CLI, one forward here).
        assert!(
            diff <= 1e-6,
            "line {}: CLI vs server max |Δ| = {diff:e}",
            i + 1
        );
    }
}

#[test]
fn malformed_bodies_are_400_and_422_with_json_errors() {
    let server = TestServer::start(ServeConfig::default());
    for route in ["/embed", "/v1/embeddings"] {
        let not_json = post_with(server.addr, route, &[], b"{\"inputs\": [\"a\"");
        assert_error(
            not_json,
            400,
            "validation",
            &format!("{route}: truncated JSON"),
        );
    }
    let wrong_shape = post(server.addr, "/embed", &json!({ "inputs": 5 }));
    assert_error(wrong_shape, 422, "validation", "inputs: 5");
    let missing = post(server.addr, "/v1/embeddings", &json!({ "inputs": "a" }));
    assert_error(missing, 422, "validation", "no `input`");
    let format = post(
        server.addr,
        "/v1/embeddings",
        &json!({ "input": "a", "encoding_format": "hex" }),
    );
    assert_error(format, 422, "validation", "encoding_format hex");
    let unknown_id = post(
        server.addr,
        "/v1/embeddings",
        &json!({ "input": [101, 999999, 102] }),
    );
    assert_error(
        unknown_id,
        422,
        "validation",
        "token id outside the vocabulary",
    );
    let (status, body) = http(server.addr, "GET", "/nowhere", &[], b"");
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error_type"],
        "not_found"
    );
}

#[test]
fn empty_inputs_are_422() {
    let server = TestServer::start(ServeConfig::default());
    assert_error(
        post(server.addr, "/embed", &json!({ "inputs": [] })),
        422,
        "empty",
        "no inputs",
    );
    assert_error(
        post(server.addr, "/embed", &json!({ "inputs": "" })),
        422,
        "empty",
        "empty text",
    );
    assert_error(
        post(server.addr, "/embed", &json!({ "inputs": ["a", ""] })),
        422,
        "empty",
        "one empty text",
    );
    assert_error(
        post(server.addr, "/v1/embeddings", &json!({ "input": [] })),
        422,
        "empty",
        "openai: no inputs",
    );
    assert_error(
        post(server.addr, "/v1/embeddings", &json!({ "input": [[]] })),
        422,
        "empty",
        "openai: empty ids",
    );
}

#[test]
fn limits_are_413_and_auto_truncate_lifts_the_length_one() {
    let server = TestServer::start(ServeConfig {
        max_client_batch_size: 4,
        payload_limit: 4000,
        ..ServeConfig::default()
    });
    let five = json!({ "inputs": ["a", "b", "c", "d", "e"] });
    assert_error(
        post(server.addr, "/embed", &five),
        413,
        "validation",
        "5 inputs over 4",
    );
    assert_error(
        post(
            server.addr,
            "/v1/embeddings",
            &json!({ "input": ["a", "b", "c", "d", "e"] }),
        ),
        413,
        "validation",
        "openai: 5 inputs over 4",
    );
    let (status, _) = post(
        server.addr,
        "/embed",
        &json!({ "inputs": ["a", "b", "c", "d"] }),
    );
    assert_eq!(status, 200, "4 inputs are within the limit");

    let big = json!({ "inputs": "word ".repeat(1000) }).to_string();
    assert!(big.len() > 4000);
    assert_error(
        post_with(server.addr, "/embed", &[], big.as_bytes()),
        413,
        "payload_too_large",
        "body over 4000 bytes",
    );

    let long = fixture_sentences()[LONG_LINE].clone();
    assert!(long.len() < 3900, "the long line fits the payload limit");
    assert_error(
        post(server.addr, "/embed", &json!({ "inputs": long })),
        413,
        "validation",
        "input over 256 tokens",
    );
    assert_error(
        post(server.addr, "/v1/embeddings", &json!({ "input": long })),
        413,
        "validation",
        "openai: input over 256 tokens",
    );
    // The request's own `truncate` allows it, as does --auto-truncate.
    let want = &fixture_embeddings()[LONG_LINE * DIM..(LONG_LINE + 1) * DIM];
    let (status, body) = post(
        server.addr,
        "/embed",
        &json!({ "inputs": long, "truncate": true }),
    );
    assert_eq!(status, 200, "{body}");
    assert_match_fixture(&floats(&body[0]), want, "truncate: true");
    let truncating = TestServer::start(ServeConfig {
        auto_truncate: true,
        ..ServeConfig::default()
    });
    let (status, body) = post(truncating.addr, "/v1/embeddings", &json!({ "input": long }));
    assert_eq!(status, 200, "{body}");
    assert_match_fixture(
        &floats(&body["data"][0]["embedding"]),
        want,
        "--auto-truncate",
    );
    assert_eq!(body["usage"]["prompt_tokens"], 256);
}

#[test]
fn a_wrong_api_key_is_401() {
    let server = TestServer::start(ServeConfig {
        api_key: Some("sesame".into()),
        ..ServeConfig::default()
    });
    let body = json!({ "inputs": "hello" }).to_string();
    assert_error(
        post_with(server.addr, "/embed", &[], body.as_bytes()),
        401,
        "unauthorized",
        "no key",
    );
    assert_error(
        post_with(
            server.addr,
            "/embed",
            &[("Authorization", "Bearer open")],
            body.as_bytes(),
        ),
        401,
        "unauthorized",
        "wrong key",
    );
    assert_error(
        post_with(
            server.addr,
            "/v1/embeddings",
            &[("Authorization", "sesame")],
            json!({ "input": "x" }).to_string().as_bytes(),
        ),
        401,
        "unauthorized",
        "key without Bearer",
    );
    let (status, _) = post_with(
        server.addr,
        "/embed",
        &[("Authorization", "Bearer sesame")],
        body.as_bytes(),
    );
    assert_eq!(status, 200);
    let (status, _) = http(server.addr, "GET", "/info", &[], b"");
    assert_eq!(status, 401);
    let (status, _) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "health needs no key");
}

/// Waits (bounded) until `/metrics` reports `requests` in flight.
fn wait_in_flight(addr: SocketAddr, requests: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = format!("scalpel_queue_requests {requests}");
    loop {
        let (_, text) = http(addr, "GET", "/metrics", &[], b"");
        if text.lines().any(|l| l == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no request in flight after 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A gate the embedder's worker waits at after each forward, before it answers: it holds a
/// request in flight for as long as a test needs, however fast the machine.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let (_open, timeout) = self
            .opened
            .wait_timeout_while(open, Duration::from_secs(120), |open| !*open)
            .unwrap();
        assert!(!timeout.timed_out(), "the gate stayed shut for 120 s");
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

#[test]
fn past_max_concurrent_requests_is_429_at_once() {
    let gate = Arc::new(Gate::default());
    let waiter = gate.clone();
    let embedder = Embedder::builder(minilm_dir())
        .threads(1)
        .on_batch(move |_| waiter.wait())
        .build()
        .unwrap();
    let server = TestServer::over(
        Arc::new(embedder),
        Arc::new(Metrics::new().unwrap()),
        ServeConfig {
            max_concurrent_requests: 1,
            ..ServeConfig::default()
        },
    );
    let addr = server.addr;
    let held = std::thread::spawn(move || post(addr, "/embed", &json!({ "inputs": ["held"] })));
    wait_in_flight(addr, 1);
    let started = Instant::now();
    let refused = post(addr, "/embed", &json!({ "inputs": "hello" }));
    let waited = started.elapsed();
    gate.open();
    assert_error(
        refused,
        429,
        "overloaded",
        "second request with one allowed",
    );
    assert!(
        waited < Duration::from_secs(2),
        "the 429 came after {waited:?}, not at once"
    );
    let (status, body) = held.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 1);
    let (status, _) = post(addr, "/embed", &json!({ "inputs": "hello" }));
    assert_eq!(status, 200, "admitted again once the first is answered");
}

#[test]
fn info_reports_a_bf16_server_as_bfloat16() {
    let embedder = Embedder::builder(minilm_dir())
        .threads(1)
        .dtype(scalpel::tensor::DType::BF16)
        .build()
        .unwrap();
    let server = TestServer::over(
        Arc::new(embedder),
        Arc::new(Metrics::new().unwrap()),
        ServeConfig::default(),
    );
    let (status, info) = http(server.addr, "GET", "/info", &[], b"");
    assert_eq!(status, 200, "{info}");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["dtype"], "bfloat16");
}

#[test]
fn health_info_and_metrics() {
    let server = TestServer::start(ServeConfig::default());
    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    let (status, info) = http(server.addr, "GET", "/info", &[], b"");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["model_id"], "all-MiniLM-L6-v2");
    assert_eq!(info["dim"], 384);
    assert_eq!(info["max_input_length"], 256);
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["dtype"], "float32");
    assert_eq!(info["max_concurrent_requests"], 512);
    assert_eq!(info["max_client_batch_size"], 128);
    let (status, _) = post(server.addr, "/embed", &json!({ "inputs": ["one", "two"] }));
    assert_eq!(status, 200);
    let _ = post(server.addr, "/embed", &json!({ "inputs": [] }));
    let (status, text) = http(server.addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let count = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
    };
    assert!(count(r#"scalpel_requests_total{route="/embed",status="200"}"#) >= 1.0);
    assert!(count(r#"scalpel_requests_total{route="/embed",status="422"}"#) >= 1.0);
    assert!(count(r#"scalpel_request_duration_seconds_count{route="/embed",status="200"}"#) >= 1.0);
    assert!(count("scalpel_batch_size_count") >= 1.0);
    assert!(count("scalpel_batch_tokens_sum") >= 2.0);
    assert!(
        count("scalpel_tokens_total") >= 6.0,
        "[CLS] one [SEP], [CLS] two [SEP]"
    );
    assert!(count("scalpel_forward_tokens_per_second") > 0.0);
    count("scalpel_queue_requests");
    count("scalpel_queue_sequences");
}

/// Reads one response (head, and a `Content-Length` body) from a connection left open.
fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).unwrap();
        assert_eq!(
            n,
            1,
            "the connection closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

#[test]
fn sigterm_answers_the_request_in_flight_closes_idle_connections_and_exits_0() {
    let (mut child, mut stderr, addr) = serve_process(&[]);
    // A kept-alive connection answered once and then silent, and one that never sent anything:
    // neither may hold up the shutdown.
    let mut idle = connect(addr);
    write!(idle, "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut idle).0, 200);
    let mut silent = connect(addr);
    // The request in flight: the server answers `100 Continue` when its handler starts reading
    // the body, so from then on the request is the server's, however fast the machine; the body
    // is sent only after shutdown has begun.
    let body = json!({ "inputs": ["in flight at SIGTERM"] }).to_string();
    let mut in_flight = connect(addr);
    write!(
        in_flight,
        "POST /embed HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    assert_eq!(read_response(&mut in_flight).0, 100);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Shutdown has begun once the listener is closed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting 60 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    in_flight.write_all(body.as_bytes()).unwrap();
    let (status, text) = read_response(&mut in_flight);
    assert_eq!(
        status, 200,
        "the request in flight at SIGTERM is answered: {text}"
    );
    let rows: Vec<Vec<f32>> = serde_json::from_str(&text).unwrap();
    assert_eq!((rows.len(), rows[0].len()), (1, DIM));
    let (exit, rest) = exit_of(&mut child, &mut stderr, Duration::from_secs(60));
    assert!(exit.success(), "exit {exit:?}: {rest}");
    assert!(
        rest.contains("every admitted request has been answered"),
        "{rest}"
    );
    for (name, stream) in [("idle", &mut idle), ("silent", &mut silent)] {
        assert!(
            stream.read(&mut [0u8; 1]).map_or(true, |n| n == 0),
            "the {name} connection is still open"
        );
    }
}

/// `scalpel serve` on port 0 with `extra` flags: the process, its stderr, its address.
fn serve_process(
    extra: &[&str],
) -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    SocketAddr,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["serve", "--port", "0", "--threads", "1", "--device", "cpu"])
        .args(extra)
        .arg("--model")
        .arg(minilm_dir())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    for _ in 0..20 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(a) = line.trim().strip_prefix("listening on http://") {
            let addr = a.parse::<SocketAddr>().unwrap();
            return (child, stderr, addr);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the server did not print its address");
}

/// Waits up to `limit` for `child` to exit: its status and the rest of its stderr.
fn exit_of(
    child: &mut std::process::Child,
    stderr: &mut BufReader<std::process::ChildStderr>,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within {limit:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    (exit, rest)
}

#[test]
fn a_client_stalled_inside_its_request_cannot_hold_the_shutdown() {
    let (mut child, mut stderr, addr) = serve_process(&["--shutdown-timeout", "1"]);
    // Headers promising a body of 100 bytes, then 5 of them, then nothing (slowloris). The
    // `100 Continue` says the handler is reading the body, so the server holds the connection
    // before the signal comes, however fast the machine.
    let mut stalled = connect(addr);
    write!(
        stalled,
        "POST /embed HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response(&mut stalled).0, 100);
    stalled.write_all(b"{\"inp").unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (exit, rest) = exit_of(&mut child, &mut stderr, Duration::from_secs(30));
    assert!(exit.success(), "exit {exit:?}: {rest}");
    assert!(rest.contains("still open 1 s after the signal"), "{rest}");
    assert!(
        stalled.read(&mut [0u8; 1]).map_or(true, |n| n == 0),
        "the stalled connection is still open"
    );
}

#[test]
fn concurrent_callers_get_one_threads_results() {
    let (embedder, _) = shared();
    let sentences = fixture_sentences();
    let alone = embedder.embed(&sentences).unwrap();
    assert_match_fixture(&alone.concat(), &fixture_embeddings(), "one caller");
    // Four threads, each embedding every sentence in its own order and grouping, twice.
    let results: Vec<Vec<(usize, Vec<f32>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let sentences = &sentences;
                s.spawn(move || {
                    let mut got = Vec::new();
                    for round in 0..2 {
                        let order: Vec<usize> = (0..sentences.len())
                            .map(|i| (i * (2 * t + 1) + round) % sentences.len())
                            .collect();
                        for chunk in order.chunks(t + 3) {
                            let texts: Vec<&str> =
                                chunk.iter().map(|&i| sentences[i].as_str()).collect();
                            let rows = embedder.embed(&texts).unwrap();
                            got.extend(chunk.iter().copied().zip(rows));
                        }
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, got) in results.iter().enumerate() {
        assert_eq!(got.len(), 2 * sentences.len());
        for (i, row) in got {
            let diff = max_abs_diff(row, &alone[*i]);
            assert!(
                diff <= 1e-6,
                "thread {t}, sentence {i}: max |Δ| = {diff:e} against one caller"
            );
        }
    }
}

#[test]
fn queued_requests_share_forwards_within_the_token_budget() {
    let reports: Arc<Mutex<Vec<BatchReport>>> = Arc::default();
    let seen = reports.clone();
    let embedder = Embedder::builder(minilm_dir())
        .threads(2)
        .max_batch_tokens(256)
        .on_batch(move |b| seen.lock().unwrap().push(*b))
        .build()
        .unwrap();
    let sentences = fixture_sentences();
    let texts: Vec<&str> = sentences[..40].iter().map(String::as_str).collect();
    let (send, receive) = std::sync::mpsc::channel();
    // Queued at once: the worker takes what it finds and batches it.
    for (i, text) in texts.iter().enumerate() {
        let ids = embedder.tokenize(i, text, false).unwrap();
        let send = send.clone();
        embedder.submit(vec![ids], Normalize::AsModel, move |rows| {
            send.send((i, rows)).unwrap()
        });
    }
    let want = fixture_embeddings();
    for _ in 0..texts.len() {
        let (i, rows) = receive
            .recv_timeout(Duration::from_secs(120))
            .expect("every request answered");
        assert_match_fixture(
            &rows.unwrap(),
            &want[i * DIM..(i + 1) * DIM],
            &format!("request {i}"),
        );
    }
    let before = {
        let reports = reports.lock().unwrap();
        assert_eq!(
            reports.iter().map(|r| r.sequences).sum::<usize>(),
            texts.len()
        );
        assert!(
            reports.iter().all(|r| r.padded_tokens <= 256),
            "a forward over the budget: {reports:?}"
        );
        assert!(
            reports.iter().any(|r| r.requests > 1),
            "no two queued requests shared a forward: {reports:?}"
        );
        reports.len()
    };
    // One request bigger than the budget is split over forwards and answered once.
    let rows = embedder.embed(&sentences).unwrap();
    assert_match_fixture(&rows.concat(), &want, "split request");
    let reports = reports.lock().unwrap();
    let split = &reports[before..];
    assert!(
        split.len() >= 2,
        "44 sentences, one of 256 tokens, in {} forward(s)",
        split.len()
    );
    assert!(
        split
            .iter()
            .all(|r| r.padded_tokens <= 256 && r.requests == 1),
        "{split:?}"
    );
    assert_eq!(
        split.iter().map(|r| r.sequences).sum::<usize>(),
        sentences.len()
    );
}

#[test]
fn embedder_errors_name_the_problem() {
    let missing = Embedder::builder("/nonexistent/model")
        .build()
        .err()
        .expect("no model there");
    assert!(
        matches!(missing, EmbedError::Model(_))
            && missing.to_string().contains("/nonexistent/model"),
        "{missing}"
    );
    let threads = Embedder::builder(minilm_dir())
        .threads(0)
        .build()
        .err()
        .unwrap();
    assert!(threads.to_string().contains("threads"), "{threads}");
    let budget = Embedder::builder(minilm_dir())
        .max_batch_tokens(100)
        .build()
        .err()
        .unwrap();
    assert!(
        budget.to_string().contains("(100)") && budget.to_string().contains("(256)"),
        "{budget}"
    );
    let (embedder, _) = shared();
    let mut out = vec![0f32; DIM];
    match embedder.embed_into(&["a", "b"], &mut out) {
        Err(EmbedError::OutputSize { expected, got }) => {
            assert_eq!((expected, got), (2 * DIM, DIM))
        }
        other => panic!("{other:?}"),
    }
    match embedder.tokenize(7, &fixture_sentences()[LONG_LINE], false) {
        Err(EmbedError::TooLong {
            index: 7,
            tokens,
            limit: 256,
        }) => assert!(tokens > 256, "{tokens}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        embedder
            .tokenize(7, &fixture_sentences()[LONG_LINE], true)
            .unwrap()
            .len(),
        256
    );
    embedder
        .embed_into(&["a", "b"], &mut vec![0f32; 2 * DIM])
        .unwrap();
}
