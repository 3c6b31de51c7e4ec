//! [`Embedder`]: sentence embeddings for a Rust service, safe to share between threads.
//!
//! One embedder owns one model and one batching worker thread. Every caller tokenizes on its
//! own thread, then queues its sequences; the worker takes whatever is queued (up to a token
//! budget), sorts the sequences by length, runs as few forwards as the budget allows, and hands
//! each caller its rows. Concurrent callers are therefore batched together into full-pool
//! forwards rather than contending for the kernel threads, and one model's weights serve them
//! all. `scalpel embed` and `scalpel serve` are built on it.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
//! use scalpel::Embedder;
//!
//! let embedder = Embedder::builder(&model).threads(2).build()?;
//! let vectors = embedder.embed(&["A man is playing a guitar.", "Someone plays guitar."])?;
//! assert_eq!(vectors.len(), 2);
//! assert_eq!(vectors[0].len(), embedder.dim());
//! let cosine: f32 = vectors[0].iter().zip(&vectors[1]).map(|(a, b)| a * b).sum();
//! assert!(cosine > 0.7, "the two sentences say the same thing: {cosine}");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::collections::VecDeque;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use scalpel_autograd::{ops, Var};
use scalpel_models::bert::ForwardOptions;
use scalpel_models::sentence::SentenceEncoder;
use scalpel_models::tokenizer::{Batch, TextTokenizer};
use scalpel_models::ModelError;
use scalpel_tensor::{threads, DType, Device, Tensor};

/// What can go wrong embedding text.
#[derive(Debug)]
pub enum EmbedError {
    /// Loading the model, or the model itself failed (a tensor op, a device).
    Model(ModelError),
    /// Input `index` has `tokens` tokens (special tokens included), more than the model's
    /// limit, and truncation was not asked for.
    TooLong {
        /// Position of the input in the call.
        index: usize,
        /// Its length in tokens (with truncation off).
        tokens: usize,
        /// The model's maximum sequence length.
        limit: usize,
    },
    /// Input `index` holds a token id the vocabulary does not have.
    UnknownToken {
        /// Position of the input in the call.
        index: usize,
        /// The offending id.
        id: u32,
        /// The vocabulary size (valid ids are below it).
        vocab_size: usize,
    },
    /// Input `index` is empty (no text, or no token ids).
    EmptyInput {
        /// Position of the input in the call.
        index: usize,
    },
    /// `embed_into`'s output slice does not hold `inputs × dim` floats.
    OutputSize {
        /// The length needed.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A builder setting is out of range (the message names it).
    Config(String),
    /// The batching worker has stopped (it panicked, or the embedder is shutting down).
    Stopped,
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmbedError::Model(e) => write!(f, "{e}"),
            EmbedError::TooLong { index, tokens, limit } => write!(
                f,
                "input {index} has {tokens} tokens, more than the model's limit of {limit} (truncation is off)"
            ),
            EmbedError::UnknownToken { index, id, vocab_size } => write!(
                f,
                "input {index} holds token id {id}, outside the vocabulary (0..{vocab_size})"
            ),
            EmbedError::EmptyInput { index } => write!(f, "input {index} is empty"),
            EmbedError::OutputSize { expected, got } => write!(
                f,
                "the output slice holds {got} floats; inputs × dim is {expected}"
            ),
            EmbedError::Config(detail) => write!(f, "{detail}"),
            EmbedError::Stopped => write!(f, "the embedder's batching worker has stopped"),
        }
    }
}

impl std::error::Error for EmbedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EmbedError::Model(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ModelError> for EmbedError {
    fn from(e: ModelError) -> Self {
        EmbedError::Model(e)
    }
}

impl From<scalpel_tensor::TensorError> for EmbedError {
    fn from(e: scalpel_tensor::TensorError) -> Self {
        EmbedError::Model(e.into())
    }
}

impl From<scalpel_autograd::AutogradError> for EmbedError {
    fn from(e: scalpel_autograd::AutogradError) -> Self {
        EmbedError::Model(e.into())
    }
}

/// The result type of this module.
pub type Result<T, E = EmbedError> = std::result::Result<T, E>;

/// Whether an embedding is L2-normalised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Normalize {
    /// As the checkpoint's sentence-transformers files say (a `Normalize` module or not).
    #[default]
    AsModel,
    /// Always: unit-length vectors.
    Yes,
    /// Never: the mean-pooled vector as it is.
    No,
}

/// What one forward of the batching worker did, for metrics.
#[derive(Clone, Copy, Debug)]
pub struct BatchReport {
    /// Requests (calls) with at least one sequence in this forward.
    pub requests: usize,
    /// Sequences in the forward.
    pub sequences: usize,
    /// Real (unpadded) tokens.
    pub tokens: usize,
    /// Padded cost: sequences × the longest sequence's length.
    pub padded_tokens: usize,
    /// Wall time of the forward, pooling and read-back included.
    pub seconds: f64,
}

/// A callback the worker calls after every forward.
type BatchObserver = Arc<dyn Fn(&BatchReport) + Send + Sync>;

/// A request's embeddings, `sequences × dim`, row-major, or why there are none.
pub type Embeddings = Result<Vec<f32>>;

/// Settings for an [`Embedder`]; start with [`Embedder::builder`].
#[must_use]
pub struct EmbedderBuilder {
    model: PathBuf,
    threads: Option<usize>,
    device: Device,
    max_batch_tokens: usize,
    max_batch_requests: Option<usize>,
    max_batch_sequences: Option<usize>,
    prepack: bool,
    dtype: DType,
    observer: Option<BatchObserver>,
}

impl EmbedderBuilder {
    /// Kernel threads for this embedder's forwards (default: the process setting,
    /// `SCALPEL_THREADS`, else all cores). Must be at least 1.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// Where the model runs (default [`Device::Cpu`]); its weights are copied there once.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The most padded tokens (sequences × longest length) one forward may hold (default
    /// 16384). Queued requests are joined into a forward up to this budget; a request larger
    /// than it is split over several forwards. At least the model's maximum sequence length.
    pub fn max_batch_tokens(mut self, tokens: usize) -> Self {
        self.max_batch_tokens = tokens;
        self
    }

    /// The most requests one forward may serve (default: no limit but the token budget).
    pub fn max_batch_requests(mut self, requests: usize) -> Self {
        self.max_batch_requests = Some(requests);
        self
    }

    /// The most sequences one forward may hold (default: no limit but the token budget).
    pub fn max_batch_sequences(mut self, sequences: usize) -> Self {
        self.max_batch_sequences = Some(sequences);
        self
    }

    /// Whether to pack every linear weight for the GEMM at start-up (default on): otherwise the
    /// first small batch pays it (25–28 ms for all-MiniLM-L6-v2 against 1.5 ms after, 1×16).
    /// Packing applies on the CPU only.
    pub fn prepack(mut self, prepack: bool) -> Self {
        self.prepack = prepack;
        self
    }

    /// The format of the linear layers' weights and products (default [`DType::F32`], exact):
    /// [`DType::BF16`] holds those weights in bf16 and runs each linear layer as a bf16 GEMM
    /// with f32 accumulation, everything else in f32
    /// ([`Bert::set_linear_dtype`](scalpel_models::bert::Bert::set_linear_dtype)). BF16 runs on
    /// the CPU only.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Calls `observer` on the worker thread after every forward (for metrics; keep it cheap).
    pub fn on_batch(mut self, observer: impl Fn(&BatchReport) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Loads the model, moves it to the device, packs its weights if asked, and starts the
    /// batching worker. Also raises the allocator's mmap threshold
    /// ([`scalpel_tensor::heap::keep_freed_buffers`]) so steady-state forwards reuse freed
    /// activation buffers.
    pub fn build(self) -> Result<Embedder> {
        if self.threads == Some(0) {
            return Err(EmbedError::Config("threads must be at least 1".into()));
        }
        if self.max_batch_requests == Some(0) || self.max_batch_sequences == Some(0) {
            return Err(EmbedError::Config(
                "max batch requests and max batch sequences must be at least 1".into(),
            ));
        }
        scalpel_tensor::heap::keep_freed_buffers();
        let mut encoder = SentenceEncoder::load(&self.model)?;
        let max_seq_len = encoder.config.max_seq_length;
        if self.max_batch_tokens < max_seq_len {
            return Err(EmbedError::Config(format!(
                "max batch tokens ({}) must be at least the model's maximum sequence length ({max_seq_len})",
                self.max_batch_tokens
            )));
        }
        if self.dtype != DType::F32 && !self.device.is_cpu() {
            return Err(EmbedError::Config(format!(
                "{:?} inference runs on the CPU only, not on {}",
                self.dtype,
                self.device.name()
            )));
        }
        encoder.bert.set_linear_dtype(self.dtype)?;
        encoder.to_device(&self.device)?;
        if self.prepack && self.device.is_cpu() {
            encoder.bert.prepack_linear_weights()?;
        }
        let dim = encoder.bert.config.hidden_size;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            work_queued: Condvar::new(),
        });
        let worker = Worker {
            limits: Limits {
                tokens: self.max_batch_tokens,
                requests: self.max_batch_requests.unwrap_or(usize::MAX),
                sequences: self.max_batch_sequences.unwrap_or(usize::MAX),
            },
            threads: self.threads,
            model_normalizes: encoder.config.normalize,
            observer: self.observer,
            shared: shared.clone(),
        };
        let tokenizer = encoder.tokenizer.clone();
        let vocab_size = encoder.bert.config.vocab_size;
        let device_name = self.device.name();
        let handle = std::thread::Builder::new()
            .name("scalpel-embedder".into())
            .spawn(move || worker.run(&encoder))
            .map_err(|e| EmbedError::Config(format!("cannot start the batching worker: {e}")))?;
        Ok(Embedder {
            shared,
            worker: Some(handle),
            tokenizer,
            dim,
            max_seq_len,
            vocab_size,
            device_name,
            dtype: self.dtype,
            model: self.model,
        })
    }
}

/// Sentence embeddings from one model, shared by any number of threads (`Send + Sync`).
///
/// Calls from several threads at once are queued for one batching worker, which joins them
/// into shared forwards; each forward uses every kernel thread. Dropping the embedder finishes
/// the queued work, then stops the worker.
pub struct Embedder {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    tokenizer: TextTokenizer,
    dim: usize,
    max_seq_len: usize,
    vocab_size: usize,
    device_name: String,
    dtype: DType,
    model: PathBuf,
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Embedder>();
};

impl Embedder {
    /// Settings for an embedder of the sentence-transformers model folder `model` (config.json,
    /// model.safetensors, tokenizer.json, and the pooling files).
    pub fn builder(model: impl AsRef<Path>) -> EmbedderBuilder {
        EmbedderBuilder {
            model: model.as_ref().to_owned(),
            threads: None,
            device: Device::Cpu,
            max_batch_tokens: 16384,
            max_batch_requests: None,
            max_batch_sequences: None,
            prepack: true,
            dtype: DType::F32,
            observer: None,
        }
    }

    /// The embedding width (the model's hidden size: 384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The longest input in tokens, special tokens included (sentence-transformers'
    /// `max_seq_length`: 256 for all-MiniLM-L6-v2); [`embed`](Self::embed) truncates to it.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// The number of token ids the model knows.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The device's name (`cpu`, `emu (CPU emulator)`, `cuda (...)`).
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The format of the linear layers ([`EmbedderBuilder::dtype`]).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The model folder this embedder was built from.
    pub fn model(&self) -> &Path {
        &self.model
    }

    /// Embeddings of `texts`, one vector of [`dim`](Self::dim) floats each, in input order, as
    /// sentence-transformers computes them (inputs longer than
    /// [`max_seq_len`](Self::max_seq_len) are truncated).
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        let flat = self.embed_flat(texts)?;
        Ok(flat.chunks_exact(self.dim).map(<[f32]>::to_vec).collect())
    }

    /// Like [`embed`](Self::embed), writing the vectors row after row into `out`, which must
    /// hold exactly `texts.len() × dim` floats.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    /// let embedder = scalpel::Embedder::builder(&model).build()?;
    /// let mut out = vec![0f32; 3 * embedder.dim()];
    /// embedder.embed_into(&["one", "two", "three"], &mut out)?;
    /// let norm: f32 = out[..embedder.dim()].iter().map(|x| x * x).sum::<f32>().sqrt();
    /// assert!((norm - 1.0).abs() < 1e-5); // all-MiniLM-L6-v2 normalises its embeddings
    /// assert!(embedder.embed_into(&["one"], &mut out).is_err()); // wrong output size
    /// # Ok(())
    /// # }
    /// ```
    pub fn embed_into<S: AsRef<str>>(&self, texts: &[S], out: &mut [f32]) -> Result<()> {
        let expected = texts.len() * self.dim;
        if out.len() != expected {
            return Err(EmbedError::OutputSize {
                expected,
                got: out.len(),
            });
        }
        out.copy_from_slice(&self.embed_flat(texts)?);
        Ok(())
    }

    fn embed_flat<S: AsRef<str>>(&self, texts: &[S]) -> Embeddings {
        let sequences = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let (send, receive) = mpsc::sync_channel(1);
        self.submit(sequences, Normalize::AsModel, move |result| {
            // The caller is blocked on `receive` until this is sent, so it cannot fail.
            let _ = send.send(result);
        });
        receive.recv().map_err(|_| EmbedError::Stopped)?
    }

    /// Token ids of `text` (special tokens included). Longer than
    /// [`max_seq_len`](Self::max_seq_len): truncated if `truncate`, else
    /// [`EmbedError::TooLong`] naming input `index`. Empty text is [`EmbedError::EmptyInput`].
    pub fn tokenize(&self, index: usize, text: &str, truncate: bool) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Err(EmbedError::EmptyInput { index });
        }
        let (ids, overflow) = self.tokenizer.encode_with_overflow(text)?;
        if overflow > 0 && !truncate {
            return Err(EmbedError::TooLong {
                index,
                tokens: ids.len() + overflow,
                limit: self.max_seq_len,
            });
        }
        Ok(ids)
    }

    /// Checks caller-supplied token ids (used as given: add `[CLS]`/`[SEP]` yourself): not
    /// empty, every id in the vocabulary, and no longer than [`max_seq_len`](Self::max_seq_len)
    /// (cut to it if `truncate`).
    pub fn check_ids(&self, index: usize, mut ids: Vec<u32>, truncate: bool) -> Result<Vec<u32>> {
        if ids.is_empty() {
            return Err(EmbedError::EmptyInput { index });
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EmbedError::UnknownToken {
                index,
                id,
                vocab_size: self.vocab_size,
            });
        }
        if ids.len() > self.max_seq_len {
            if !truncate {
                return Err(EmbedError::TooLong {
                    index,
                    tokens: ids.len(),
                    limit: self.max_seq_len,
                });
            }
            ids.truncate(self.max_seq_len);
        }
        Ok(ids)
    }

    /// Queues already tokenized `sequences` (from [`tokenize`](Self::tokenize) or
    /// [`check_ids`](Self::check_ids)) and returns at once; the batching worker calls `done`
    /// with the `sequences.len() × dim` embeddings when their forward has run. This is the
    /// entry point for async callers (`done` can complete a future); [`embed`](Self::embed)
    /// blocks on it.
    pub fn submit(
        &self,
        sequences: Vec<Vec<u32>>,
        normalize: Normalize,
        done: impl FnOnce(Embeddings) + Send + 'static,
    ) {
        if sequences.is_empty() {
            return done(Ok(Vec::new()));
        }
        let mut queue = self.shared.queue.lock().unwrap();
        if queue.stopping {
            drop(queue);
            return done(Err(EmbedError::Stopped));
        }
        queue.requests.push_back(Request {
            output: vec![0.0; sequences.len() * self.dim],
            remaining: sequences.len(),
            sequences,
            normalize,
            done: Some(Box::new(done)),
        });
        drop(queue);
        self.shared.work_queued.notify_one();
    }

    /// Whether the batching worker is alive (it only stops when the embedder is dropped).
    pub fn is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Sequences waiting for a forward (not counting the forward now running).
    pub fn queued_sequences(&self) -> usize {
        let queue = self.shared.queue.lock().unwrap();
        queue.requests.iter().map(|r| r.sequences.len()).sum()
    }
}

impl Drop for Embedder {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().stopping = true;
        self.shared.work_queued.notify_one();
        if let Some(worker) = self.worker.take() {
            // A panicked worker has already answered nothing more; its requests' senders were
            // dropped, so their callers saw `Stopped`.
            let _ = worker.join();
        }
    }
}

struct Request {
    sequences: Vec<Vec<u32>>,
    normalize: Normalize,
    /// Filled row by row as the sequences' forwards complete.
    output: Vec<f32>,
    remaining: usize,
    /// Taken when the request is answered.
    done: Option<Box<dyn FnOnce(Embeddings) + Send>>,
}

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    stopping: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work_queued: Condvar,
}

#[derive(Clone, Copy)]
struct Limits {
    tokens: usize,
    requests: usize,
    sequences: usize,
}

struct Worker {
    limits: Limits,
    threads: Option<usize>,
    model_normalizes: bool,
    observer: Option<BatchObserver>,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(self, encoder: &SentenceEncoder) {
        while let Some(mut taken) = self.next_requests() {
            let threads = self.threads.unwrap_or_else(threads::num_threads);
            let result = panic::catch_unwind(AssertUnwindSafe(|| {
                threads::with_num_threads(threads, || self.serve(encoder, &mut taken))
            }));
            let failure = match result {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(payload) => panic_message(&payload),
            };
            // Every request of this group not yet answered gets the error (as text: a model
            // error is not `Clone`), and the worker goes on with the queue.
            for done in taken.iter_mut().filter_map(|r| r.done.take()) {
                done(Err(
                    ModelError::Input(format!("forward failed: {failure}")).into()
                ));
            }
        }
    }

    /// Blocks until requests are queued, then takes them from the front while their padded cost
    /// (all their sequences at the longest length among them) fits the token budget; the first
    /// one always, however large (it is split over forwards). `None` once stopping and drained.
    fn next_requests(&self) -> Option<Vec<Request>> {
        let mut queue = self.shared.queue.lock().unwrap();
        while queue.requests.is_empty() {
            if queue.stopping {
                return None;
            }
            queue = self.shared.work_queued.wait(queue).unwrap();
        }
        let mut taken = vec![queue.requests.pop_front()?];
        let (mut count, mut longest) = padded_shape(&taken[0].sequences, (0, 0));
        while taken.len() < self.limits.requests {
            let Some(next) = queue.requests.front() else {
                break;
            };
            let (c, l) = padded_shape(&next.sequences, (count, longest));
            if c * l > self.limits.tokens || c > self.limits.sequences {
                break;
            }
            (count, longest) = (c, l);
            taken.extend(queue.requests.pop_front());
        }
        Some(taken)
    }

    /// Runs every sequence of `taken` longest first, in forwards within the limits, and answers
    /// each request as soon as its last row is in.
    fn serve(&self, encoder: &SentenceEncoder, taken: &mut [Request]) -> Result<()> {
        let mut order: Vec<(usize, usize)> = taken
            .iter()
            .enumerate()
            .flat_map(|(r, req)| (0..req.sequences.len()).map(move |s| (r, s)))
            .collect();
        order.sort_by_key(|&(r, s)| std::cmp::Reverse(taken[r].sequences[s].len()));
        let mut start = 0;
        while start < order.len() {
            // Sorted longest first, so the first sequence sets the padded length.
            let length = |&(r, s): &(usize, usize)| taken[r].sequences[s].len();
            let longest = length(&order[start]);
            let fit = (self.limits.tokens / longest.max(1)).clamp(1, self.limits.sequences);
            // A sequence under 3/4 of the longest starts the next forward: padded, it would
            // spend over a quarter of its cost on padding, and a padded token costs about as
            // much as a real one (~70 µs at 32 × 128 on 2 threads) while a forward's fixed cost
            // is ~1.5 ms (1 × 16), i.e. some 20 tokens' worth.
            let group_len = order[start..]
                .iter()
                .take(fit)
                .take_while(|entry| length(entry) * 4 >= longest * 3)
                .count();
            let group = &order[start..start + group_len];
            start += group.len();
            let began = Instant::now();
            let seqs: Vec<Vec<u32>> = group
                .iter()
                .map(|&(r, s)| std::mem::take(&mut taken[r].sequences[s]))
                .collect();
            let pooled = pooled_embeddings(encoder, &seqs)?;
            let dim = pooled.dim(-1);
            let normalized = if group
                .iter()
                .any(|&(r, _)| self.normalizes(taken[r].normalize))
            {
                Some(ops_l2_normalize(&pooled)?)
            } else {
                None
            };
            let raw = pooled.to_vec::<f32>();
            let unit = normalized.map(|t| t.to_vec::<f32>());
            for (row, &(r, s)) in group.iter().enumerate() {
                let request = &mut taken[r];
                let source = match &unit {
                    Some(unit) if self.normalizes(request.normalize) => unit,
                    _ => &raw,
                };
                request.output[s * dim..(s + 1) * dim]
                    .copy_from_slice(&source[row * dim..(row + 1) * dim]);
                request.remaining -= 1;
            }
            if let Some(observer) = &self.observer {
                let mut requests: Vec<usize> = group.iter().map(|&(r, _)| r).collect();
                requests.sort_unstable();
                requests.dedup();
                observer(&BatchReport {
                    requests: requests.len(),
                    sequences: group.len(),
                    tokens: seqs.iter().map(Vec::len).sum(),
                    padded_tokens: group.len() * longest,
                    seconds: began.elapsed().as_secs_f64(),
                });
            }
            // Answer the requests this forward completed; the rest wait for later groups.
            for request in taken.iter_mut().filter(|r| r.remaining == 0) {
                if let Some(done) = request.done.take() {
                    done(Ok(std::mem::take(&mut request.output)));
                }
            }
        }
        Ok(())
    }

    fn normalizes(&self, normalize: Normalize) -> bool {
        match normalize {
            Normalize::AsModel => self.model_normalizes,
            Normalize::Yes => true,
            Normalize::No => false,
        }
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a kernel panicked".into())
}

/// `(count, longest)` of a batch after adding `sequences` to one of shape `so_far`.
fn padded_shape(sequences: &[Vec<u32>], so_far: (usize, usize)) -> (usize, usize) {
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(0);
    (so_far.0 + sequences.len(), so_far.1.max(longest))
}

/// Mean-pooled (not normalised) embeddings of one padded batch, `[batch, dim]` on the host.
fn pooled_embeddings(encoder: &SentenceEncoder, sequences: &[Vec<u32>]) -> Result<Tensor> {
    let batch = Batch::from_ids(sequences).placed(&encoder.bert.device())?;
    let hidden = encoder.bert.forward(&batch, &ForwardOptions::default())?;
    let pooled = ops::mean_pool(&hidden, &Var::constant(batch.mask.clone()))?;
    Ok(pooled.value().to_host()?)
}

/// Unit-length rows, by the same kernel the model's `Normalize` module runs on the CPU.
fn ops_l2_normalize(pooled: &Tensor) -> Result<Tensor> {
    Ok(scalpel_tensor::ops::l2_normalize(pooled)?.0)
}
