//! Training and evaluation text: plain sentence files, and sentence-pair files in the SemEval STS
//! (`score<TAB>sentence1<TAB>sentence2`) and SICK (headed TSV) layouts.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{io_err, Result, SurgeryError};

/// One sentence pair with whatever gold annotation its file carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub first: String,
    pub second: String,
    /// Similarity score (STS 0–5, SICK relatedness 1–5); `None` for unscored STS lines.
    pub score: Option<f64>,
    /// SICK's entailment judgment (`ENTAILMENT`, `NEUTRAL`, `CONTRADICTION`).
    pub label: Option<String>,
}

impl Pair {
    /// Whether the pair counts as a paraphrase for contrastive training: STS score ≥ 4, or SICK
    /// entailment.
    pub fn is_positive(&self) -> bool {
        match &self.label {
            Some(label) => label == "ENTAILMENT",
            None => self.score.is_some_and(|s| s >= 4.0),
        }
    }
}

/// The pairs of one file.
#[derive(Clone, Debug)]
pub struct PairFile {
    pub path: PathBuf,
    pub pairs: Vec<Pair>,
}

impl PairFile {
    /// The pairs with a gold score: what STS evaluation uses.
    pub fn scored(&self) -> impl Iterator<Item = (&Pair, f64)> {
        self.pairs.iter().filter_map(|p| p.score.map(|s| (p, s)))
    }
}

/// The longest line a text or pair file may hold. A sentence is cut to the model's
/// `max_seq_length` tokens (256 for MiniLM: a few KB of text at most), so a longer line is not a
/// sentence, and refusing it keeps memory bounded for a file with no line breaks at all.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The lines of a UTF-8 text file without their `\n` or `\r\n` terminators (a final newline
/// adds no line), read through a bounded buffer: a line over [`MAX_LINE_BYTES`] or one that is
/// not UTF-8 is an error naming `file:line`.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let mut reader = LineReader::open(path)?;
    let mut lines = Vec::new();
    while let Some(line) = reader.next_line()? {
        lines.push(line);
    }
    Ok(lines)
}

struct LineReader<'a> {
    path: &'a Path,
    reader: BufReader<File>,
    line: usize,
}

impl<'a> LineReader<'a> {
    fn open(path: &'a Path) -> Result<LineReader<'a>> {
        let file = File::open(path).map_err(io_err(path))?;
        Ok(LineReader {
            path,
            reader: BufReader::new(file),
            line: 0,
        })
    }

    fn next_line(&mut self) -> Result<Option<String>> {
        let mut bytes = Vec::new();
        let limit = MAX_LINE_BYTES as u64 + 1; // room for the terminator
        let read = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut bytes)
            .map_err(io_err(self.path))?;
        if read == 0 {
            return Ok(None);
        }
        self.line += 1;
        let bad = |why: &str| {
            SurgeryError::Invalid(format!("{}:{}: {why}", self.path.display(), self.line))
        };
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        } else if read as u64 == limit {
            return Err(bad(&format!(
                "line longer than {MAX_LINE_BYTES} bytes: not a sentence (is this a text file?)"
            )));
        }
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| bad("not valid UTF-8 text"))
    }
}

const SICK_HEADER: &str = "pair_ID\tsentence_A\tsentence_B";

/// Whether `path` holds sentence pairs rather than one sentence per line: a `.tsv` file, or a
/// file starting with the SICK header.
pub fn is_pair_file(path: &Path) -> Result<bool> {
    if path.extension().is_some_and(|e| e == "tsv") {
        return Ok(true);
    }
    let first = LineReader::open(path)?.next_line()?;
    Ok(first.is_some_and(|line| line.starts_with(SICK_HEADER)))
}

/// Reads an STS or SICK file. A line that does not fit the layout is an error naming the file
/// and line; blank lines are skipped.
pub fn read_pairs(path: &Path) -> Result<PairFile> {
    let lines = read_lines(path)?;
    let sick = lines.first().is_some_and(|l| l.starts_with(SICK_HEADER));
    let bad =
        |line: usize, why: &str| SurgeryError::Invalid(format!("{}:{line}: {why}", path.display()));
    let mut pairs = Vec::new();
    for (i, line) in lines.iter().enumerate().skip(usize::from(sick)) {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let pair = if sick {
            if fields.len() != 5 {
                return Err(bad(
                    i + 1,
                    &format!(
                        "expected 5 tab-separated SICK fields, found {}",
                        fields.len()
                    ),
                ));
            }
            let score = parse_score(fields[3])
                .map_err(|why| bad(i + 1, &format!("relatedness `{}` is {why}", fields[3])))?;
            Pair {
                first: fields[1].to_string(),
                second: fields[2].to_string(),
                score: Some(score),
                label: Some(fields[4].trim().to_string()),
            }
        } else {
            if fields.len() != 3 {
                return Err(bad(
                    i + 1,
                    &format!(
                        "expected `score<TAB>sentence1<TAB>sentence2`, found {} fields",
                        fields.len()
                    ),
                ));
            }
            let score = match fields[0].trim() {
                "" => None,
                s => Some(
                    parse_score(s).map_err(|why| bad(i + 1, &format!("score `{s}` is {why}")))?,
                ),
            };
            Pair {
                first: fields[1].to_string(),
                second: fields[2].to_string(),
                score,
                label: None,
            }
        };
        if pair.first.trim().is_empty() || pair.second.trim().is_empty() {
            return Err(bad(i + 1, "empty sentence"));
        }
        pairs.push(pair);
    }
    if pairs.is_empty() {
        return Err(SurgeryError::Invalid(format!(
            "{}: no sentence pairs (the file is empty or blank)",
            path.display()
        )));
    }
    Ok(PairFile {
        path: path.to_owned(),
        pairs,
    })
}

/// A gold score: a finite number (NaN would rank arbitrarily, infinity has no rank average).
fn parse_score(text: &str) -> std::result::Result<f64, &'static str> {
    match text.trim().parse::<f64>() {
        Ok(score) if score.is_finite() => Ok(score),
        Ok(_) => Err("not a finite number"),
        Err(_) => Err("not a number"),
    }
}

/// Non-blank lines of a UTF-8 text file, one sentence each. An empty or all-blank file is an
/// error: there would be nothing to train on.
pub fn read_sentences(path: &Path) -> Result<Vec<String>> {
    let lines: Vec<String> = read_lines(path)?
        .iter()
        .map(|l| l.trim_end())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        return Err(SurgeryError::Invalid(format!(
            "{}: no sentences (the file is empty or blank)",
            path.display()
        )));
    }
    Ok(lines)
}

/// Training sentences from several files: both sentences of every pair of a pair file, every
/// line of a text file, in the order given.
pub fn read_training_text(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for path in paths {
        if is_pair_file(path)? {
            for p in read_pairs(path)?.pairs {
                out.push(p.first);
                out.push(p.second);
            }
        } else {
            out.extend(read_sentences(path)?);
        }
    }
    Ok(out)
}

/// Positive pairs (see [`Pair::is_positive`]) from pair files, for contrastive objectives.
pub fn read_positive_pairs(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for path in paths {
        if !is_pair_file(path)? {
            return Err(SurgeryError::Invalid(format!(
                "{}: a contrastive objective needs sentence pairs (an STS .tsv or SICK file)",
                path.display()
            )));
        }
        out.extend(
            read_pairs(path)?
                .pairs
                .into_iter()
                .filter(Pair::is_positive)
                .map(|p| (p.first, p.second)),
        );
    }
    if out.is_empty() {
        return Err(SurgeryError::Invalid(
            "no positive pairs (STS score >= 4 or SICK ENTAILMENT) in the data".into(),
        ));
    }
    Ok(out)
}
