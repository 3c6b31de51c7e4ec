//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built with the
//! `tokenizers` crate, and the `tokenizer_config.json` that goes beside its `tokenizer.json`.
//!
//! Only byte-level BPE (`tokenizer.ggml.model` = `gpt2`) is read. The split before BPE follows
//! `tokenizer.ggml.pre` as llama.cpp defines it: `smollm` splits off every digit (`\p{N}`) and
//! then applies the GPT-2 pattern, which is also what SmolLM2's own `tokenizer.json` does.
//! transformers' GGUF loader has no entry for `smollm` and keeps the plain GPT-2 split, so the two
//! differ where a digit follows a whitespace run or is a non-ASCII numeral (7 of the 266 test
//! strings, recorded in the fixture); everywhere else they agree token for token.

use std::collections::HashSet;

use scalpel_tensor::gguf::{Array, Gguf};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use super::LlamaConfig;
use crate::{ModelError, Result};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The pre-tokenizer types this reader knows.
const SUPPORTED_PRE: [&str; 2] = ["smollm", "gpt2"];

/// GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for themselves, the
/// other 68 are moved to U+0100 onwards in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 256;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below U+0200")
            }
        })
        .collect()
}

fn strings<'a>(gguf: &'a Gguf, key: &str) -> Result<&'a [String]> {
    match gguf.require_array(key)? {
        Array::String(values) => Ok(values),
        other => Err(ModelError::Config {
            path: gguf.path().to_path_buf(),
            detail: format!(
                "`{key}` should be an array of strings, found {} other values",
                other.len()
            ),
        }),
    }
}

/// The byte-level BPE tokenizer of the file, with its control tokens as special tokens and its
/// user-defined tokens as added tokens, and BOS/EOS added as the file's flags say.
pub fn tokenizer_from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
    let invalid = |detail: String| ModelError::Tokenizer {
        path: gguf.path().to_path_buf(),
        detail,
    };
    let model = gguf.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(invalid(format!(
            "tokenizer.ggml.model `{model}` is not supported (only byte-level BPE, `gpt2`)"
        )));
    }
    let pre = match gguf.metadata.get("tokenizer.ggml.pre") {
        Some(value) => value.as_str().ok_or_else(|| {
            invalid(format!(
                "tokenizer.ggml.pre should be a string, found {}",
                value.describe()
            ))
        })?,
        None => "gpt2",
    };
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" => byte_level.into(),
        other => {
            return Err(invalid(format!(
                "tokenizer.ggml.pre `{other}` is not supported (supported: {})",
                SUPPORTED_PRE.join(", ")
            )))
        }
    };

    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let alphabet = byte_alphabet();
    let spelled: HashSet<char> = alphabet.iter().copied().collect();
    let in_alphabet = |token: &str| token.chars().all(|c| spelled.contains(&c));
    // A token written in plain text rather than the byte alphabet is looked up by its bytes'
    // spelling, as transformers does, so that text containing it can reach it.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| {
            let key = if in_alphabet(token) {
                token.clone()
            } else {
                token.bytes().map(|b| alphabet[b as usize]).collect()
            };
            (key, id as u32)
        })
        .collect();
    if vocab.len() != tokens.len() {
        return Err(invalid(format!(
            "tokenizer.ggml.tokens holds {} tokens but only {} distinct spellings",
            tokens.len(),
            vocab.len()
        )));
    }
    let merges = strings(gguf, "tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    invalid(format!(
                        "merge {i} {merge:?} is not two tokens separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            invalid(format!(
                "the vocabulary and merges do not form a BPE model: {e}"
            ))
        })?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let token_types = match gguf.metadata.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(_) => match gguf.require_array("tokenizer.ggml.token_type")? {
            Array::I32(types) if types.len() == tokens.len() => types.clone(),
            other => {
                return Err(invalid(format!(
                    "tokenizer.ggml.token_type should be {} i32 values, found {} values",
                    tokens.len(),
                    other.len()
                )))
            }
        },
    };
    let added = |wanted: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&token_types)
            .filter(|&(token, &kind)| kind == wanted && (!special || in_alphabet(token)))
            .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&added(CONTROL, true));
    tokenizer.add_tokens(&added(USER_DEFINED, false));

    let flag = |key: &str| {
        gguf.metadata
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let special = |key: &str| -> Result<Option<(String, u32)>> {
        Ok(match gguf.metadata.get(key) {
            None => None,
            Some(value) => {
                let id = value
                    .as_u64()
                    .filter(|&id| (id as usize) < tokens.len())
                    .ok_or_else(|| {
                        invalid(format!("`{key}` is {}, not a token id", value.describe()))
                    })?;
                Some((tokens[id as usize].clone(), id as u32))
            }
        })
    };
    let bos =
        special("tokenizer.ggml.bos_token_id")?.filter(|_| flag("tokenizer.ggml.add_bos_token"));
    let eos =
        special("tokenizer.ggml.eos_token_id")?.filter(|_| flag("tokenizer.ggml.add_eos_token"));
    let mut single = Vec::new();
    single.extend(bos.iter().map(|(t, _)| t.clone()));
    single.push("$A:0".to_string());
    single.extend(eos.iter().map(|(t, _)| t.clone()));
    let processor = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(|e| invalid(format!("cannot build the BOS/EOS template: {e}")))?
        .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
        .build()
        .map_err(|e| invalid(format!("cannot build the BOS/EOS template: {e}")))?;
    tokenizer.with_post_processor(Some(processor));
    Ok(tokenizer)
}

/// The `tokenizer_config.json` transformers reads beside `tokenizer.json`: special tokens, the
/// BOS/EOS flags and the chat template.
pub fn tokenizer_config_json(gguf: &Gguf, config: &LlamaConfig) -> Result<serde_json::Value> {
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let token = |id: Option<u32>| id.and_then(|id| tokens.get(id as usize).cloned());
    let unk = gguf
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.as_u64())
        .filter(|&id| (id as usize) < tokens.len())
        .map(|id| tokens[id as usize].clone());
    let flag = |key: &str| {
        gguf.metadata
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let mut out = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": flag("tokenizer.ggml.add_bos_token"),
        "add_eos_token": flag("tokenizer.ggml.add_eos_token"),
        "bos_token": token(config.bos_token_id),
        "eos_token": token(config.eos_token_id),
        "pad_token": token(config.pad_token_id),
        "unk_token": unk,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(template) = gguf.metadata.get("tokenizer.chat_template") {
        let template = template.as_str().ok_or_else(|| ModelError::Tokenizer {
            path: gguf.path().to_path_buf(),
            detail: format!(
                "tokenizer.chat_template should be a string, found {}",
                template.describe()
            ),
        })?;
        out["chat_template"] = json!(template);
    }
    Ok(out)
}
