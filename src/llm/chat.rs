//! Chat templates: a request's turns as the prompt text the model was trained on, and training
//! sequences tokenized exactly as generation sees them — by llama.cpp for a GGUF model, by the
//! model's `tokenizer.json` and Jinja chat template for a Hugging Face directory (as the servers
//! of such a directory render them).

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use std::path::Path;

use super::model::backend;
use super::{LlmError, ModelSettings};

/// The model's chat template, or ChatML when it has none.
pub(super) fn chat_template(model: &LlamaModel) -> Result<LlamaChatTemplate, LlmError> {
    model
        .chat_template(None)
        .or_else(|_| LlamaChatTemplate::new("chatml"))
        .map_err(|e| LlmError::Template(e.to_string()))
}

/// The prompt text for earlier (user, assistant) turns and a user `message` through `template`,
/// ready for the assistant's answer.
pub(super) fn chat_prompt(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    examples: &[(String, String)],
    message: &str,
) -> Result<String, LlmError> {
    let turn = |role: &str, text: &str| {
        LlamaChatMessage::new(role.into(), text.to_string()).map_err(|e| LlmError::Template(e.to_string()))
    };
    let mut chat = vec![];
    for (user, assistant) in examples {
        chat.push(turn("user", user)?);
        chat.push(turn("assistant", assistant)?);
    }
    chat.push(turn("user", message)?);
    model
        .apply_chat_template(template, &chat, true)
        .map_err(|e| LlmError::Template(format!("cannot apply the chat template: {e}")))
}

/// Training sequences for (user message, answer) pairs, tokenized by the model's own tokenizer
/// exactly as `generate` sees them: the chat prompt, then the answer and the end-of-turn token.
/// Returns each sequence with the position where its answer starts.
pub fn training_tokens(
    settings: &ModelSettings,
    pairs: &[(String, String)],
) -> Result<Vec<(Vec<u32>, usize)>, LlmError> {
    if settings.path.is_dir() {
        return hugging_face_training_tokens(&settings.path, pairs);
    }
    // The vocabulary alone: training does not need llama.cpp's copy of the weights in memory.
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model = LlamaModel::load_from_file(backend()?, &settings.path, &params)
        .map_err(|e| LlmError::Vocabulary { path: settings.path.clone(), message: e.to_string() })?;
    let vocab = model.vocab();
    let end = if vocab.eot().0 >= 0 { vocab.eot() } else { vocab.eos() };
    let template = chat_template(&model)?;
    let ids = |tokens: Vec<LlamaToken>| tokens.into_iter().map(|t| t.0 as u32);
    pairs
        .iter()
        .map(|(message, answer)| {
            let prompt = chat_prompt(&model, &template, &[], message)?;
            let mut tokens: Vec<u32> = ids(vocab.tokenize(prompt.as_bytes(), true, true)).collect();
            let start = tokens.len();
            tokens.extend(ids(vocab.tokenize(answer.as_bytes(), false, false)));
            tokens.push(end.0 as u32);
            Ok((tokens, start))
        })
        .collect()
}

/// Training sequences for a Hugging Face model directory: the chat template in its
/// `tokenizer_config.json` rendered as Hugging Face renders it (Jinja, `trim_blocks` and
/// `lstrip_blocks`, as vLLM does for the same directory), tokenized by its `tokenizer.json`, the
/// answer ended by its `eos_token`.
fn hugging_face_training_tokens(dir: &Path, pairs: &[(String, String)]) -> Result<Vec<(Vec<u32>, usize)>, LlmError> {
    let vocabulary = |message: String| LlmError::Vocabulary { path: dir.to_path_buf(), message };
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| vocabulary(format!("tokenizer.json: {e}")))?;
    let config_path = dir.join("tokenizer_config.json");
    let config: serde_json::Value = std::fs::read_to_string(&config_path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
        .map_err(|e| vocabulary(format!("tokenizer_config.json: {e}")))?;
    let special = |key: &str| match &config[key] {
        serde_json::Value::String(text) => Some(text.clone()),
        value => value["content"].as_str().map(str::to_string),
    };
    let template = match &config["chat_template"] {
        serde_json::Value::String(template) => Some(template.as_str()),
        serde_json::Value::Array(named) => {
            named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str())
        }
        _ => None,
    }
    .ok_or_else(|| vocabulary("tokenizer_config.json has no `chat_template`".into()))?;
    let eos = special("eos_token").ok_or_else(|| vocabulary("tokenizer_config.json has no `eos_token`".into()))?;
    let end = tokenizer.token_to_id(&eos).ok_or_else(|| vocabulary(format!("`{eos}` is not in the vocabulary")))?;
    let bos = special("bos_token").unwrap_or_default();
    let mut environment = minijinja::Environment::new();
    environment.set_trim_blocks(true);
    environment.set_lstrip_blocks(true);
    environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    environment.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    let template_error =
        |e: minijinja::Error| LlmError::Template(format!("the chat template of `{}`: {e}", dir.display()));
    environment.add_template("chat", template).map_err(template_error)?;
    let chat = environment.get_template("chat").map_err(template_error)?;
    let encode =
        |text: &str| tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| vocabulary(e.to_string()));
    pairs
        .iter()
        .map(|(message, answer)| {
            let prompt = chat
                .render(minijinja::context! {
                    messages => [minijinja::context! { role => "user", content => message }],
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(template_error)?;
            let mut tokens = encode(&prompt)?;
            let start = tokens.len();
            tokens.extend(encode(answer)?);
            tokens.push(end);
            Ok((tokens, start))
        })
        .collect()
}
