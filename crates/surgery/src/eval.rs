//! Evaluation as GUIDE §4 and sentence-transformers define it: Spearman correlation between the
//! cosine similarity of the two sentences' embeddings and the gold score, over scored pairs; and
//! agreement with a teacher, the mean cosine between the two models' embeddings.

use std::collections::HashMap;
use std::time::Instant;

use scalpel_models::sentence::SentenceEncoder;

use crate::data::PairFile;
use crate::{Result, SurgeryError};

/// Sentences embedded per batch during evaluation.
pub const EVAL_BATCH: usize = 64;

/// Ranks from 1, ties sharing the mean of the ranks they span (as scipy's `rankdata`).
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        let mean_rank = (start + end + 1) as f64 / 2.0;
        for &i in &order[start..end] {
            out[i] = mean_rank;
        }
        start = end;
    }
    out
}

/// Pearson correlation; NaN when either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman's rank correlation: Pearson over tie-averaged ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Embeddings of distinct sentences, computed once each.
pub struct EmbeddingTable {
    index: HashMap<String, usize>,
    values: Vec<f32>,
    dim: usize,
}

impl EmbeddingTable {
    pub fn build(encoder: &SentenceEncoder, sentences: &[&str]) -> Result<EmbeddingTable> {
        let mut index = HashMap::new();
        let mut distinct = Vec::new();
        for &s in sentences {
            index.entry(s.to_string()).or_insert_with(|| {
                distinct.push(s);
                distinct.len() - 1
            });
        }
        let embedded = encoder.embed(&distinct, EVAL_BATCH)?;
        Ok(EmbeddingTable {
            index,
            dim: encoder.bert.config.hidden_size,
            values: embedded.to_vec::<f32>(),
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn get(&self, sentence: &str) -> &[f32] {
        let i = self.index[sentence];
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-300)
}

/// One file's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FileScore {
    pub path: String,
    pub pairs: usize,
    /// Spearman × 100.
    pub spearman: f64,
}

/// The whole evaluation, as `scalpel eval --json` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub files: Vec<FileScore>,
    pub mean_spearman: f64,
    /// Mean cosine between the model's and the teacher's embeddings of the same sentences.
    pub teacher_cosine: Option<f64>,
    pub sentences_per_second: f64,
}

/// Spearman correlation needs at least two scored pairs whose gold scores are not all equal;
/// otherwise it is 0/0, which would be reported as `null`.
pub fn check_rankable(files: &[PairFile]) -> Result<()> {
    for file in files {
        let mut gold = file.scored().map(|(_, score)| score);
        let first = gold.next();
        if !gold.any(|score| Some(score) != first) {
            return Err(SurgeryError::Invalid(format!(
                "{}: cannot rank by Spearman correlation: it needs at least two scored pairs \
                 with different gold scores",
                file.path.display()
            )));
        }
    }
    Ok(())
}

/// Scores `encoder` on each file's scored pairs and, with a teacher, measures agreement on every
/// distinct sentence of the files.
pub fn evaluate(
    encoder: &SentenceEncoder,
    files: &[PairFile],
    teacher: Option<&SentenceEncoder>,
) -> Result<EvalReport> {
    check_rankable(files)?;
    let sentences: Vec<&str> = files
        .iter()
        .flat_map(|f| f.scored())
        .flat_map(|(p, _)| [p.first.as_str(), p.second.as_str()])
        .collect();
    let started = Instant::now();
    let table = EmbeddingTable::build(encoder, &sentences)?;
    let sentences_per_second = table.len() as f64 / started.elapsed().as_secs_f64();
    let mut scores = Vec::new();
    for file in files {
        let (predicted, gold): (Vec<f64>, Vec<f64>) = file
            .scored()
            .map(|(p, gold)| (cosine(table.get(&p.first), table.get(&p.second)), gold))
            .unzip();
        let rho = spearman(&predicted, &gold);
        if !rho.is_finite() {
            // The gold side was checked above: only a model giving every pair one cosine is left.
            return Err(SurgeryError::Invalid(format!(
                "{}: Spearman correlation is undefined: the model gives all {} pairs the same \
                 cosine similarity",
                file.path.display(),
                gold.len()
            )));
        }
        scores.push(FileScore {
            path: file.path.display().to_string(),
            pairs: gold.len(),
            spearman: 100.0 * rho,
        });
    }
    let teacher_cosine = match teacher {
        None => None,
        Some(t) => {
            let reference = EmbeddingTable::build(t, &sentences)?;
            let total: f64 = table
                .index
                .keys()
                .map(|s| cosine(table.get(s), reference.get(s)))
                .sum();
            Some(total / table.len() as f64)
        }
    };
    let mean_spearman = scores.iter().map(|s| s.spearman).sum::<f64>() / scores.len() as f64;
    Ok(EvalReport {
        files: scores,
        mean_spearman,
        teacher_cosine,
        sentences_per_second,
    })
}
