//! Inference: the [`Inference`] trait the steps sample through, and its implementation with
//! llama.cpp in this process (through `llama-cpp-2`), split the way llama-cpp-rs splits it:
//! [`model`] (the backend, models loaded once per run, LoRA adapters), [`chat`] (chat templates,
//! training sequences), [`sampling`] (candidates and the seeded sampler), [`batch`] (batched
//! generation with shared prompts, continuous batching).

mod batch;
mod chat;
pub mod extract;
mod model;
pub mod prompt;
mod sampling;
mod server;
mod spawned;

use std::path::{Path, PathBuf};

pub use chat::training_tokens;
pub use model::Llama;
pub use server::{Endpoint, Fleet, Server, ServerError, ServerSettings};
pub use spawned::Spawned;

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
    /// Sequences decoded together (on a server: requests in flight).
    pub parallel: u32,
    /// A server that serves the model, instead of llama.cpp in this process.
    pub server: Option<ServerSettings>,
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

/// A backend that samples answers: [`Llama`] (llama.cpp in this process) or [`Server`] (a
/// server speaking the OpenAI chat-completions API).
pub trait Inference: Send + Sync {
    /// Samples every request's seeds.
    fn generate(&self, work: &Generation<'_>, cancelled: &Cancelled, progress: &mut Progress) -> Sampled;
}

/// Whether the step was stopped (Ctrl-C, a failed write): generation ends as soon as it can.
pub type Cancelled<'a> = dyn Fn() -> bool + 'a;
/// Hears each run of requests that finished, in request order, with how many are done in all.
pub type Progress<'a> = dyn FnMut(usize, &[Vec<Generated>]) + 'a;
/// The samples by request, and where the time went.
pub type Sampled = Result<(Vec<Vec<Generated>>, Timing), LlmError>;

/// What to sample: the requests, with which model (and adapter) and how.
#[derive(Debug, Clone, Copy)]
pub struct Generation<'a> {
    pub settings: &'a ModelSettings,
    /// A GGUF LoRA adapter and its scale.
    pub adapter: Option<(&'a Path, f32)>,
    pub requests: &'a [Request],
    pub sampling: &'a Sampling,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot start llama.cpp: {0}")]
    Start(String),
    #[error("model file `{}` does not exist", .0.display())]
    NoModelFile(PathBuf),
    #[error(
        "`gpu-layers={layers}` asks for a GPU, but llama.cpp has none to offload to: {why}; set `gpu-layers=0` to run on the CPU"
    )]
    NoGpu { layers: i32, why: &'static str },
    #[error(
        "`{}` is a Hugging Face model directory, and llama.cpp (in this process, or a spawned llama-server) reads \
         GGUF files: serve the directory (vLLM, SGLang) and name the server with `server=URL`, or convert it to GGUF \
         with llama.cpp's convert_hf_to_gguf.py",
        .0.display()
    )]
    NotGguf(PathBuf),
    #[error("cannot load `{}` as a GGUF model: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("cannot read the vocabulary of `{}`: {message}", path.display())]
    Vocabulary { path: PathBuf, message: String },
    #[error("cannot load LoRA adapter `{}`: {message}", path.display())]
    Adapter { path: PathBuf, message: String },
    #[error("cannot attach the adapter: {0}")]
    Attach(String),
    #[error("{0}")]
    Template(String),
    #[error(
        "a prompt and an answer of up to {max_tokens} tokens need a context of {needed} tokens; raise the model's `context` (now {now})"
    )]
    ContextTooSmall { max_tokens: u32, needed: u32, now: String },
    #[error("cannot create a llama.cpp context: {0}")]
    Context(String),
    #[error("llama.cpp could not decode: {0}")]
    Decode(String),
    #[error("llama.cpp could not fill a batch: {0}")]
    Batch(String),
    #[error("llama.cpp's KV cache: {0}")]
    Cache(String),
    #[error("the {0} is poisoned")]
    Poisoned(&'static str),
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Server(#[from] ServerError),
}
