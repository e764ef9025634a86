//! Batched sampling: the samples of a task are parallel sequences that start from the prompt's
//! KV cache, decoded once; a sample starts as soon as a sequence is free (continuous batching).

use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use rayon::prelude::*;

use super::chat::{chat_prompt, chat_template};
use super::model::{Llama, Loaded, attach_adapter, backend, load_adapter, threads};
use super::sampling::{sampleable, sampler, top_candidates};
use super::{
    Cancelled, Generated, Generation, Inference, LlmError, MOST_PARALLEL, ModelSettings, Progress, Sampled, Sampling,
    Timing, extract,
};

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

impl Llama {
    /// The logits llama.cpp computes after each of `tokens` (one sequence, f32 KV cache): what
    /// the trainer's forward pass is checked against.
    pub fn logits(
        &self,
        settings: &ModelSettings,
        adapter: Option<(&Path, f32)>,
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>, LlmError> {
        let loaded = self.load(settings)?;
        let mut guard = loaded.lock().map_err(|_| LlmError::Poisoned("model"))?;
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
        let mut context = model.new_context(backend()?, params).map_err(|e| LlmError::Context(e.to_string()))?;
        attach_adapter(&mut context, adapters, adapter)?;
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &token) in tokens.iter().enumerate() {
            batch.add(LlamaToken(token as i32), i as i32, &[0], true).map_err(|e| LlmError::Batch(e.to_string()))?;
        }
        context.decode(&mut batch).map_err(|e| LlmError::Decode(e.to_string()))?;
        Ok((0..tokens.len()).map(|i| context.get_logits_ith(i as i32).to_vec()).collect())
    }
}

impl Inference for Llama {
    fn generate(&self, work: &Generation<'_>, cancelled: &Cancelled, progress: &mut Progress) -> Sampled {
        let Generation { settings, adapter, requests, sampling } = *work;
        if requests.is_empty() {
            return Ok((vec![], Timing::default()));
        }
        let loaded = self.load(settings)?;
        let mut guard = loaded.lock().map_err(|_| LlmError::Poisoned("model"))?;
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
            return Err(LlmError::ContextTooSmall { max_tokens: sampling.max_tokens, needed: longest, now });
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
        let mut context = model.new_context(backend()?, params).map_err(|e| LlmError::Context(e.to_string()))?;
        attach_adapter(&mut context, adapters, adapter)?;

        // Continuous batching: a sample starts as soon as a sequence is free, so a finished sample's
        // sequence goes to the next sample instead of waiting for the longest one. Each prompt is
        // decoded once, into the `stash` sequence, and copied to every sequence that takes one of
        // its samples: llama.cpp copies between per-sequence caches only whole sequences, so the
        // copy comes from one that holds the prompt alone. A prompt keeps what it shares with the
        // one before it in the stash (the chat template's system turn, a prompt template's
        // opening, `revise`'s worked examples where it shows them) and decodes the rest.
        let stash = parallel as i32;
        let mut stashed: &[LlamaToken] = &[];
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
                return Err(LlmError::Interrupted);
            }
            // Retire finished sequences: free their slot and cells, keep their text (with the
            // normaliser of their last token, still owed if they finished in the last step).
            if slots.iter().zip(&owed).any(|(slot, o)| o.owed && slot.as_ref().is_some_and(|s| !s.live)) {
                settle(&mut slots, &mut owed);
            }
            for (seq, slot) in slots.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|s| !s.live) {
                    let Some(done) = slot.take() else { continue };
                    context.kv_cache_seq_rm(seq as i32, None, None).map_err(|e| LlmError::Cache(e.to_string()))?;
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
                    // At least the last token is decoded: its logits start the samples. (Sequences
                    // that copied the stash and have not decoded since still get its old cells:
                    // llama.cpp copies a cache's data at the next decode, before that decode
                    // writes any.)
                    let kept = common_prefix(stashed, tokens).min(tokens.len().saturating_sub(1));
                    context
                        .kv_cache_seq_rm(stash, Some(kept as u32), None)
                        .map_err(|e| LlmError::Cache(e.to_string()))?;
                    let rest = &tokens[kept..];
                    let logits = decode_prompt(&mut context, &mut prompt_batch, batch_size, rest, kept, stash)?;
                    stashed = tokens;
                    admitting = Some(Admitting {
                        request: admitted,
                        started: 0,
                        position: tokens.len() as i32,
                        candidates: top_candidates(&logits, sampleable(sampling)),
                        normaliser: crate::numeric::log_sum_exp(&logits),
                        logits,
                    });
                    prompt_time += prompt_started.elapsed();
                    prompt_tokens += rest.len() as u64;
                    admitted += 1;
                }
                let Some(prompt) = admitting.as_mut().filter(|a| has_samples_left(a)) else {
                    break;
                };
                context.kv_cache_seq_cp(stash, seq as i32, None, None).map_err(|e| LlmError::Cache(e.to_string()))?;
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
                step_batch
                    .add(token, sequence.position, &[seq as i32], true)
                    .map_err(|e| LlmError::Batch(e.to_string()))?;
                sequence.position += 1;
            }
            if step_batch.n_tokens() == 0 {
                if slots.iter().all(Option::is_none) && admitted == requests.len() {
                    break;
                }
                continue; // sequences that just finished are retired at the top
            }
            let decoding = Instant::now();
            context.decode(&mut step_batch).map_err(|e| LlmError::Decode(e.to_string()))?;
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
}

/// How many tokens `a` and `b` begin with alike.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
) -> Result<(), LlmError> {
    while let Some(free) = slots.iter().position(Option::is_none)
        && let Some(last) = slots.iter().rposition(|s| s.as_ref().is_some_and(|s| s.live))
        && free < last
    {
        context.kv_cache_seq_cp(last as i32, free as i32, None, None).map_err(|e| LlmError::Cache(e.to_string()))?;
        context.kv_cache_seq_rm(last as i32, None, None).map_err(|e| LlmError::Cache(e.to_string()))?;
        slots.swap(free, last);
        owed.swap(free, last);
    }
    Ok(())
}

/// Decodes `tokens` into sequence `seq` from position `start`, in chunks of `size` (the
/// batch's), and returns the logits after the last one.
fn decode_prompt(
    context: &mut llama_cpp_2::context::LlamaContext<'_>,
    batch: &mut LlamaBatch,
    size: usize,
    tokens: &[LlamaToken],
    start: usize,
    seq: i32,
) -> Result<Vec<f32>, LlmError> {
    let mut last = 0;
    for (c, chunk) in tokens.chunks(size).enumerate() {
        batch.clear();
        for (j, &token) in chunk.iter().enumerate() {
            let at = c * size + j;
            batch
                .add(token, (start + at) as i32, &[seq], at + 1 == tokens.len())
                .map_err(|e| LlmError::Batch(e.to_string()))?;
        }
        context.decode(batch).map_err(|e| LlmError::Decode(format!("the prompt: {e}")))?;
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
}
