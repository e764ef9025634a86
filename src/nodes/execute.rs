use crate::dsl::schema::{Artifact, KindSpec, Role, ValueType, optional, required};
use crate::engine::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "execute",
    role: Role::Step(Artifact::Verdicts),
    doc: "Runs each program against its task's tests in a sandbox: CPython compiled to WASI inside \
          wasmtime, with no files, no network, no processes, a CPU and wall-clock budget and a \
          memory cap. Given tasks instead of samples, it runs the dataset's reference solutions \
          (a way to validate a dataset). Each verdict has a status (`passed`, `failed`, `error`, \
          `syntax`, `timeout`, `memory`) and feedback for Self-Revise: the failing test, the \
          exception and a short traceback. Samples run in parallel on all cores.",
    properties: &[
        required(
            "code",
            ValueType::Input(&[Artifact::Samples, Artifact::Tasks]),
            "The samples to run, or tasks whose reference solutions to run.",
        ),
        optional(
            "timeout",
            ValueType::Duration,
            r#""5s""#,
            "Time budget per program.",
        ),
        optional(
            "memory",
            ValueType::Size,
            r#""256MiB""#,
            "Memory cap per program.",
        ),
        optional(
            "feedback-chars",
            ValueType::Integer { min: 100 },
            "2000",
            "Most characters of feedback kept per verdict.",
        ),
    ],
    metrics: &["count", "passed", "pass-rate", "pass@k"],
    at_least_one: &[],
    example: r#"dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl"
execute "references" code="train" timeout="5s" memory="256MiB"
"#,
};

pub fn run(_ctx: &mut Context) -> Result<Outcome, StepError> {
    Err(StepError::NotAvailable {
        kind: "execute",
        detail: "the wasmtime sandbox lands with the execute issue",
    })
}
