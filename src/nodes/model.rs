use std::path::Path;
use std::time::Duration;

use crate::assets;
use crate::dsl::schema::{FromValue, KindSpec, ModelPath, Param, Props, Role, ValueType, params};
use crate::llm::{self, Endpoint, ModelSettings, ServerSettings};

params! {
    /// "default" (Qwen2.5-Coder-0.5B-Instruct), "qwen2.5-coder-1.5b" (the same family, three times the size), a
    /// GGUF file, or a Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`: what a
    /// vLLM or SGLang `server` serves, which `finetune-lora` then trains on), relative to the workflow file.
    /// The built-in models are fetched on first use.
    PATH: ModelPath = optional("path", ValueType::ModelFile, r#""default""#);
    /// Most tokens of one sequence (prompt and answer); 0 allows what the model was trained for (32,768 tokens
    /// for the default model). Each sequence gets the cache its step's longest prompt and answer need, not this
    /// much.
    CONTEXT: i64 = optional("context", ValueType::Integer { min: 0, max: llm::MOST_TOKENS as i64 }, "0");
    /// Layers to offload to the GPU; -1 offloads all, 0 runs on the CPU. Other values need a seedflow built
    /// with `--features cuda` (`seedflow check` refuses them otherwise) and a CUDA device (the first step to
    /// sample fails without one).
    GPU_LAYERS: i64 = optional("gpu-layers", ValueType::Integer { min: -1, max: i32::MAX as i64 }, "0");
    /// CPU threads; 0 uses every core (at most 512, llama.cpp's limit).
    THREADS: i64 = optional("threads", ValueType::Integer { min: 0, max: llm::MOST_THREADS as i64 }, "0");
    /// Prompt tokens per llama.cpp decode (the sequences' next tokens go into one decode however many there
    /// are).
    BATCH: i64 = optional("batch", ValueType::Integer { min: 1, max: llm::MOST_TOKENS as i64 }, "512");
    /// Sequences decoded together (the samples of several tasks); at most 255, as llama.cpp keeps 256 sequences
    /// and seedflow one more for the prompt they share.
    PARALLEL: i64 = optional("parallel", ValueType::Integer { min: 1, max: llm::MOST_PARALLEL as i64 }, "8");
    /// The base URL of a server that serves the model through the OpenAI chat-completions API (llama-server,
    /// vLLM, SGLang: `http://host:8080` or `…/v1`); `generate` and `revise` then sample there, `parallel`
    /// requests at a time, and `path` is only what `finetune-lora` trains (the weights the server must serve).
    /// Several URLs, comma-separated, spread the requests over as many servers of the same model, `parallel` at
    /// a time on each. "spawn" starts llama-server on `path` (`seedflow fetch llama-server` builds it) and
    /// restarts it with each adapter a step asks for. Unset: llama.cpp in this process. A server at a URL
    /// decides its own `context`, `threads`, `batch` and `gpu-layers` (a step says so when they are set).
    SERVER: Option<String> = unset("server", ValueType::Server);
    /// The model name requests ask the server for; unset takes the first it lists.
    SERVER_MODEL: Option<String> = unset("server-model", ValueType::Text);
    /// The environment variable holding the server's API key (sent as a bearer token when set); the key itself
    /// never goes in a workflow.
    API_KEY_ENV: String = optional("api-key-env", ValueType::EnvVar, r#""SEEDFLOW_API_KEY""#);
    /// Most time the server may take over one sample. A request that cannot connect, or that the server answers
    /// with 5xx or 429, is sent up to 4 times, 1, 2 and 4 s apart.
    REQUEST_TIMEOUT: Duration = optional(
        "request-timeout",
        ValueType::Duration { min: Duration::from_secs(1), max: Duration::from_secs(24 * 60 * 60) },
        r#""10m""#,
    );
}

pub static SPEC: KindSpec = KindSpec {
    name: "model",
    role: Role::Model,
    doc: "Declares a GGUF model that `generate`, `revise` and `finetune-lora` use by name. \
          `path=\"default\"` is the built-in Qwen2.5-Coder-0.5B-Instruct, fetched on first use \
          (or by `seedflow fetch model`). A model is loaded once per run and shared by every step \
          that names it; adapters attach per step without reloading it. With `server`, the \
          steps sample on an OpenAI-compatible server instead (README, \"On an inference \
          server\").",
    properties: &[
        PATH.spec,
        CONTEXT.spec,
        GPU_LAYERS.spec,
        THREADS.spec,
        BATCH.spec,
        PARALLEL.spec,
        SERVER.spec,
        SERVER_MODEL.spec,
        API_KEY_ENV.spec,
        REQUEST_TIMEOUT.spec,
    ],
    metrics: &[],
    at_least_one: &[],
    requires: &[("server-model", "server"), ("api-key-env", "server"), ("request-timeout", "server")],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: Some(check_values),
    unkeyed: &["threads", "request-timeout", "api-key-env"],
    example: r#"model "coder" path="default" context=8192 gpu-layers=0

dataset "problems" format="mbpp" path="examples/data/mbpp/prompt.jsonl"
generate "answers" model="coder" tasks="problems" samples=1 temperature=0
"#,
};

/// GPU layers that this build cannot offload: llama.cpp would run every layer on the CPU,
/// silently, so the run would fail at its first `generate`. (A server offloads on its own.)
fn check_values(props: &Props, _: Option<&Path>) -> Result<(), (&'static str, String)> {
    let server = props.param(&SERVER).flatten();
    if server.is_none() && !cfg!(feature = "cuda") && props.param(&GPU_LAYERS).is_some_and(|layers| layers != 0) {
        let why = "this seedflow was built without GPU support, so no layer can go to a GPU: set `gpu-layers=0`, \
                   or build with `cargo build --release --features cuda`";
        return Err((GPU_LAYERS.name(), why.into()));
    }
    Ok(())
}

/// The declaration's settings, with a built-in model fetched on first use.
pub fn settings(props: &Props, progress: &dyn Fn(&str)) -> Result<ModelSettings, String> {
    let server = server(props, progress)?;
    // A server at a URL decides these itself (`--set coder.server=…` on a workflow that sets them).
    if let Some(ServerSettings { endpoint: Endpoint::Urls(_), .. }) = &server {
        let set: Vec<String> = [&CONTEXT, &GPU_LAYERS, &THREADS, &BATCH]
            .into_iter()
            .filter(|param| props.param(*param) != param.spec.default.and_then(|d| d.parse::<i64>().ok()))
            .map(|param| format!("`{}`", param.name()))
            .collect();
        if !set.is_empty() {
            progress(&format!("the server decides its own {}: this model's are not used", set.join(", ")));
        }
    }
    let path = match get(props, &PATH)? {
        ModelPath::File(path) => path,
        ModelPath::Builtin(asset) => assets::ensure(asset, progress).map_err(|e| e.to_string())?,
    };
    Ok(ModelSettings {
        path,
        context: get(props, &CONTEXT)? as u32,
        gpu_layers: get(props, &GPU_LAYERS)? as i32,
        threads: get(props, &THREADS)? as i32,
        batch: get(props, &BATCH)? as u32,
        parallel: get(props, &PARALLEL)? as u32,
        server,
    })
}

/// A property of the declaration: the checker gives each a value (its schema default when not
/// written).
fn get<T: FromValue>(props: &Props, param: &Param<T>) -> Result<T, String> {
    props.param(param).ok_or_else(|| format!("the model has no `{}`", param.name()))
}

/// Where the declaration's model is served, if on a server.
fn server(props: &Props, progress: &dyn Fn(&str)) -> Result<Option<ServerSettings>, String> {
    let Some(url) = get(props, &SERVER)? else { return Ok(None) };
    // The checker let through a URL or "spawn" only.
    let endpoint = if url == "spawn" {
        Endpoint::Spawn(assets::llama_server(progress).map_err(|e| e.to_string())?)
    } else {
        Endpoint::Urls(url.split(',').map(|url| url.trim().to_string()).collect())
    };
    Ok(Some(ServerSettings {
        endpoint,
        model: get(props, &SERVER_MODEL)?,
        api_key_env: get(props, &API_KEY_ENV)?,
        timeout: get(props, &REQUEST_TIMEOUT)?,
    }))
}
