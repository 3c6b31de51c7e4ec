//! Which layers matter: four per-layer measures on calibration data, side by side (GUIDE §3).
//! Every score is oriented the same way, higher = more important, so the layers a metric
//! suggests removing are always its lowest.
//!
//! - gradient norm: L2 norm of a layer's parameter gradients under the in-batch contrastive
//!   objective on positive pairs, averaged over batches ("layers with consistently low
//!   gradients");
//! - block influence (ShortGPT): `1 − cos(x_in, x_out)` averaged over real tokens;
//! - angular distance (Gromov et al.): `arccos(cos(x_l, x_{l+n}))/π` over a span of n layers,
//!   averaged over real tokens; the span starting at layer l is that layer's score;
//! - drop-Δloss: the distillation loss (MSE of sentence embeddings) against the unmodified model
//!   when that one layer is removed (the unmodified model's own loss is 0).

use scalpel_models::bert::ForwardOptions;
use scalpel_models::sentence::SentenceEncoder;
use scalpel_models::tokenizer::Batch;

use std::path::PathBuf;

use crate::cut::keep_layers;
use crate::data::{is_pair_file, read_pairs, read_training_text, Pair};
use crate::heal::{contrastive_loss, BatchOrder, CONTRASTIVE_SCALE};
use crate::{Result, SurgeryError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    GradNorm,
    BlockInfluence,
    Angular,
    DropLoss,
    /// Decoders: the angular distance over each window's last token.
    AngularLast,
    /// Decoders: calibration perplexity increase when that one layer is removed.
    DropPpl,
    /// Decoders: SLEB's greedy removal by perplexity.
    GreedyPpl,
}

impl Metric {
    /// What `--metric all` runs on a sentence encoder.
    pub const ENCODER: [Metric; 4] = [
        Metric::GradNorm,
        Metric::BlockInfluence,
        Metric::Angular,
        Metric::DropLoss,
    ];
    /// What `--metric all` runs on a decoder (greedy-ppl too when there is a target).
    pub const DECODER: [Metric; 4] = [
        Metric::BlockInfluence,
        Metric::Angular,
        Metric::AngularLast,
        Metric::DropPpl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::GradNorm => "grad-norm",
            Metric::BlockInfluence => "block-influence",
            Metric::Angular => "angular",
            Metric::DropLoss => "drop-loss",
            Metric::AngularLast => "angular-last",
            Metric::DropPpl => "drop-ppl",
            Metric::GreedyPpl => "greedy-ppl",
        }
    }
}

/// Calibration data: sentences for the activation metrics, positive pairs for the gradient one.
pub struct Calibration {
    pub sentences: Vec<String>,
    pub pairs: Vec<(String, String)>,
}

impl Calibration {
    /// Reads calibration data from text and pair files (see [`read_training_text`]) and samples
    /// `samples` sentences and positive pairs from it.
    pub fn from_files(paths: &[PathBuf], samples: usize) -> Result<Calibration> {
        let sentences = read_training_text(paths)?;
        let mut pairs = Vec::new();
        for path in paths {
            if is_pair_file(path)? {
                pairs.extend(
                    read_pairs(path)?
                        .pairs
                        .into_iter()
                        .filter(Pair::is_positive)
                        .map(|p| (p.first, p.second)),
                );
            }
        }
        Ok(Calibration::sample(&sentences, &pairs, samples))
    }

    /// At most `samples` sentences and `samples` pairs, a seeded sample spread over all the data.
    pub fn sample(sentences: &[String], pairs: &[(String, String)], samples: usize) -> Calibration {
        let pick = |len: usize| {
            let order = BatchOrder::new(len, len.max(1), true, 0x05ca_19e1);
            if len == 0 {
                Vec::new()
            } else {
                order.batch(0).into_iter().take(samples).collect()
            }
        };
        Calibration {
            sentences: pick(sentences.len())
                .into_iter()
                .map(|i| sentences[i].clone())
                .collect(),
            pairs: pick(pairs.len())
                .into_iter()
                .map(|i| pairs[i].clone())
                .collect(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ScoreOptions {
    pub metrics: Vec<Metric>,
    /// Span n of the angular distance.
    pub span: usize,
    pub batch_size: usize,
    /// Layers to keep when suggesting a cut; `None` suggests nothing.
    pub target_layers: Option<usize>,
}

/// One metric's scores.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MetricScores {
    pub metric: Metric,
    /// One score per layer, higher = more important; `None` where the metric does not reach
    /// (angular spans running past the last layer).
    pub per_layer: Vec<Option<f64>>,
    /// The layers this metric would keep for `target_layers`, sorted.
    pub keep: Option<Vec<usize>>,
}

impl MetricScores {
    pub fn dropped(&self, total: usize) -> Option<Vec<usize>> {
        self.keep
            .as_ref()
            .map(|k| (0..total).filter(|i| !k.contains(i)).collect())
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ScoreReport {
    pub layers: usize,
    pub sentences: usize,
    pub pairs: usize,
    pub span: usize,
    pub target_layers: Option<usize>,
    pub metrics: Vec<MetricScores>,
}

impl ScoreReport {
    pub fn get(&self, metric: Metric) -> Option<&MetricScores> {
        self.metrics.iter().find(|m| m.metric == metric)
    }

    /// A fixed-width table by layer, then each metric's suggested drop set.
    pub fn to_table(&self) -> String {
        let mut out = format!("{:<6}", "layer");
        for m in &self.metrics {
            out += &format!(" {:>16}", m.metric.name());
        }
        out.push('\n');
        for layer in 0..self.layers {
            out += &format!("{layer:<6}");
            for m in &self.metrics {
                let cell = m.per_layer[layer].map_or("-".into(), |v| format!("{v:.4e}"));
                out += &format!(" {cell:>16}");
            }
            out.push('\n');
        }
        if let Some(k) = self.target_layers {
            for m in &self.metrics {
                if let Some(dropped) = m.dropped(self.layers) {
                    out += &format!("{} keeps {k}: drop {dropped:?}\n", m.metric.name());
                }
            }
        }
        out
    }
}

/// Keeps the `k` highest-scoring layers (ties: the lower index).
pub fn keep_highest(per_layer: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..per_layer.len()).collect();
    order.sort_by(|&a, &b| per_layer[b].total_cmp(&per_layer[a]).then(a.cmp(&b)));
    let mut keep: Vec<usize> = order.into_iter().take(k).collect();
    keep.sort_unstable();
    keep
}

/// Scores every layer of `encoder` with each requested metric. The encoder's parameters are
/// thawed for the gradient metric and frozen again afterwards.
pub fn score_layers(
    encoder: &mut SentenceEncoder,
    data: &Calibration,
    opts: &ScoreOptions,
) -> Result<ScoreReport> {
    let layers = encoder.bert.num_layers();
    if let Some(k) = opts.target_layers {
        if k == 0 || k >= layers {
            return Err(SurgeryError::Invalid(format!(
                "--target-layers {k}: must keep between 1 and {} of the {layers} layers",
                layers - 1
            )));
        }
    }
    if opts.span == 0 || opts.span > layers {
        return Err(SurgeryError::Invalid(format!(
            "--span {}: must be between 1 and {layers}",
            opts.span
        )));
    }
    if data.sentences.is_empty() {
        return Err(SurgeryError::Invalid("no calibration sentences".into()));
    }
    let batch_size = opts.batch_size.max(1);
    let mut metrics = Vec::new();
    for &metric in &opts.metrics {
        let scores = match metric {
            Metric::GradNorm => grad_norm(encoder, &data.pairs, batch_size, opts.target_layers)?,
            Metric::BlockInfluence => {
                let per_layer =
                    token_distances(encoder, &data.sentences, batch_size, 1, |c| 1.0 - c)?;
                with_keep(metric, per_layer, opts.target_layers)
            }
            Metric::Angular => angular(
                encoder,
                &data.sentences,
                batch_size,
                opts.span,
                opts.target_layers,
            )?,
            Metric::DropLoss => {
                drop_loss(encoder, &data.sentences, batch_size, opts.target_layers)?
            }
            Metric::AngularLast | Metric::DropPpl | Metric::GreedyPpl => {
                return Err(SurgeryError::Invalid(format!(
                    "{} scores decoders; for a sentence encoder use grad-norm, \
                     block-influence, angular or drop-loss",
                    metric.name()
                )))
            }
        };
        metrics.push(scores);
    }
    Ok(ScoreReport {
        layers,
        sentences: data.sentences.len(),
        pairs: data.pairs.len(),
        span: opts.span,
        target_layers: opts.target_layers,
        metrics,
    })
}

pub(crate) fn with_keep(
    metric: Metric,
    per_layer: Vec<f64>,
    target: Option<usize>,
) -> MetricScores {
    MetricScores {
        metric,
        keep: target.map(|k| keep_highest(&per_layer, k)),
        per_layer: per_layer.into_iter().map(Some).collect(),
    }
}

fn batches<'a>(
    encoder: &'a SentenceEncoder,
    sentences: &'a [String],
    batch_size: usize,
) -> impl Iterator<Item = Result<Batch>> + 'a {
    sentences
        .chunks(batch_size)
        .map(|chunk| Ok(encoder.tokenizer.batch(chunk)?))
}

/// For each start layer l in `0..=L−span`, the mean over real tokens of `f(cos(h_l, h_{l+span}))`.
fn token_distances(
    encoder: &SentenceEncoder,
    sentences: &[String],
    batch_size: usize,
    span: usize,
    f: impl Fn(f64) -> f64,
) -> Result<Vec<f64>> {
    let layers = encoder.bert.num_layers();
    let hidden = encoder.bert.config.hidden_size;
    let mut sums = vec![0.0f64; layers + 1 - span];
    let mut tokens = 0usize;
    for batch in batches(encoder, sentences, batch_size) {
        let batch = batch?;
        let states: Vec<Vec<f32>> = encoder
            .bert
            .forward_hidden_states(&batch, &ForwardOptions::default())?
            .iter()
            .map(|s| s.value().to_vec::<f32>())
            .collect();
        let mask = batch.mask.to_vec::<f32>();
        for (t, _) in mask.iter().enumerate().filter(|(_, &m)| m > 0.0) {
            let row = t * hidden..(t + 1) * hidden;
            for (l, sum) in sums.iter_mut().enumerate() {
                let c =
                    crate::eval::cosine(&states[l][row.clone()], &states[l + span][row.clone()]);
                *sum += f(c.clamp(-1.0, 1.0));
            }
            tokens += 1;
        }
    }
    Ok(sums.into_iter().map(|s| s / tokens as f64).collect())
}

fn angular(
    encoder: &SentenceEncoder,
    sentences: &[String],
    batch_size: usize,
    span: usize,
    target: Option<usize>,
) -> Result<MetricScores> {
    let layers = encoder.bert.num_layers();
    angular_scores(Metric::Angular, layers, span, target, |span, f| {
        token_distances(encoder, sentences, batch_size, span, f)
    })
}

/// The angular distance `arccos(cos)/π` over a span of `span` layers as each start layer's
/// score, from `distances(span, f)` (the mean of `f(cos(x_l, x_{l+span}))` per start layer). A
/// cut to k layers removes one block of L−k consecutive layers: the block whose input and output
/// are closest.
pub(crate) fn angular_scores(
    metric: Metric,
    layers: usize,
    span: usize,
    target: Option<usize>,
    distances: impl Fn(usize, &dyn Fn(f64) -> f64) -> Result<Vec<f64>>,
) -> Result<MetricScores> {
    let distance = |c: f64| c.acos() / std::f64::consts::PI;
    let shown = distances(span, &distance)?;
    let keep = match target {
        None => None,
        Some(k) => {
            let block = layers - k;
            let d = distances(block, &distance)?;
            let start = (0..d.len())
                .min_by(|&a, &b| d[a].total_cmp(&d[b]))
                .expect("at least one block fits");
            Some(
                (0..layers)
                    .filter(|l| *l < start || *l >= start + block)
                    .collect(),
            )
        }
    };
    let mut per_layer: Vec<Option<f64>> = shown.into_iter().map(Some).collect();
    per_layer.resize(layers, None);
    Ok(MetricScores {
        metric,
        per_layer,
        keep,
    })
}

fn drop_loss(
    encoder: &SentenceEncoder,
    sentences: &[String],
    batch_size: usize,
    target: Option<usize>,
) -> Result<MetricScores> {
    let layers = encoder.bert.num_layers();
    let reference = encoder.embed(sentences, batch_size)?.to_vec::<f32>();
    let mut per_layer = Vec::with_capacity(layers);
    for removed in 0..layers {
        let kept: Vec<usize> = (0..layers).filter(|&l| l != removed).collect();
        let cut = SentenceEncoder {
            bert: keep_layers(&encoder.bert, &kept)?,
            tokenizer: encoder.tokenizer.clone(),
            config: encoder.config.clone(),
            dir: encoder.dir.clone(),
        };
        let emb = cut.embed(sentences, batch_size)?.to_vec::<f32>();
        let mse = emb
            .iter()
            .zip(&reference)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / emb.len() as f64;
        per_layer.push(mse);
    }
    Ok(with_keep(Metric::DropLoss, per_layer, target))
}

fn grad_norm(
    encoder: &mut SentenceEncoder,
    pairs: &[(String, String)],
    batch_size: usize,
    target: Option<usize>,
) -> Result<MetricScores> {
    if pairs.len() < 2 {
        return Err(SurgeryError::Invalid(
            "grad-norm needs at least 2 positive pairs (an STS .tsv with scores >= 4 or a SICK file as --data)".into(),
        ));
    }
    encoder.bert.params.unfreeze(|_| true);
    let result = layer_gradient_norms(encoder, pairs, batch_size);
    encoder.bert.params.freeze(|_| true);
    Ok(with_keep(Metric::GradNorm, result?, target))
}

/// Per layer, the L2 norm of all its parameters' gradients, averaged over batches of pairs.
fn layer_gradient_norms(
    encoder: &SentenceEncoder,
    pairs: &[(String, String)],
    batch_size: usize,
) -> Result<Vec<f64>> {
    let layers = encoder.bert.num_layers();
    let prefix = format!("{}encoder.layer.", encoder.bert.prefix);
    let mut sums = vec![0.0f64; layers];
    let mut count = 0usize;
    // A trailing batch of one pair has no negatives: skip it.
    for chunk in pairs.chunks(batch_size.max(2)).filter(|c| c.len() >= 2) {
        let (first, second): (Vec<&str>, Vec<&str>) =
            chunk.iter().map(|(a, b)| (a.as_str(), b.as_str())).unzip();
        let opts = ForwardOptions::default();
        let a = encoder.embed_batch(&encoder.tokenizer.batch(&first)?, &opts)?;
        let b = encoder.embed_batch(&encoder.tokenizer.batch(&second)?, &opts)?;
        let grads = contrastive_loss(&a, &b, CONTRASTIVE_SCALE)?.backward()?;
        let mut squares = vec![0.0f64; layers];
        for (name, var) in encoder.bert.params.iter() {
            let Some(rest) = name.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let layer: usize = rest
                .split('.')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(usize::MAX);
            if let (Some(g), Some(sq)) = (grads.get(var), squares.get_mut(layer)) {
                *sq += g.to_vec::<f64>().iter().map(|x| x * x).sum::<f64>();
            }
        }
        for (sum, sq) in sums.iter_mut().zip(squares) {
            *sum += sq.sqrt();
        }
        count += 1;
    }
    Ok(sums.into_iter().map(|s| s / count as f64).collect())
}
