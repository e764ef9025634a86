use crate::dsl::schema::{Artifact, KindSpec, Role, ValueType, optional, required, unset};
use crate::engine::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "finetune-lora",
    role: Role::Step(Artifact::Adapter),
    doc: "Trains a LoRA adapter on (requirement -> code) pairs: passing samples or verdicts, or a \
          dataset's reference solutions. The base model is the model's own GGUF file, frozen; only \
          the LoRA matrices train, with the loss on the completion tokens only. The adapter is \
          written in llama.cpp's GGUF LoRA format (for `adapter=`) and as a PEFT directory. \
          `init` continues training an earlier adapter.",
    properties: &[
        required("model", ValueType::Model, "The base `model`."),
        required(
            "data",
            ValueType::Input(&[Artifact::Verdicts, Artifact::Samples, Artifact::Tasks]),
            "Training pairs: passing verdicts or samples, or tasks' reference solutions.",
        ),
        unset(
            "init",
            ValueType::Input(&[Artifact::Adapter]),
            "An adapter to continue training (for example `prev.tune`).",
        ),
        optional("rank", ValueType::Integer { min: 1 }, "8", "LoRA rank."),
        optional(
            "alpha",
            ValueType::Number { min: 0.0, max: f64::INFINITY },
            "16",
            "LoRA alpha; the update is scaled by alpha / rank.",
        ),
        optional("dropout", ValueType::Number { min: 0.0, max: 1.0 }, "0.0", "Dropout on the LoRA input."),
        optional(
            "targets",
            ValueType::Choices(&["q", "k", "v", "o", "gate", "up", "down"]),
            r#""q,k,v,o,gate,up,down""#,
            "Projections that get LoRA matrices.",
        ),
        optional("epochs", ValueType::Integer { min: 1 }, "2", "Passes over the data."),
        optional("learning-rate", ValueType::Number { min: 0.0, max: 1.0 }, "0.0002", "Peak AdamW learning rate."),
        optional("warmup", ValueType::Number { min: 0.0, max: 1.0 }, "0.1", "Fraction of steps spent warming up."),
        optional(
            "batch",
            ValueType::Integer { min: 1 },
            "1",
            "Examples per optimizer step (by gradient accumulation).",
        ),
        optional("max-length", ValueType::Integer { min: 16 }, "512", "Longest training sequence in tokens."),
    ],
    metrics: &["loss", "steps", "examples", "tokens"],
    at_least_one: &[],
    example: r#"model "coder" path="default"
dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=50
finetune-lora "tune" model="coder" data="train" rank=8 alpha=16 epochs=2 learning-rate=0.0002
"#,
};

pub fn run(_ctx: &mut Context) -> Result<Outcome, StepError> {
    Err(StepError::NotAvailable { kind: "finetune-lora", detail: "LoRA training lands with the training issue" })
}
