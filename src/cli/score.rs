use std::path::{Path, PathBuf};

use clap::builder::PossibleValue;
use clap::ValueEnum;
use scalpel::surgery::chart::{score_html, score_svg};
use scalpel::surgery::decoder::{score_decoder, DecoderCalibration};
use scalpel::surgery::score::{score_layers, Calibration, Metric, ScoreOptions, ScoreReport};

use super::{flags, CliResult};

/// One layer-importance metric: what `cut --auto` ranks by (`all` is not one, so the parser
/// refuses it there). grad-norm and drop-loss are for encoders, angular-last, drop-ppl and
/// greedy-ppl for decoders.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OneMetric {
    GradNorm,
    BlockInfluence,
    Angular,
    DropLoss,
    AngularLast,
    DropPpl,
    GreedyPpl,
}

impl OneMetric {
    fn metric(self) -> Metric {
        match self {
            OneMetric::GradNorm => Metric::GradNorm,
            OneMetric::BlockInfluence => Metric::BlockInfluence,
            OneMetric::Angular => Metric::Angular,
            OneMetric::DropLoss => Metric::DropLoss,
            OneMetric::AngularLast => Metric::AngularLast,
            OneMetric::DropPpl => Metric::DropPpl,
            OneMetric::GreedyPpl => Metric::GreedyPpl,
        }
    }
}

/// `score --metric`: one metric or `all`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MetricArg {
    One(OneMetric),
    All,
}

impl ValueEnum for MetricArg {
    fn value_variants<'a>() -> &'a [Self] {
        use OneMetric::*;
        &[
            MetricArg::One(GradNorm),
            MetricArg::One(BlockInfluence),
            MetricArg::One(Angular),
            MetricArg::One(DropLoss),
            MetricArg::One(AngularLast),
            MetricArg::One(DropPpl),
            MetricArg::One(GreedyPpl),
            MetricArg::All,
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            MetricArg::One(m) => m.to_possible_value(),
            MetricArg::All => Some(PossibleValue::new("all")),
        }
    }
}

/// How layers are scored; shared by `score` and `cut --auto`.
#[derive(clap::Args)]
pub struct Scoring {
    /// Calibration data: a text file (one sentence per line) or STS/SICK pair files; the
    /// gradient metric needs pair files. For a decoder, running text (e.g. wikitext), tokenized
    /// as one stream and cut into windows. Several files: `--data a b` or repeated flags.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Sentences (and positive pairs) sampled from the data.
    #[arg(long, default_value_t = 256, value_parser = flags::positive)]
    samples: usize,
    /// Span n of the angular distance between layers l and l+n.
    #[arg(long, default_value_t = 1, value_parser = flags::positive)]
    span: usize,
    /// Sentences per forward batch (pairs per contrastive batch for grad-norm).
    #[arg(long, default_value_t = 32, value_parser = flags::positive)]
    batch_size: usize,
    /// Decoders: calibration windows sampled from the text.
    #[arg(long, default_value_t = 8, value_parser = flags::positive)]
    windows: usize,
    /// Decoders: tokens per calibration window.
    #[arg(long, default_value_t = 128, value_parser = flags::positive)]
    window_tokens: usize,
}

impl Scoring {
    /// Scores `model` with `metrics`; `All` skips grad-norm (with a note) when the data has no
    /// positive pairs.
    pub fn run(
        &self,
        model: &Path,
        metric: MetricArg,
        target_layers: Option<usize>,
    ) -> CliResult<ScoreReport> {
        if self.data.is_empty() {
            return Err("--data is required: calibration sentences to score the layers on".into());
        }
        if super::is_decoder(model) {
            return self.run_decoder(model, metric, target_layers);
        }
        let data = Calibration::from_files(&self.data, self.samples)?;
        let metrics = match metric {
            MetricArg::One(m) => vec![m.metric()],
            MetricArg::All if data.pairs.is_empty() => {
                eprintln!("note: no positive pairs in --data (STS .tsv or SICK files): skipping grad-norm");
                vec![Metric::BlockInfluence, Metric::Angular, Metric::DropLoss]
            }
            MetricArg::All => Metric::ENCODER.to_vec(),
        };
        let mut encoder = super::load_encoder(model)?;
        let opts = ScoreOptions {
            metrics,
            span: self.span,
            batch_size: self.batch_size,
            target_layers,
        };
        Ok(score_layers(&mut encoder, &data, &opts)?)
    }

    /// Whether no --data was given.
    pub fn has_no_data(&self) -> bool {
        self.data.is_empty()
    }

    /// The decoder calibration windows of `--data`, tokenized by `checkpoint`'s tokenizer.
    pub fn decoder_windows(
        &self,
        checkpoint: &scalpel::models::llama::LlamaCheckpoint,
    ) -> CliResult<DecoderCalibration> {
        let ids = super::perplexity::text_token_ids(checkpoint, &self.data)?;
        Ok(DecoderCalibration::from_ids(
            &ids,
            self.window_tokens,
            self.windows,
        )?)
    }

    fn run_decoder(
        &self,
        model: &Path,
        metric: MetricArg,
        target_layers: Option<usize>,
    ) -> CliResult<ScoreReport> {
        let metrics = match metric {
            MetricArg::One(m) => vec![m.metric()],
            MetricArg::All => {
                let mut all = Metric::DECODER.to_vec();
                all.extend(target_layers.map(|_| Metric::GreedyPpl));
                all
            }
        };
        let (checkpoint, llama) = super::generate::load_llama(model)?;
        let data = self.decoder_windows(&checkpoint)?;
        Ok(score_decoder(
            &llama,
            &data,
            &metrics,
            self.span,
            target_layers,
        )?)
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    scoring: Scoring,
    #[arg(long, value_enum, default_value_t = MetricArg::All)]
    metric: MetricArg,
    /// Suggest which layers to drop to keep K.
    #[arg(long, value_parser = flags::positive)]
    target_layers: Option<usize>,
    #[arg(long)]
    json: bool,
    /// Write a chart: `.svg`, or `.html` (self-contained, with the table).
    #[arg(long)]
    report: Option<PathBuf>,
}

impl Args {
    pub fn model(&self) -> &Path {
        &self.model
    }
}

/// Per-layer importance on calibration data, each metric's suggested cut, and a chart.
pub fn run(a: Args) -> CliResult {
    if let Some(path) = &a.report {
        chart_body(path, None, &a.model)?;
    }
    let report = a.scoring.run(&a.model, a.metric, a.target_layers)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    if let Some(path) = &a.report {
        write_chart(path, &report, &a.model)?;
        eprintln!("chart -> {}", path.display());
    }
    Ok(())
}

pub fn write_chart(path: &Path, report: &ScoreReport, model: &Path) -> CliResult {
    let body = chart_body(path, Some(report), model)?;
    super::write_atomically(path, body.as_bytes(), &[model])
}

/// The chart in the format `path`'s extension names (an error for any other); without a report
/// only checks the extension, so a bad path fails before the scoring work.
fn chart_body(path: &Path, report: Option<&ScoreReport>, model: &Path) -> CliResult<String> {
    let title = format!("Layer scores: {}", model.display());
    let render = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => score_svg,
        Some("html" | "htm") => score_html,
        _ => {
            return Err(format!("{}: the report must end in .svg or .html", path.display()).into())
        }
    };
    Ok(report.map(|r| render(r, &title)).unwrap_or_default())
}
