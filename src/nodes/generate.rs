use crate::dsl::schema::{Artifact, KindSpec, Role, ValueType, optional, required, unset};
use crate::engine::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "generate",
    role: Role::Step(Artifact::Samples),
    doc: "Samples `samples` programs for each task with a model (and optionally a LoRA adapter). \
          The samples of a task are parallel sequences of one llama.cpp batch sharing the prompt; \
          several tasks share a batch. Every sample is seeded from (workflow seed, step, task, \
          index), so reruns are identical; temperature 0 is greedy. Each sample records its mean \
          token log-probability and token count. Instruct models get the chat template stored in \
          the GGUF; the prompt template can be replaced with `template`.",
    properties: &[
        required("model", ValueType::Model, "The `model` to sample from."),
        required("tasks", ValueType::Input(&[Artifact::Tasks]), "The tasks to solve."),
        unset("adapter", ValueType::Input(&[Artifact::Adapter]), "A LoRA adapter to attach (for example `prev.tune`)."),
        optional(
            "adapter-scale",
            ValueType::Number { min: 0.0, max: 10.0 },
            "1.0",
            "Scale of the adapter's contribution.",
        ),
        optional("samples", ValueType::Integer { min: 1 }, "1", "Programs per task."),
        optional("temperature", ValueType::Number { min: 0.0, max: 5.0 }, "0.8", "Sampling temperature; 0 is greedy."),
        optional("top-p", ValueType::Number { min: 0.0, max: 1.0 }, "0.95", "Nucleus sampling threshold."),
        optional("top-k", ValueType::Integer { min: 0 }, "40", "Keep the k most likely tokens; 0 keeps all."),
        optional("max-tokens", ValueType::Integer { min: 1 }, "512", "Most tokens generated per sample."),
        unset("stop", ValueType::Text, "An extra stop sequence."),
        unset("template", ValueType::File, "A prompt template replacing the built-in one (`std/prompts/…` or a file)."),
    ],
    metrics: &["count", "tokens"],
    at_least_one: &[],
    example: r#"model "coder" path="default"
dataset "test" format="mbpp" path="examples/data/mbpp/test.jsonl" limit=10
generate "answers" model="coder" tasks="test" samples=5 temperature=0.8 top-p=0.95 max-tokens=384
"#,
};

pub fn run(_ctx: &mut Context) -> Result<Outcome, StepError> {
    Err(StepError::NotAvailable { kind: "generate", detail: "llama.cpp inference lands with the inference issue" })
}
