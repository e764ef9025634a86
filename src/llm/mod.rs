//! Inference with llama.cpp (through `llama-cpp-2`): models loaded once per process and shared
//! by the steps that name them, LoRA adapters attached per context, and batched sampling where
//! the samples of a task are parallel sequences that share the prompt's KV cache.

pub mod extract;
pub mod prompt;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

/// How a model is loaded and run: a `model` declaration, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelSettings {
    pub path: PathBuf,
    /// Context length of one sequence, in tokens.
    pub context: u32,
    /// Layers offloaded to a GPU; -1 for all.
    pub gpu_layers: i32,
    /// CPU threads; 0 for every core.
    pub threads: i32,
    pub batch: u32,
    /// Sequences decoded together.
    pub parallel: u32,
}

#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub max_tokens: u32,
    /// Extra strings that end a sample.
    pub stop: Vec<String>,
    /// End a sample once its first fenced code block is closed.
    pub stop_after_code: bool,
}

/// One prompt and the seeds of the samples to draw for it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The user message; the model's chat template wraps it.
    pub message: String,
    pub seeds: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    pub tokens: u32,
    /// Mean log-probability of the generated tokens under the model (temperature 1).
    pub mean_logprob: f64,
}

struct Loaded {
    model: LlamaModel,
    adapters: HashMap<PathBuf, LlamaLoraAdapter>,
}

fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
            LlamaBackend::init().map_err(|e| format!("cannot start llama.cpp: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Models by file and settings: each is loaded once per process. A model serves one step at a
/// time (the executor gives each model one decode stream), which is also what lets adapters be
/// added to it while it is shared.
fn registry() -> &'static Mutex<HashMap<(PathBuf, i32), Arc<Mutex<Loaded>>>> {
    static MODELS: OnceLock<Mutex<HashMap<(PathBuf, i32), Arc<Mutex<Loaded>>>>> = OnceLock::new();
    MODELS.get_or_init(Default::default)
}

fn load(settings: &ModelSettings) -> Result<Arc<Mutex<Loaded>>, String> {
    let backend = backend()?;
    let key = (settings.path.clone(), settings.gpu_layers);
    let mut models = registry().lock().map_err(|_| "the model registry is poisoned".to_string())?;
    if let Some(loaded) = models.get(&key) {
        return Ok(loaded.clone());
    }
    if !settings.path.exists() {
        return Err(format!("model file `{}` does not exist", settings.path.display()));
    }
    let layers = if settings.gpu_layers < 0 { u32::MAX } else { settings.gpu_layers as u32 };
    let params = LlamaModelParams::default().with_n_gpu_layers(layers);
    let model = LlamaModel::load_from_file(backend, &settings.path, &params)
        .map_err(|e| format!("cannot load `{}` as a GGUF model: {e}", settings.path.display()))?;
    let loaded = Arc::new(Mutex::new(Loaded { model, adapters: HashMap::new() }));
    models.insert(key, loaded.clone());
    Ok(loaded)
}

/// A 32-bit sampler seed from a sample's 64-bit seed.
fn seed32(seed: u64) -> u32 {
    (seed ^ (seed >> 32)) as u32
}

fn sampler(sampling: &Sampling, seed: u64) -> LlamaSampler {
    if sampling.temperature <= 0.0 {
        return LlamaSampler::greedy();
    }
    LlamaSampler::chain_simple([
        LlamaSampler::top_k(sampling.top_k),
        LlamaSampler::top_p(sampling.top_p, 1),
        LlamaSampler::temp(sampling.temperature),
        LlamaSampler::dist(seed32(seed)),
    ])
}

fn log_softmax_at(logits: &[f32], token: LlamaToken) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let chosen = logits.get(token.0 as usize).copied().unwrap_or(f32::NEG_INFINITY);
    f64::from(chosen - max) - sum.ln()
}

/// One sequence being sampled.
struct Sequence {
    request: usize,
    sample: usize,
    sampler: LlamaSampler,
    bytes: Vec<u8>,
    tokens: u32,
    logprob_sum: f64,
    /// Position of the next token.
    position: i32,
    /// Index in the last decoded batch whose logits this sequence samples from.
    logits_at: i32,
    /// The token sampled last, still to be decoded.
    last_token: Option<LlamaToken>,
    live: bool,
}

/// Samples every request's seeds. `adapter` is a GGUF LoRA adapter with its scale. `progress`
/// hears how many requests are done after each group.
pub fn generate(
    settings: &ModelSettings,
    adapter: Option<(&Path, f32)>,
    requests: &[Request],
    sampling: &Sampling,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, &[Vec<Generated>]),
) -> Result<Vec<Vec<Generated>>, String> {
    if requests.is_empty() {
        return Ok(vec![]);
    }
    let loaded = load(settings)?;
    let mut guard = loaded.lock().map_err(|_| "the model is poisoned".to_string())?;
    let Loaded { model, adapters } = &mut *guard;
    if let Some((path, _)) = adapter {
        if !adapters.contains_key(path) {
            let lora = model
                .lora_adapter_init(path)
                .map_err(|e| format!("cannot load LoRA adapter `{}`: {e}", path.display()))?;
            adapters.insert(path.to_path_buf(), lora);
        }
    }
    let model: &LlamaModel = model;
    let threads = if settings.threads > 0 {
        settings.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
    };
    // A request's samples decode together, so there are at least as many sequences as samples.
    let most_samples = requests.iter().map(|r| r.seeds.len() as u32).max().unwrap_or(1);
    let parallel = settings.parallel.max(most_samples).clamp(1, 256);
    // The KV cache is shared by the parallel sequences (`kv_unified`): a group of requests is
    // admitted while its prompts and longest answers fit.
    let cells = settings.context.saturating_mul(parallel.div_ceil(2).max(1));
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(cells))
        .with_n_batch(settings.batch)
        .with_n_ubatch(settings.batch)
        .with_n_seq_max(parallel)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut context =
        model.new_context(backend()?, params).map_err(|e| format!("cannot create a llama.cpp context: {e}"))?;
    if let Some((path, scale)) = adapter {
        if let Some(lora) = adapters.get_mut(path) {
            context.lora_adapter_set(lora, scale).map_err(|e| format!("cannot attach the adapter: {e}"))?;
        }
    }
    let vocab = model.vocab();
    let template = model
        .chat_template(None)
        .or_else(|_| llama_cpp_2::model::LlamaChatTemplate::new("chatml"))
        .map_err(|e| e.to_string())?;
    let mut prompts = Vec::with_capacity(requests.len());
    for request in requests {
        let message = LlamaChatMessage::new("user".into(), request.message.clone()).map_err(|e| e.to_string())?;
        let text = model
            .apply_chat_template(&template, &[message], true)
            .map_err(|e| format!("cannot apply the chat template: {e}"))?;
        prompts.push(vocab.tokenize(text.as_bytes(), true, true));
    }

    let mut results: Vec<Vec<Generated>> = requests.iter().map(|r| Vec::with_capacity(r.seeds.len())).collect();
    let batch_size = settings.batch.max(1) as usize;
    let mut next = 0;
    while next < requests.len() {
        if cancelled() {
            return Err("interrupted".into());
        }
        // Admit requests while their sequences and cells fit.
        let mut group = vec![];
        let (mut seqs, mut used) = (0u32, 0u32);
        while next < requests.len() {
            let n = requests[next].seeds.len() as u32;
            let need = prompts[next].len() as u32 + n * sampling.max_tokens;
            if !group.is_empty() && (seqs + n > parallel || used + need > cells) {
                break;
            }
            if need > cells {
                return Err(format!(
                    "a prompt of {} tokens with {n} samples of up to {} tokens does not fit a context of {cells} tokens; raise the model's `context`",
                    prompts[next].len(),
                    sampling.max_tokens
                ));
            }
            group.push(next);
            seqs += n;
            used += need;
            next += 1;
        }
        let mut sequences = vec![];
        context.clear_kv_cache();
        for &r in &group {
            let first_seq = sequences.len() as i32;
            // The prompt, in chunks no larger than a batch; the last token's logits are kept.
            let tokens = &prompts[r];
            let mut batch = LlamaBatch::new(batch_size, 1);
            let mut last = 0;
            for (c, chunk) in tokens.chunks(batch_size).enumerate() {
                batch.clear();
                for (j, &token) in chunk.iter().enumerate() {
                    let position = c * batch_size + j;
                    batch
                        .add(token, position as i32, &[first_seq], position + 1 == tokens.len())
                        .map_err(|e| e.to_string())?;
                }
                context.decode(&mut batch).map_err(|e| format!("llama.cpp could not decode the prompt: {e}"))?;
                last = batch.n_tokens() - 1;
            }
            for (s, &seed) in requests[r].seeds.iter().enumerate() {
                let seq = first_seq + s as i32;
                if s > 0 {
                    context.kv_cache_seq_cp(first_seq, seq, None, None).map_err(|e| e.to_string())?;
                }
                let mut sequence = Sequence {
                    request: r,
                    sample: s,
                    sampler: sampler(sampling, seed),
                    bytes: vec![],
                    tokens: 0,
                    logprob_sum: 0.0,
                    position: tokens.len() as i32,
                    logits_at: last,
                    last_token: None,
                    live: true,
                };
                // The first token comes from the prompt's logits, before another decode.
                step(&context, &vocab, &mut sequence, sampling);
                sequences.push(sequence);
            }
        }
        // Every live sequence advances one token per decode.
        let mut batch = LlamaBatch::new(sequences.len().max(1), 1);
        loop {
            batch.clear();
            for (seq, sequence) in sequences.iter_mut().enumerate() {
                if !sequence.live {
                    continue;
                }
                let Some(token) = sequence.last_token else { continue };
                sequence.logits_at = batch.n_tokens();
                batch.add(token, sequence.position, &[seq as i32], true).map_err(|e| e.to_string())?;
                sequence.position += 1;
            }
            if batch.n_tokens() == 0 {
                break;
            }
            if cancelled() {
                return Err("interrupted".into());
            }
            context.decode(&mut batch).map_err(|e| format!("llama.cpp could not decode: {e}"))?;
            for sequence in sequences.iter_mut().filter(|s| s.live) {
                step(&context, &vocab, sequence, sampling);
            }
        }
        for sequence in sequences {
            let text = String::from_utf8_lossy(&sequence.bytes).into_owned();
            let mean_logprob =
                if sequence.tokens == 0 { 0.0 } else { sequence.logprob_sum / f64::from(sequence.tokens) };
            debug_assert_eq!(results[sequence.request].len(), sequence.sample);
            results[sequence.request].push(Generated { text, tokens: sequence.tokens, mean_logprob });
        }
        progress(next, &results[group[0]..next]);
    }
    Ok(results)
}

/// Samples the sequence's next token from its logits, and decides whether it goes on.
fn step(
    context: &llama_cpp_2::context::LlamaContext<'_>,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    sequence: &mut Sequence,
    sampling: &Sampling,
) {
    let token = sequence.sampler.sample(context, sequence.logits_at);
    if vocab.is_eog(token) {
        sequence.live = false;
        sequence.last_token = None;
        return;
    }
    sequence.logprob_sum += log_softmax_at(context.get_logits_ith(sequence.logits_at), token);
    sequence.tokens += 1;
    sequence.bytes.extend(vocab.token_to_piece(token, false, None));
    sequence.last_token = Some(token);
    let text = String::from_utf8_lossy(&sequence.bytes);
    let stopped = sequence.tokens >= sampling.max_tokens
        || (sampling.stop_after_code && extract::first_block_closed(&text))
        || sampling.stop.iter().any(|s| text.ends_with(s.as_str()));
    if stopped {
        sequence.live = false;
        sequence.last_token = None;
    }
}
