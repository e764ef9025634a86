use crate::dsl::expr::Expr;
use crate::dsl::schema::{KindSpec, Role, ValueType, params};

/// Most iterations: a bound that catches a mistyped value before a loop that would not end.
const MOST_ITERATIONS: i64 = 10_000;

// Read by the executor, which runs the loop.
params! {
    /// Most iterations to run.
    pub MAX_ITERATIONS: i64 = optional("max-iterations", ValueType::Integer { min: 1, max: MOST_ITERATIONS }, "3");
    /// Stop after an iteration in which this holds.
    pub UNTIL: Option<Expr> = unset("until", ValueType::Expression);
}

pub static SPEC: KindSpec = KindSpec {
    name: "loop-until",
    role: Role::Loop,
    doc: "Runs the steps inside its braces again and again: at most `max-iterations` times, and \
          stops early after an iteration in which `until` holds. Inside, `prev.step` is a step's \
          output in the previous iteration (absent in the first, which then uses the base model); \
          outside, `loop.step` is a step's output in the last iteration. `until` compares metrics \
          of the loop's steps (`step.metric`) and `iteration` with numbers, joined by `&&`, `||` \
          and `!`. A comparison with a metric its step did not publish (training on no examples \
          has no loss) is undecided, and so is an `until` that depends on it: the loop goes on, \
          and says why. Each iteration's outputs are kept under `<loop>/iteration-<n>/`.",
    properties: &[MAX_ITERATIONS.spec, UNTIL.spec],
    metrics: &[],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: r#"model "coder" path="default"
dataset "train" format="mbpp" path="examples/data/mbpp/prompt.jsonl"

loop-until "adapt" max-iterations=2 until="fixed.count == 0" {
    generate "attempts" model="coder" adapter="prev.tune" tasks="train" samples=2
    execute "verdicts" code="attempts"
    select "errors" from="verdicts" status="!passed" per-task=1 prefer="highest-logprob"
    revise "revisions" model="coder" adapter="prev.tune" errors="errors" samples=2
    execute "checked" code="revisions"
    select "fixed" from="checked" status="passed" per-task=1 prefer="min-edit-distance"
    finetune-lora "tune" model="coder" data="fixed" history="prev.tune"
}
"#,
};
