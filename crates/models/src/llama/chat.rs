//! The chat template a checkpoint carries (`tokenizer.chat_template` in a GGUF file,
//! `chat_template` in `tokenizer_config.json`), rendered with minijinja as transformers'
//! `apply_chat_template` renders it with Jinja2.

use serde::Serialize;

use crate::{ModelError, Result};

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The prompt text for `messages`, ending with the assistant's turn opened when
/// `add_generation_prompt`. `bos_token` / `eos_token` are the strings templates may use.
pub fn apply_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let fail = |e: minijinja::Error| ModelError::Input(format!("the chat template: {e:#}"));
    let mut env = minijinja::Environment::new();
    // transformers' templates call raise_exception to refuse a conversation they cannot format.
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template).map_err(fail)?;
    env.get_template("chat")
        .map_err(fail)?
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(fail)
}
