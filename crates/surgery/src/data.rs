//! Training and evaluation text: plain sentence files.

use std::path::Path;

use crate::{io_err, Result, SurgeryError};

/// Non-blank lines of a UTF-8 text file, one sentence each. An empty or all-blank file is an
/// error: there would be nothing to train on.
pub fn read_sentences(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| SurgeryError::Invalid(format!("{}: not valid UTF-8 text", path.display())))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
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
