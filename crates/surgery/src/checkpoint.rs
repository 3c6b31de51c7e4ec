//! Writing a model folder that loads anywhere the original did: weights, a consistent
//! `config.json`, and every other file of the source (tokenizer, pooling, `modules.json`, ...).
//! Writes go to a staging folder renamed into place, so a failure never leaves half a model, and
//! the input model is never written to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use scalpel_models::bert::Bert;
use scalpel_models::llama::LlamaCheckpoint;
use scalpel_tensor::safetensors;

use crate::{io_err, Result, SurgeryError};

/// Files of the source folder that are regenerated rather than copied.
const REGENERATED: [&str; 2] = ["model.safetensors", "config.json"];

/// Checks that `out` may be written: not the input, and not an existing path unless `force`.
pub fn check_output(source: &Path, out: &Path, force: bool) -> Result<()> {
    let same = match (std::fs::canonicalize(source), std::fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b || b.starts_with(&a) || a.starts_with(&b),
        _ => false,
    };
    if same {
        return Err(SurgeryError::Invalid(format!(
            "refusing to write {} into or over the input model {}",
            out.display(),
            source.display()
        )));
    }
    if out.exists() && !force {
        return Err(SurgeryError::Invalid(format!(
            "{} already exists; pass --force to replace it",
            out.display()
        )));
    }
    Ok(())
}

/// Writes `bert` to `out` as a complete checkpoint, copying the other files of `source` and
/// adding `extra` files (e.g. `surgery.json`). Replaces an existing `out` only when `force`.
pub fn write_model(
    bert: &Bert,
    source: &Path,
    out: &Path,
    force: bool,
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    check_output(source, out, force)?;
    write_staged(bert, source, out, |staging| write_files(staging, extra))
}

/// Writes a Llama checkpoint to `out` as a Hugging Face folder plus `extra` files, replacing
/// `out`: the caller has checked (`check_output`) that it may.
pub fn write_llama(
    checkpoint: &LlamaCheckpoint,
    out: &Path,
    extra: &[(&str, Vec<u8>)],
) -> Result<()> {
    write_folder(out, |staging| {
        checkpoint.write_hf_files(staging)?;
        write_files(staging, extra)
    })
}

fn write_files(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Writes `bert` and whatever `add_files` puts into the staging folder to `out`, replacing it.
/// The caller has checked that `out` may be replaced: training checkpoints replace their own
/// previous checkpoint, which may also be the `source` a resumed run reads its files from.
pub fn write_staged(
    bert: &Bert,
    source: &Path,
    out: &Path,
    add_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    write_folder(out, |staging| {
        fill(bert, source, staging)?;
        add_files(staging)
    })
}

/// Builds a folder with `fill` in a staging folder beside `out` (created empty, removed on
/// failure), then swaps it into place at `out`, replacing what is there: the caller has checked
/// (`check_output`) that it may.
pub fn write_folder(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staging = sibling(out, "staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    let result = std::fs::create_dir_all(&staging)
        .map_err(io_err(&staging))
        .and_then(|()| fill(&staging))
        .and_then(|()| swap_into_place(&staging, out));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn fill(bert: &Bert, source: &Path, staging: &Path) -> Result<()> {
    copy_tree(source, staging, true)?;
    let config = serde_json::to_string_pretty(&bert.raw_config).expect("a JSON value serialises");
    let config_path = staging.join("config.json");
    std::fs::write(&config_path, config + "\n").map_err(io_err(&config_path))?;
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let weights_path = staging.join("model.safetensors");
    let tensors = bert.params.to_tensors();
    // A model with NaN or infinite weights would embed everything to NaN: never write one.
    scalpel_models::check_finite(&tensors, &weights_path)?;
    safetensors::save(&weights_path, &tensors, &metadata)?;
    Ok(())
}

fn swap_into_place(staging: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return std::fs::rename(staging, out).map_err(io_err(out));
    }
    // Move the old output aside first so that at every instant one complete model is at `out`
    // or in the aside folder.
    let aside = sibling(out, "replaced");
    std::fs::rename(out, &aside).map_err(io_err(out))?;
    std::fs::rename(staging, out).map_err(io_err(out))?;
    if aside.is_dir() {
        std::fs::remove_dir_all(&aside)
    } else {
        std::fs::remove_file(&aside)
    }
    .map_err(io_err(&aside))
}

fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Copies `from` into a new folder `to`, recursively; at the top level skips the regenerated
/// files (an earlier `surgery.json` is kept: it records where the model came from).
fn copy_tree(from: &Path, to: &Path, top: bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for entry in std::fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        let name = entry.file_name();
        if top && REGENERATED.iter().any(|r| name == *r) {
            continue;
        }
        let (src, dest) = (entry.path(), to.join(&name));
        if entry.file_type().map_err(io_err(&src))?.is_dir() {
            copy_tree(&src, &dest, false)?;
        } else {
            std::fs::copy(&src, &dest).map_err(io_err(&src))?;
        }
    }
    Ok(())
}
