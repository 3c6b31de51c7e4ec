//! Which layers of a Llama-family decoder matter, on windows of running text: the measures the
//! layer-pruning literature uses, each oriented higher = more important like the encoder's.
//!
//! - block influence (ShortGPT): `1 − cos(x_l, x_{l+1})` over every token;
//! - angular distance (Gromov et al.): `arccos(cos(x_l, x_{l+n}))/π` over every token
//!   (`angular`) or over each window's last token only (`angular-last`, as in the paper); a cut
//!   to k layers removes the contiguous block of `L − k` whose ends are closest;
//! - drop-Δperplexity: calibration perplexity with that one layer removed, minus the model's;
//! - greedy perplexity (SLEB): remove, one round at a time, the layer whose absence raises
//!   perplexity least, until k remain; a removed layer's score is the perplexity increase of
//!   its round, the kept ones have none.
//!
//! `x_l` is the residual stream entering layer l (`x_L` leaves the last), before the final norm.

use scalpel_autograd::{ops, Var};
use scalpel_models::llama::Llama;

use crate::cut::keep_llama_model_layers;
use crate::heal::BatchOrder;
use crate::score::{angular_scores, with_keep, Metric, MetricScores, ScoreReport};
use crate::{Result, SurgeryError};

/// Calibration for a decoder: equal-length windows of token ids cut from running text.
pub struct DecoderCalibration {
    pub windows: Vec<Vec<u32>>,
}

impl DecoderCalibration {
    /// Up to `count` windows of `len` tokens from `ids` (the text tokenized as one stream),
    /// a seeded sample spread over all of it; an error when the text has not one window.
    pub fn from_ids(ids: &[u32], len: usize, count: usize) -> Result<DecoderCalibration> {
        let available = ids.len() / len.max(1);
        if len < 2 || available == 0 {
            return Err(SurgeryError::Invalid(format!(
                "the calibration text has {} tokens: not one window of {len} (at least 2)",
                ids.len()
            )));
        }
        let order = BatchOrder::new(available, available, true, 0x05ca_19e1);
        let mut picked: Vec<usize> = order.batch(0).into_iter().take(count).collect();
        picked.sort_unstable();
        Ok(DecoderCalibration {
            windows: picked
                .into_iter()
                .map(|w| ids[w * len..(w + 1) * len].to_vec())
                .collect(),
        })
    }

    fn tokens(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
    }
}

/// Scores every layer of `model` with each of `metrics` (decoder metrics only).
pub fn score_decoder(
    model: &Llama,
    data: &DecoderCalibration,
    metrics: &[Metric],
    span: usize,
    target_layers: Option<usize>,
) -> Result<ScoreReport> {
    let layers = model.config.num_hidden_layers;
    if let Some(k) = target_layers {
        if k == 0 || k >= layers {
            return Err(SurgeryError::Invalid(format!(
                "--target-layers {k}: must keep between 1 and {} of the {layers} layers",
                layers - 1
            )));
        }
    }
    if span == 0 || span > layers {
        return Err(SurgeryError::Invalid(format!(
            "--span {span}: must be between 1 and {layers}"
        )));
    }
    let mut out = Vec::new();
    for &metric in metrics {
        let scores = match metric {
            Metric::BlockInfluence => {
                let d = distances(model, data, 1, Tokens::All, |c| 1.0 - c)?;
                with_keep(metric, d, target_layers)
            }
            Metric::Angular => angular(model, data, span, Tokens::All, target_layers)?,
            Metric::AngularLast => angular(model, data, span, Tokens::Last, target_layers)?,
            Metric::DropPpl => drop_one_perplexity(model, data, target_layers)?,
            Metric::GreedyPpl => greedy_perplexity(model, data, target_layers)?,
            Metric::GradNorm | Metric::DropLoss => {
                return Err(SurgeryError::Invalid(format!(
                    "{} scores sentence encoders; for a decoder use block-influence, angular, \
                     angular-last, drop-ppl or greedy-ppl",
                    metric.name()
                )))
            }
        };
        out.push(scores);
    }
    Ok(ScoreReport {
        layers,
        sentences: data.windows.len(),
        pairs: 0,
        span,
        target_layers,
        metrics: out,
    })
}

#[derive(Clone, Copy)]
enum Tokens {
    All,
    Last,
}

/// For each start layer l in `0..=L−span`, the mean over the chosen tokens of
/// `f(cos(x_l, x_{l+span}))`.
fn distances(
    model: &Llama,
    data: &DecoderCalibration,
    span: usize,
    tokens: Tokens,
    f: impl Fn(f64) -> f64,
) -> Result<Vec<f64>> {
    let layers = model.config.num_hidden_layers;
    let hidden = model.config.hidden_size;
    let mut sums = vec![0.0f64; layers + 1 - span];
    let mut count = 0usize;
    for window in &data.windows {
        let states: Vec<Vec<f32>> = model
            .layer_states(window, 1)?
            .iter()
            .map(|s| s.value().to_vec::<f32>())
            .collect();
        let rows = match tokens {
            Tokens::All => 0..window.len(),
            Tokens::Last => window.len() - 1..window.len(),
        };
        for t in rows {
            let row = t * hidden..(t + 1) * hidden;
            for (l, sum) in sums.iter_mut().enumerate() {
                let c =
                    crate::eval::cosine(&states[l][row.clone()], &states[l + span][row.clone()]);
                *sum += f(c.clamp(-1.0, 1.0));
            }
            count += 1;
        }
    }
    Ok(sums.into_iter().map(|s| s / count as f64).collect())
}

fn angular(
    model: &Llama,
    data: &DecoderCalibration,
    span: usize,
    tokens: Tokens,
    target: Option<usize>,
) -> Result<MetricScores> {
    let metric = match tokens {
        Tokens::All => Metric::Angular,
        Tokens::Last => Metric::AngularLast,
    };
    let layers = model.config.num_hidden_layers;
    angular_scores(metric, layers, span, target, |span, f| {
        distances(model, data, span, tokens, f)
    })
}

/// Perplexity of `model` on the calibration windows: every next-token prediction inside a
/// window (the first token of each has no context and is not scored).
pub fn calibration_perplexity(model: &Llama, data: &DecoderCalibration) -> Result<f64> {
    let hidden = model.config.hidden_size;
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    for window in &data.windows {
        let len = window.len();
        let states = model.hidden_states(window, 1, None)?;
        let rows = states
            .value()
            .clone()
            .reshape(&[len, hidden])?
            .rows(0..len - 1)?;
        let logits = model.logits(&Var::constant(rows))?;
        let targets: Vec<usize> = window[1..].iter().map(|&t| t as usize).collect();
        let mean = ops::cross_entropy(&logits, &targets)?
            .value()
            .to_vec::<f64>()[0];
        nll += mean * targets.len() as f64;
        scored += targets.len();
    }
    debug_assert_eq!(scored + data.windows.len(), data.tokens());
    Ok((nll / scored as f64).exp())
}

fn drop_one_perplexity(
    model: &Llama,
    data: &DecoderCalibration,
    target: Option<usize>,
) -> Result<MetricScores> {
    let layers = model.config.num_hidden_layers;
    let base = calibration_perplexity(model, data)?;
    let mut per_layer = Vec::with_capacity(layers);
    for removed in 0..layers {
        let kept: Vec<usize> = (0..layers).filter(|&l| l != removed).collect();
        per_layer
            .push(calibration_perplexity(&keep_llama_model_layers(model, &kept)?, data)? - base);
    }
    Ok(with_keep(Metric::DropPpl, per_layer, target))
}

fn greedy_perplexity(
    model: &Llama,
    data: &DecoderCalibration,
    target: Option<usize>,
) -> Result<MetricScores> {
    let Some(k) = target else {
        return Err(SurgeryError::Invalid(
            "greedy-ppl removes layers one round at a time down to a target: give \
             --target-layers (score) or --auto K (cut)"
                .into(),
        ));
    };
    let layers = model.config.num_hidden_layers;
    let mut kept: Vec<usize> = (0..layers).collect();
    let mut per_layer = vec![None; layers];
    let mut current = calibration_perplexity(model, data)?;
    while kept.len() > k {
        let mut best: Option<(usize, f64)> = None;
        for (i, _) in kept.iter().enumerate() {
            let mut trial = kept.clone();
            trial.remove(i);
            let ppl = calibration_perplexity(&keep_llama_model_layers(model, &trial)?, data)?;
            if best.is_none_or(|(_, b)| ppl < b) {
                best = Some((i, ppl));
            }
        }
        let (i, ppl) = best.expect("at least one layer is left to try");
        per_layer[kept.remove(i)] = Some(ppl - current);
        current = ppl;
    }
    Ok(MetricScores {
        metric: Metric::GreedyPpl,
        per_layer,
        keep: Some(kept),
    })
}
