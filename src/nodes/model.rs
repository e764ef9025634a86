use crate::dsl::schema::{KindSpec, Role, ValueType, optional};

pub static SPEC: KindSpec = KindSpec {
    name: "model",
    role: Role::Model,
    doc: "Declares a GGUF model that `generate`, `revise` and `finetune-lora` use by name. \
          `path=\"default\"` is the built-in Qwen2.5-Coder-0.5B-Instruct, fetched on first use \
          (or by `seedflow fetch model`). A model is loaded once per run and shared by every step \
          that names it; adapters attach per step without reloading it.",
    properties: &[
        optional(
            "path",
            ValueType::ModelFile,
            r#""default""#,
            "\"default\" or a GGUF file, relative to the workflow file.",
        ),
        optional("context", ValueType::Integer { min: 256 }, "4096", "Context length in tokens."),
        optional(
            "gpu-layers",
            ValueType::Integer { min: -1 },
            "0",
            "Layers to offload to the GPU; -1 offloads all, 0 runs on the CPU.",
        ),
        optional("threads", ValueType::Integer { min: 0 }, "0", "CPU threads; 0 uses every core."),
        optional("batch", ValueType::Integer { min: 1 }, "512", "Tokens per llama.cpp batch."),
    ],
    metrics: &[],
    at_least_one: &[],
    example: r#"model "coder" path="default" context=4096 gpu-layers=0

dataset "problems" format="mbpp" path="examples/data/mbpp/prompt.jsonl"
generate "answers" model="coder" tasks="problems" samples=1 temperature=0
"#,
};
