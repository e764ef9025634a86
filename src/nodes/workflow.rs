use crate::dsl::schema::{KindSpec, Role, ValueType, params};

// Read by the planner, which gives every step the run's seed.
params! {
    /// Root of every random draw in the run.
    SEED: i64 = optional("seed", ValueType::at_least(0), "0");
}

pub static SPEC: KindSpec = KindSpec {
    name: "workflow",
    role: Role::Workflow,
    doc: "Names the workflow and sets what applies to the whole run. At most one, at the top of the \
          file; without it the workflow is named after its file. The name is the run directory's \
          default parent (`runs/<name>/<timestamp>/`). The seed is the root of every random draw: \
          each sample's seed derives from (seed, step, task, index), so a rerun gives the same \
          artifacts whatever the scheduling.",
    properties: &[SEED.spec],
    metrics: &[],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: r#"workflow "reference-check" seed=7

dataset "problems" format="mbpp" path="examples/data/mbpp/prompt.jsonl"
"#,
};
