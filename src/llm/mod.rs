//! Inference with llama.cpp (through `llama-cpp-2`): models loaded once per process and shared
//! by the steps that name them, LoRA adapters attached per context, and batched sampling where
//! the samples of a task are parallel sequences that start from the prompt's KV cache, decoded
//! once.

pub mod extract;
pub mod prompt;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use rayon::prelude::*;

/// Most CPU threads llama.cpp takes (`GGML_MAX_N_THREADS`).
pub const MOST_THREADS: i32 = 512;

/// Most sequences decoded together: llama.cpp keeps up to 256 (`LLAMA_MAX_SEQ`), and one more
/// holds the prompt being shared.
pub const MOST_PARALLEL: u32 = 255;

/// Most tokens in a sequence or a batch: llama.cpp numbers positions with 32-bit signed integers.
pub const MOST_TOKENS: u32 = i32::MAX as u32;

/// How a model is loaded and run: a `model` declaration, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelSettings {
    pub path: PathBuf,
    /// Most tokens of one sequence; 0 for the model's training context.
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
    /// Extra strings that end a sample where they first appear; they are left out of its text.
    pub stop: Vec<String>,
    /// End a sample once its first fenced code block is closed.
    pub stop_after_code: bool,
}

/// One prompt and the seeds of the samples to draw for it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Earlier (user, assistant) turns shown first: worked examples for a few-shot prompt.
    pub examples: Vec<(String, String)>,
    /// The user message; the model's chat template wraps it.
    pub message: String,
    pub seeds: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    pub tokens: u32,
    /// Mean log-probability of the generated tokens under the model (temperature 1); of the end
    /// token for an answer that has none.
    pub mean_logprob: f64,
}

/// What `generate` decoded, for its tokens per second: the prompts' tokens, and the time spent
/// generating (decoding the sampled tokens, sampling, stop checks), which leaves out context
/// setup and prompt decoding.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    pub prompt_tokens: u64,
    pub generation_seconds: f64,
    /// Of the generation time, how long was spent waiting for llama.cpp's decoding of the
    /// sampled tokens (on a GPU, for its logits); the rest is seedflow's own work per token.
    pub decoding_seconds: f64,
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
type Registry = Mutex<HashMap<(PathBuf, i32), Arc<Mutex<Loaded>>>>;

fn registry() -> &'static Registry {
    static MODELS: OnceLock<Registry> = OnceLock::new();
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
    // llama.cpp runs every layer on the CPU when it has no GPU to offload to, silently and many
    // times slower: a run that asked for the GPU stops instead.
    if settings.gpu_layers != 0 && !backend.supports_gpu_offload() {
        let why = match cfg!(feature = "cuda") {
            true => "no CUDA device was found",
            false => "this seedflow was built without GPU support (`cargo build --release --features cuda`)",
        };
        return Err(format!(
            "`gpu-layers={}` asks for a GPU, but llama.cpp has none to offload to: {why}; set `gpu-layers=0` to run on the CPU",
            settings.gpu_layers
        ));
    }
    let layers = if settings.gpu_layers < 0 { u32::MAX } else { settings.gpu_layers as u32 };
    let params = LlamaModelParams::default().with_n_gpu_layers(layers);
    let model = LlamaModel::load_from_file(backend, &settings.path, &params)
        .map_err(|e| format!("cannot load `{}` as a GGUF model: {e}", settings.path.display()))?;
    let loaded = Arc::new(Mutex::new(Loaded { model, adapters: HashMap::new() }));
    models.insert(key, loaded.clone());
    Ok(loaded)
}

/// How many of the largest logits can be sampled at all: 1 for greedy, `top-k` otherwise
/// (0 means all).
fn sampleable(sampling: &Sampling) -> usize {
    match sampling.temperature <= 0.0 {
        true => 1,
        false => usize::try_from(sampling.top_k).unwrap_or(0),
    }
}

/// The `k` largest logits as llama.cpp candidates (all of them when `k` is 0); among equal
/// logits the lower token id wins, as in llama.cpp's greedy sampler.
fn top_candidates(logits: &[f32], k: usize) -> Vec<LlamaTokenData> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { top_candidates_avx2(logits, k) };
    }
    top_candidates_in(logits, k)
}

/// The scan compiled for AVX2: one register per eight logits instead of four (same result).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn top_candidates_avx2(logits: &[f32], k: usize) -> Vec<LlamaTokenData> {
    top_candidates_in(logits, k)
}

#[inline(always)]
fn top_candidates_in(logits: &[f32], k: usize) -> Vec<LlamaTokenData> {
    let data = |(id, &logit): (usize, &f32)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0);
    if k == 0 || k >= logits.len() {
        return logits.iter().enumerate().map(data).collect();
    }
    // Candidates for the k largest: the first k logits, then every later one above `floor`, the
    // k-th largest when the candidates were last cut down to k (they are cut once they fill
    // the spare room). Almost no logit is, once the scan is under way: most blocks are passed
    // over after one vectorised comparison. Ordered largest first, the lower id first among
    // equal logits (a later logit equal to the floor loses to it, so it can be passed over).
    let key = |logit: f32| if logit.is_nan() { f32::NEG_INFINITY } else { logit + 0.0 }; // -0 is 0
    let order = |a: &(f32, usize), b: &(f32, usize)| key(b.0).total_cmp(&key(a.0)).then(a.1.cmp(&b.1));
    let cut = |kept: &mut Vec<(f32, usize)>| {
        kept.select_nth_unstable_by(k - 1, order);
        kept.truncate(k);
        key(kept[k - 1].0)
    };
    const BLOCK: usize = 64;
    // Room for k more, at least: each cut is a selection over all that is kept.
    let spare = k.max(512);
    let mut kept: Vec<(f32, usize)> = Vec::with_capacity(k + spare);
    kept.extend(logits[..k].iter().enumerate().map(|(id, &logit)| (logit, id)));
    let mut floor = cut(&mut kept);
    for (b, block) in logits[k..].chunks(BLOCK).enumerate() {
        if !any_above(block, floor) {
            continue;
        }
        for (c, chunk) in block.chunks(8).enumerate().filter(|(_, chunk)| any_above(chunk, floor)) {
            for (j, &logit) in chunk.iter().enumerate() {
                if logit > floor {
                    kept.push((logit, k + b * BLOCK + c * 8 + j));
                }
            }
        }
        if kept.len() > k + spare - BLOCK {
            floor = cut(&mut kept);
        }
    }
    kept.sort_unstable_by(order);
    kept.truncate(k);
    kept.iter().map(|&(logit, id)| data((id, &logit))).collect()
}

/// Whether any of `block` is larger than `floor`: comparisons or-ed together, which the
/// compiler vectorises (a running maximum, being a floating-point reduction, it keeps scalar
/// without fast-math: three times slower).
#[inline(always)]
fn any_above(block: &[f32], floor: f32) -> bool {
    block.iter().fold(false, |above, &logit| above | (logit > floor))
}

/// A 32-bit sampler seed from a sample's 64-bit seed. Never `LLAMA_DEFAULT_SEED` (all ones),
/// which llama.cpp's sampler takes as "seed me at random".
fn seed32(seed: u64) -> u32 {
    match (seed ^ (seed >> 32)) as u32 {
        u32::MAX => u32::MAX - 1,
        folded => folded,
    }
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

fn threads(settings: &ModelSettings) -> i32 {
    if settings.threads > 0 {
        settings.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MOST_THREADS as usize) as i32)
    }
}

/// Loads `adapter`'s file into the model's adapters, once per process.
fn load_adapter(
    model: &mut LlamaModel,
    adapters: &mut HashMap<PathBuf, LlamaLoraAdapter>,
    adapter: Option<(&Path, f32)>,
) -> Result<(), String> {
    if let Some((path, _)) = adapter
        && !adapters.contains_key(path)
    {
        let lora =
            model.lora_adapter_init(path).map_err(|e| format!("cannot load LoRA adapter `{}`: {e}", path.display()))?;
        adapters.insert(path.to_path_buf(), lora);
    }
    Ok(())
}

fn attach_adapter(
    context: &mut llama_cpp_2::context::LlamaContext<'_>,
    adapters: &mut HashMap<PathBuf, LlamaLoraAdapter>,
    adapter: Option<(&Path, f32)>,
) -> Result<(), String> {
    if let Some((path, scale)) = adapter
        && let Some(lora) = adapters.get_mut(path)
    {
        context.lora_adapter_set(lora, scale).map_err(|e| format!("cannot attach the adapter: {e}"))?;
    }
    Ok(())
}

/// The model's chat template, or ChatML when it has none.
fn chat_template(model: &LlamaModel) -> Result<LlamaChatTemplate, String> {
    model.chat_template(None).or_else(|_| LlamaChatTemplate::new("chatml")).map_err(|e| e.to_string())
}

/// The prompt text for earlier (user, assistant) turns and a user `message` through `template`,
/// ready for the assistant's answer.
fn chat_prompt(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    examples: &[(String, String)],
    message: &str,
) -> Result<String, String> {
    let mut chat = vec![];
    for (user, assistant) in examples {
        chat.push(LlamaChatMessage::new("user".into(), user.clone()).map_err(|e| e.to_string())?);
        chat.push(LlamaChatMessage::new("assistant".into(), assistant.clone()).map_err(|e| e.to_string())?);
    }
    chat.push(LlamaChatMessage::new("user".into(), message.to_string()).map_err(|e| e.to_string())?);
    model.apply_chat_template(template, &chat, true).map_err(|e| format!("cannot apply the chat template: {e}"))
}

/// Training sequences for (user message, answer) pairs, tokenized by the model's own tokenizer
/// exactly as `generate` sees them: the chat prompt, then the answer and the end-of-turn token.
/// Returns each sequence with the position where its answer starts.
pub fn training_tokens(settings: &ModelSettings, pairs: &[(String, String)]) -> Result<Vec<(Vec<u32>, usize)>, String> {
    // The vocabulary alone: training does not need llama.cpp's copy of the weights in memory.
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model = LlamaModel::load_from_file(backend()?, &settings.path, &params)
        .map_err(|e| format!("cannot read the vocabulary of `{}`: {e}", settings.path.display()))?;
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

/// The logits llama.cpp computes after each of `tokens` (one sequence, f32 KV cache): what the
/// trainer's forward pass is checked against.
pub fn logits(
    settings: &ModelSettings,
    adapter: Option<(&Path, f32)>,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>, String> {
    let loaded = load(settings)?;
    let mut guard = loaded.lock().map_err(|_| "the model is poisoned".to_string())?;
    let Loaded { model, adapters } = &mut *guard;
    load_adapter(model, adapters, adapter)?;
    let n = (tokens.len() as u32).max(1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n.next_multiple_of(256)))
        .with_n_batch(n)
        .with_n_ubatch(n)
        .with_type_k(llama_cpp_2::context::params::KvCacheType::F32)
        .with_type_v(llama_cpp_2::context::params::KvCacheType::F32)
        .with_flash_attention_policy(0) // LLAMA_FLASH_ATTN_TYPE_DISABLED: attention in f32
        .with_n_threads(threads(settings))
        .with_n_threads_batch(threads(settings));
    let mut context =
        model.new_context(backend()?, params).map_err(|e| format!("cannot create a llama.cpp context: {e}"))?;
    attach_adapter(&mut context, adapters, adapter)?;
    let mut batch = LlamaBatch::new(tokens.len(), 1);
    for (i, &token) in tokens.iter().enumerate() {
        batch.add(LlamaToken(token as i32), i as i32, &[0], true).map_err(|e| e.to_string())?;
    }
    context.decode(&mut batch).map_err(|e| format!("llama.cpp could not decode: {e}"))?;
    Ok((0..tokens.len()).map(|i| context.get_logits_ith(i as i32).to_vec()).collect())
}

/// Samples every request's seeds. `adapter` is a GGUF LoRA adapter with its scale. `progress`
/// hears each run of requests that finished, in request order, with how many are done in all.
/// Returns the samples by request, and where the time went.
pub fn generate(
    settings: &ModelSettings,
    adapter: Option<(&Path, f32)>,
    requests: &[Request],
    sampling: &Sampling,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, &[Vec<Generated>]),
) -> Result<(Vec<Vec<Generated>>, Timing), String> {
    if requests.is_empty() {
        return Ok((vec![], Timing::default()));
    }
    let loaded = load(settings)?;
    let mut guard = loaded.lock().map_err(|_| "the model is poisoned".to_string())?;
    let Loaded { model, adapters } = &mut *guard;
    load_adapter(model, adapters, adapter)?;
    let model: &LlamaModel = model;
    let threads = threads(settings);
    let parallel = settings.parallel.clamp(1, MOST_PARALLEL);
    let vocab = model.vocab();
    let template = chat_template(model)?;
    let mut prompts = Vec::with_capacity(requests.len());
    for request in requests {
        let text = chat_prompt(model, &template, &request.examples, &request.message)?;
        prompts.push(vocab.tokenize(text.as_bytes(), true, true));
    }
    let longest = (prompts.iter().map(Vec::len).max().unwrap_or(0) as u32).saturating_add(sampling.max_tokens);
    let limit = if settings.context == 0 { model.n_ctx_train() } else { settings.context };
    if longest > limit {
        let now = if settings.context == 0 { format!("0: the model's own, {limit}") } else { limit.to_string() };
        return Err(format!(
            "a prompt and an answer of up to {} tokens need a context of {longest} tokens; raise the model's `context` (now {now})",
            sampling.max_tokens
        ));
    }
    // Every sequence has a KV cache of its own (not `kv_unified`), as large as the longest
    // prompt and answer need: a token attends to its own sequence's cells only, as in
    // llama.cpp's batched-bench, instead of to (and masked from) every sequence's.
    // One sequence more than decode at once holds the prompt being shared (`stash` below).
    let per_sequence = longest.next_multiple_of(256);
    // Every sequence's next token goes into one decode, however small `batch` is (and llama.cpp
    // asserts room for an output per sequence, the stash's too).
    let decode_batch = settings.batch.max(parallel + 1);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(per_sequence.saturating_mul(parallel + 1)))
        .with_n_batch(decode_batch)
        .with_n_ubatch(decode_batch)
        .with_n_seq_max(parallel + 1)
        .with_kv_unified(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut context =
        model.new_context(backend()?, params).map_err(|e| format!("cannot create a llama.cpp context: {e}"))?;
    attach_adapter(&mut context, adapters, adapter)?;

    // Continuous batching: a sample starts as soon as a sequence is free, so a finished sample's
    // sequence goes to the next sample instead of waiting for the longest one. Each prompt is
    // decoded once, into the `stash` sequence, and copied to every sequence that takes one of
    // its samples: llama.cpp copies between per-sequence caches only whole sequences, so the
    // copy comes from one that holds the prompt alone.
    let stash = parallel as i32;
    let mut admitting: Option<Admitting> = None;
    // Prompts are decoded `batch` tokens at a time; a batch larger than the longest prompt
    // would only be allocated, never filled.
    let longest_prompt = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let batch_size = (settings.batch as usize).clamp(1, longest_prompt.max(1));
    let mut results: Vec<Vec<Option<Generated>>> = requests.iter().map(|r| vec![None; r.seeds.len()]).collect();
    let mut unfinished: Vec<usize> = requests.iter().map(|r| r.seeds.len()).collect();
    let mut slots: Vec<Option<Sequence>> = (0..parallel).map(|_| None).collect();
    let mut owed: Vec<Owed> = (0..parallel).map(|_| Owed::default()).collect();
    let (mut admitted, mut reported) = (0, 0);
    let mut prompt_batch = LlamaBatch::new(batch_size, 1);
    let mut step_batch = LlamaBatch::new(parallel as usize, 1);
    let overlap = settings.gpu_layers != 0;
    context.clear_kv_cache();
    let started = Instant::now();
    let (mut prompt_time, mut prompt_tokens, mut decoding_time) = (Duration::ZERO, 0u64, Duration::ZERO);
    loop {
        if cancelled() {
            return Err("interrupted".into());
        }
        // Retire finished sequences: free their slot and cells, keep their text (with the
        // normaliser of their last token, still owed if they finished in the last step).
        if slots.iter().zip(&owed).any(|(slot, o)| o.owed && slot.as_ref().is_some_and(|s| !s.live)) {
            settle(&mut slots, &mut owed);
        }
        for (seq, slot) in slots.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|s| !s.live) {
                let Some(done) = slot.take() else { continue };
                context.kv_cache_seq_rm(seq as i32, None, None).map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&done.bytes).into_owned();
                let mean_logprob = done.logprob_sum / f64::from(done.tokens.max(1));
                results[done.request][done.sample] = Some(Generated { text, tokens: done.tokens, mean_logprob });
                unfinished[done.request] -= 1;
            }
        }
        // Report finished requests in order, so they can be written in order.
        let before = reported;
        while reported < admitted && unfinished[reported] == 0 {
            reported += 1;
        }
        if reported > before {
            let finished: Vec<Vec<Generated>> =
                results[before..reported].iter().map(|r| r.iter().flatten().cloned().collect()).collect();
            progress(reported, &finished);
        }
        // Start samples while sequences are free: the next sample of the request whose prompt is
        // in the stash, or the first of the next request, whose prompt then replaces it.
        let has_samples_left = |a: &Admitting| a.started < requests[a.request].seeds.len();
        for (seq, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            while !admitting.as_ref().is_some_and(has_samples_left) && admitted < requests.len() {
                let tokens = &prompts[admitted];
                let prompt_started = Instant::now();
                context.kv_cache_seq_rm(stash, None, None).map_err(|e| e.to_string())?;
                let logits = decode_prompt(&mut context, &mut prompt_batch, batch_size, tokens, stash)?;
                admitting = Some(Admitting {
                    request: admitted,
                    started: 0,
                    position: tokens.len() as i32,
                    candidates: top_candidates(&logits, sampleable(sampling)),
                    normaliser: crate::numeric::log_sum_exp(&logits),
                    logits,
                });
                prompt_time += prompt_started.elapsed();
                prompt_tokens += tokens.len() as u64;
                admitted += 1;
            }
            let Some(prompt) = admitting.as_mut().filter(|a| has_samples_left(a)) else {
                break;
            };
            context.kv_cache_seq_cp(stash, seq as i32, None, None).map_err(|e| e.to_string())?;
            let mut sequence = Sequence {
                request: prompt.request,
                sample: prompt.started,
                sampler: sampler(sampling, requests[prompt.request].seeds[prompt.started]),
                bytes: vec![],
                tokens: 0,
                logprob_sum: 0.0,
                position: prompt.position,
                logits_at: 0,
                last_token: None,
                live: true,
            };
            // The first token comes from the prompt's logits.
            if step(&vocab, &mut sequence, &prompt.logits, prompt.candidates.clone(), sampling) {
                sequence.logprob_sum -= prompt.normaliser;
            }
            prompt.started += 1;
            *slot = Some(sequence);
        }
        close_gaps(&mut context, &mut slots, &mut owed)?;
        // Every live sequence advances one token.
        step_batch.clear();
        for (seq, slot) in slots.iter_mut().enumerate() {
            let Some(sequence) = slot.as_mut().filter(|s| s.live) else { continue };
            let Some(token) = sequence.last_token else { continue };
            sequence.logits_at = step_batch.n_tokens();
            step_batch.add(token, sequence.position, &[seq as i32], true).map_err(|e| e.to_string())?;
            sequence.position += 1;
        }
        if step_batch.n_tokens() == 0 {
            if slots.iter().all(Option::is_none) && admitted == requests.len() {
                break;
            }
            continue; // sequences that just finished are retired at the top
        }
        let decoding = Instant::now();
        context.decode(&mut step_batch).map_err(|e| format!("llama.cpp could not decode: {e}"))?;
        decoding_time += decoding.elapsed();
        // On a GPU the decoding runs on while the last step's normalisers are computed here.
        settle(&mut slots, &mut owed);
        let k = sampleable(sampling);
        // The first row of logits asked for waits for the decoding to end.
        let decoding = Instant::now();
        let mut live: Vec<(&mut Sequence, &[f32], &mut Owed)> = slots
            .iter_mut()
            .zip(owed.iter_mut())
            .filter_map(|(slot, owed)| {
                let sequence = slot.as_mut().filter(|s| s.live)?;
                let logits = context.get_logits_ith(sequence.logits_at);
                Some((sequence, logits, owed))
            })
            .collect();
        decoding_time += decoding.elapsed();
        // The passes over the vocabulary, one sequence per core: done one after another, they
        // took longer than a GPU's decoding step. With layers on a GPU, whose decoding runs on
        // after `decode` returns, the normaliser is owed until the next step's decode is issued,
        // and the logits are kept for it (that decode overwrites llama.cpp's); on the CPU the
        // decoding is over, so it is computed now.
        let passes = each(&mut live, |(_, logits, owed)| {
            let normaliser = if overlap {
                owed.logits.clear();
                owed.logits.extend_from_slice(logits);
                None
            } else {
                Some(crate::numeric::log_sum_exp(logits))
            };
            (top_candidates(logits, k), normaliser)
        });
        for ((sequence, logits, owed), (candidates, normaliser)) in live.into_iter().zip(passes) {
            let took = step(&vocab, sequence, logits, candidates, sampling);
            match normaliser {
                Some(normaliser) if took => sequence.logprob_sum -= normaliser,
                Some(_) => {}
                None => owed.owed = took,
            }
        }
    }
    let timing = Timing {
        prompt_tokens,
        generation_seconds: started.elapsed().saturating_sub(prompt_time).as_secs_f64(),
        decoding_seconds: decoding_time.as_secs_f64(),
    };
    Ok((results.into_iter().map(|r| r.into_iter().flatten().collect()).collect(), timing))
}

/// Moves the last live sequences into the free ones below them, so that the live ones are
/// numbered without a gap. llama.cpp decodes sequences that have caches of their own together
/// only while their ids run on (`split_equal`, sequential): live sequences 0, 2, 4 and 6 would
/// take four computations a step, each reading all the weights, instead of one. Gaps open only
/// once no sample is left to start in a freed sequence (until then each is refilled at once);
/// each move copies one sequence's cache (whole, at the next decode), as a sample's start does.
fn close_gaps(
    context: &mut llama_cpp_2::context::LlamaContext<'_>,
    slots: &mut [Option<Sequence>],
    owed: &mut [Owed],
) -> Result<(), String> {
    while let Some(free) = slots.iter().position(Option::is_none)
        && let Some(last) = slots.iter().rposition(|s| s.as_ref().is_some_and(|s| s.live))
        && free < last
    {
        context.kv_cache_seq_cp(last as i32, free as i32, None, None).map_err(|e| e.to_string())?;
        context.kv_cache_seq_rm(last as i32, None, None).map_err(|e| e.to_string())?;
        slots.swap(free, last);
        owed.swap(free, last);
    }
    Ok(())
}

/// Decodes `tokens` into sequence `seq` from position 0, in chunks of `size` (the batch's), and
/// returns the logits after the last one.
fn decode_prompt(
    context: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut LlamaBatch,
    size: usize,
    tokens: &[LlamaToken],
    seq: i32,
) -> Result<Vec<f32>, String> {
    let mut last = 0;
    for (c, chunk) in tokens.chunks(size).enumerate() {
        batch.clear();
        for (j, &token) in chunk.iter().enumerate() {
            let position = c * size + j;
            batch.add(token, position as i32, &[seq], position + 1 == tokens.len()).map_err(|e| e.to_string())?;
        }
        context.decode(batch).map_err(|e| format!("llama.cpp could not decode the prompt: {e}"))?;
        last = batch.n_tokens() - 1;
    }
    Ok(context.get_logits_ith(last).to_vec())
}

/// The request whose samples are starting; its prompt is in the stash sequence.
struct Admitting {
    request: usize,
    /// How many of its samples have started.
    started: usize,
    /// Position of each sample's first token: the prompt's length.
    position: i32,
    /// Logits after the prompt, from which each sample takes its first token, their largest
    /// (the candidates) and their log-sum-exp.
    logits: Vec<f32>,
    candidates: Vec<LlamaTokenData>,
    normaliser: f64,
}

/// A sequence's last logits, whose log-sum-exp (the softmax's normaliser) its log-probability
/// sum still owes when `owed`.
#[derive(Default)]
struct Owed {
    logits: Vec<f32>,
    owed: bool,
}

/// `f` of each item, on rayon's threads when more than one item has work: handing a lone item to
/// the pool (waking a thread, waiting for it) costs more than it saves.
fn each<T: Send, R: Send>(items: &mut [T], f: impl Fn(&mut T) -> R + Sync + Send) -> Vec<R> {
    match items.len() {
        0 | 1 => items.iter_mut().map(f).collect(),
        _ => items.par_iter_mut().map(f).collect(),
    }
}

/// Subtracts every owed normaliser from its sequence's log-probability sum.
fn settle(slots: &mut [Option<Sequence>], owed: &mut [Owed]) {
    let due: Vec<usize> = (0..owed.len()).filter(|&i| owed[i].owed).collect();
    let mut rows: Vec<&[f32]> = due.iter().map(|&i| owed[i].logits.as_slice()).collect();
    let normalisers = each(&mut rows, |row| crate::numeric::log_sum_exp(row));
    for (i, normaliser) in due.into_iter().zip(normalisers) {
        if let Some(sequence) = slots[i].as_mut() {
            sequence.logprob_sum -= normaliser;
        }
        owed[i].owed = false;
    }
}

/// Samples the sequence's next token from `candidates`, the largest of its `logits` (only those
/// can be picked: the chain starts with top-k; handing llama.cpp's sampler the whole vocabulary,
/// as `LlamaSampler::sample` does, spends most of a millisecond per token building and sorting
/// 150,000 candidates), and decides whether it goes on. Adds the token's logit to the
/// log-probability sum and returns true when it took a token (or ended an answer before its
/// first): the caller subtracts the normaliser.
fn step(
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    sequence: &mut Sequence,
    logits: &[f32],
    candidates: Vec<LlamaTokenData>,
    sampling: &Sampling,
) -> bool {
    let mut candidates = LlamaTokenDataArray::new(candidates, false);
    candidates.apply_sampler(&mut sequence.sampler);
    let picked = candidates.selected_token();
    if let Some(token) = picked {
        sequence.sampler.accept(token);
    }
    let logit = |token: LlamaToken| f64::from(logits.get(token.0 as usize).copied().unwrap_or(f32::NEG_INFINITY));
    let Some(token) = picked.filter(|&t| !vocab.is_eog(t)) else {
        sequence.live = false;
        sequence.last_token = None;
        // An answer that ends before its first token is scored by that end: a mean over no
        // tokens would be 0, the highest score there is (`select prefer="highest-logprob"`).
        if let Some(end) = picked
            && sequence.tokens == 0
        {
            sequence.logprob_sum += logit(end);
            return true;
        }
        return false;
    };
    sequence.logprob_sum += logit(token);
    sequence.tokens += 1;
    let before = sequence.bytes.len();
    vocab.token_to_piece_into(token, &mut sequence.bytes, false, None);
    sequence.last_token = Some(token);
    let stop = stop_at(&sequence.bytes, before, &sampling.stop);
    if let Some(at) = stop {
        sequence.bytes.truncate(at);
    }
    let stopped = stop.is_some()
        || sequence.tokens >= sampling.max_tokens
        || (sampling.stop_after_code && extract::first_block_closed(&String::from_utf8_lossy(&sequence.bytes)));
    if stopped {
        sequence.live = false;
        sequence.last_token = None;
    }
    true
}

/// Where the earliest of the `stops` strings that `text` holds starts, looking only at matches
/// that end in the bytes appended from `appended` on (earlier ones would have stopped the sample
/// already). A token's piece may hold a stop string with more after it, or finish one that
/// earlier pieces began. An empty stop string stops nothing.
fn stop_at(text: &[u8], appended: usize, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .map(String::as_bytes)
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| {
            let from = appended.saturating_sub(stop.len() - 1);
            text[from..].windows(stop.len()).position(|w| w == stop).map(|at| from + at)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_candidates_are_the_largest_logits_lower_ids_first_on_ties() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0, f32::NEG_INFINITY, 2.5];
        let ids = |k| top_candidates(&logits, k).iter().map(|c| c.id().0).collect::<Vec<_>>();
        assert_eq!(ids(1), [1]);
        assert_eq!(ids(3), [1, 3, 6]);
        assert_eq!(ids(4), [1, 3, 6, 4]);
        assert_eq!(ids(0).len(), logits.len());
        assert_eq!(ids(99).len(), logits.len());
        // NaN ranks as -∞, -0 as 0; a NaN among the first k gives way to a later logit.
        let odd = [f32::NAN, -0.0, 0.0, f32::NEG_INFINITY, 1.0, f32::NAN];
        let ids = |k| top_candidates(&odd, k).iter().map(|c| c.id().0).collect::<Vec<_>>();
        assert_eq!(ids(4), [4, 1, 2, 0]);
        assert_eq!(top_candidates(&[f32::NAN, 5.0, 3.0], 2).iter().map(|c| c.id().0).collect::<Vec<_>>(), [1, 2]);
        let greedy =
            Sampling { temperature: 0.0, top_p: 1.0, top_k: 40, max_tokens: 1, stop: vec![], stop_after_code: false };
        assert_eq!(sampleable(&greedy), 1);
        assert_eq!(sampleable(&Sampling { temperature: 0.8, ..greedy.clone() }), 40);
    }

    #[test]
    fn no_sample_seed_asks_llama_cpp_for_a_random_one() {
        assert_eq!(seed32(0xFFFF_FFFF), u32::MAX - 1);
        assert_eq!(seed32(0x1234_5678_0000_0001), 0x1234_5679);
    }

    #[test]
    fn stop_strings_are_found_inside_and_across_pieces() {
        let stops = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Appended "x\n\n    y": the stop inside the piece, with more after it.
        assert_eq!(stop_at(b"return x\n\n    y", 7, &stops(&["\n\n"])), Some(8));
        // "ret" + "urn": a stop that earlier pieces began.
        assert_eq!(stop_at(b"x = ret", 4, &stops(&["return"])), None);
        assert_eq!(stop_at(b"x = return", 7, &stops(&["return"])), Some(4));
        // The earliest of several; none before the window; empty ones ignored.
        assert_eq!(stop_at(b"a;b.c", 1, &stops(&[".", ";", ""])), Some(1));
        assert_eq!(stop_at(b"a;b.c", 4, &stops(&[";"])), None);
        assert_eq!(stop_at(b"abc", 0, &stops(&["", "abcd"])), None);
    }

    #[test]
    fn top_candidates_of_a_vocabulary_are_its_sorted_head() {
        // Many ties, and a row that does not end on a whole block; then one rising all along,
        // where every logit is a candidate and the candidates are cut down again and again.
        let scattered: Vec<f32> =
            (0..151_937u32).map(|i| (i.wrapping_mul(2_654_435_761) % 1000) as f32 * 0.01).collect();
        let rising: Vec<f32> = (0..20_000).map(|i| i as f32 * 0.5).collect();
        for (logits, k) in [(&scattered, 1), (&scattered, 40), (&scattered, 1000), (&rising, 40)] {
            let mut order: Vec<i32> = (0..logits.len() as i32).collect();
            order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
            let ids: Vec<i32> = top_candidates(logits, k).iter().map(|c| c.id().0).collect();
            assert_eq!(ids, order[..k]);
            // The baseline compilation too, where the AVX2 one ran above.
            let portable: Vec<i32> = top_candidates_in(logits, k).iter().map(|c| c.id().0).collect();
            assert_eq!(portable, ids);
        }
    }
}
