//! Chat templates: a request's turns as the prompt text the model was trained on, and training
//! sequences tokenized exactly as generation sees them.

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

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
