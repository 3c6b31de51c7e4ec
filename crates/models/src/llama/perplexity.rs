//! Sliding-window perplexity as in transformers' perplexity guide: windows of `context` tokens
//! starting every `stride` tokens; each window scores only the tokens the previous one did not
//! reach (all but the first token in the first window), each predicted from everything before it
//! in the window.

use scalpel_autograd::{ops, Var};

use super::Llama;
use crate::{ModelError, Result};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    /// Tokens whose negative log-likelihood this window contributed.
    pub scored: usize,
    pub mean_nll: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub context: usize,
    pub stride: usize,
    pub tokens: usize,
    pub tokens_scored: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub windows: Vec<Window>,
}

pub fn perplexity(model: &Llama, ids: &[u32], context: usize, stride: usize) -> Result<Perplexity> {
    let max = model.config.max_position_embeddings;
    if context < 2 || context > max {
        return Err(ModelError::Input(format!(
            "a context of {context} tokens: it must be at least 2 and at most the model's {max}"
        )));
    }
    if stride == 0 || stride > context {
        return Err(ModelError::Input(format!(
            "a stride of {stride} with a context of {context}: it must be between 1 and the \
             context (a longer stride would skip tokens)"
        )));
    }
    if ids.len() < 2 {
        return Err(ModelError::Input(format!(
            "{} tokens of text: perplexity needs at least 2",
            ids.len()
        )));
    }
    let h = model.config.hidden_size;
    let (mut windows, mut nll_sum, mut prev_end) = (Vec::new(), 0.0f64, 0);
    for begin in (0..ids.len()).step_by(stride) {
        let end = (begin + context).min(ids.len());
        let len = end - begin;
        // Window positions whose token is scored; the first token of a window has no context.
        let first = (len - (end - prev_end)).max(1);
        let hidden = model.hidden_states(&ids[begin..end], 1, None)?;
        // Only the predicting rows go through the LM head (its 49152 columns dominate).
        let rows = hidden
            .value()
            .clone()
            .reshape(&[len, h])?
            .rows(first - 1..len - 1)?;
        let logits = model.logits(&Var::constant(rows))?;
        let targets: Vec<usize> = ids[begin + first..end]
            .iter()
            .map(|&t| t as usize)
            .collect();
        let mean_nll = f64::from(
            ops::cross_entropy(&logits, &targets)?
                .value()
                .to_vec::<f32>()[0],
        );
        nll_sum += mean_nll * targets.len() as f64;
        windows.push(Window {
            begin,
            end,
            scored: targets.len(),
            mean_nll,
        });
        prev_end = end;
        if end == ids.len() {
            break;
        }
    }
    let tokens_scored: usize = windows.iter().map(|w| w.scored).sum();
    let mean_nll = nll_sum / tokens_scored as f64;
    Ok(Perplexity {
        context,
        stride,
        tokens: ids.len(),
        tokens_scored,
        mean_nll,
        perplexity: mean_nll.exp(),
        windows,
    })
}
