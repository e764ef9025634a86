use crate::assets;
use crate::dsl::schema::{FromValue, KindSpec, ModelPath, Param, Props, Role, ValueType, optional};
use crate::llm::{self, ModelSettings};

const PATH: Param<ModelPath> = Param::new(optional(
    "path",
    ValueType::ModelFile,
    r#""default""#,
    "\"default\" or a GGUF file, relative to the workflow file.",
));
const CONTEXT: Param<i64> = Param::new(optional(
    "context",
    ValueType::Integer { min: 0, max: llm::MOST_TOKENS as i64 },
    "0",
    "Most tokens of one sequence (prompt and answer); 0 allows what the model was trained \
     for (32,768 tokens for the default model). Each sequence gets the cache its step's \
     longest prompt and answer need, not this much.",
));
const GPU_LAYERS: Param<i64> = Param::new(optional(
    "gpu-layers",
    ValueType::Integer { min: -1, max: i32::MAX as i64 },
    "0",
    "Layers to offload to the GPU; -1 offloads all, 0 runs on the CPU. Other values need a \
     seedflow built with `--features cuda` and a CUDA device; without them the step fails.",
));
const THREADS: Param<i64> = Param::new(optional(
    "threads",
    ValueType::Integer { min: 0, max: llm::MOST_THREADS as i64 },
    "0",
    "CPU threads; 0 uses every core (at most 512, llama.cpp's limit).",
));
const BATCH: Param<i64> = Param::new(optional(
    "batch",
    ValueType::Integer { min: 1, max: llm::MOST_TOKENS as i64 },
    "512",
    "Prompt tokens per llama.cpp decode (the sequences' next tokens go into one decode \
     however many there are).",
));
const PARALLEL: Param<i64> = Param::new(optional(
    "parallel",
    ValueType::Integer { min: 1, max: llm::MOST_PARALLEL as i64 },
    "8",
    "Sequences decoded together (the samples of several tasks); at most 255, as llama.cpp \
     keeps 256 sequences and seedflow one more for the prompt they share.",
));

pub static SPEC: KindSpec = KindSpec {
    name: "model",
    role: Role::Model,
    doc: "Declares a GGUF model that `generate`, `revise` and `finetune-lora` use by name. \
          `path=\"default\"` is the built-in Qwen2.5-Coder-0.5B-Instruct, fetched on first use \
          (or by `seedflow fetch model`). A model is loaded once per run and shared by every step \
          that names it; adapters attach per step without reloading it.",
    properties: &[PATH.spec, CONTEXT.spec, GPU_LAYERS.spec, THREADS.spec, BATCH.spec, PARALLEL.spec],
    metrics: &[],
    at_least_one: &[],
    requires: &[],
    example: r#"model "coder" path="default" context=8192 gpu-layers=0

dataset "problems" format="mbpp" path="examples/data/mbpp/prompt.jsonl"
generate "answers" model="coder" tasks="problems" samples=1 temperature=0
"#,
};

/// The declaration's settings, with `path="default"` fetched on first use.
pub fn settings(props: &Props, progress: &dyn Fn(&str)) -> Result<ModelSettings, String> {
    // The checker gives each a value (its schema default when not written).
    fn get<T: FromValue>(props: &Props, param: &Param<T>) -> Result<T, String> {
        props.param(param).ok_or_else(|| format!("the model has no `{}`", param.name()))
    }
    let path = match get(props, &PATH)? {
        ModelPath::File(path) => path,
        ModelPath::Default => assets::ensure(&assets::DEFAULT_MODEL, progress).map_err(|e| e.to_string())?,
    };
    Ok(ModelSettings {
        path,
        context: get(props, &CONTEXT)? as u32,
        gpu_layers: get(props, &GPU_LAYERS)? as i32,
        threads: get(props, &THREADS)? as i32,
        batch: get(props, &BATCH)? as u32,
        parallel: get(props, &PARALLEL)? as u32,
    })
}
