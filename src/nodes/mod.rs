//! One file per node kind. Each holds its kind's [`KindSpec`] (the schema, its documentation and
//! an example) and, for steps, the function that runs it.

mod dataset;
mod execute;
mod finetune_lora;
mod gate;
mod generate;
mod loop_until;
pub mod model;
mod report;
mod revise;
mod select;
#[cfg(test)]
pub(crate) mod testing;
mod workflow;

use crate::dsl::schema::{KindSpec, Value};
use crate::engine::context::{Context, Outcome, StepError};
use crate::plan::PlannedStep;

/// Every kind of the language, in the order the language reference lists them.
pub static KINDS: &[&KindSpec] = &[
    &workflow::SPEC,
    &model::SPEC,
    &dataset::SPEC,
    &generate::SPEC,
    &execute::SPEC,
    &select::SPEC,
    &revise::SPEC,
    &finetune_lora::SPEC,
    &loop_until::SPEC,
    &report::SPEC,
    &gate::SPEC,
];

pub fn kind(name: &str) -> Option<&'static KindSpec> {
    let found = KINDS.iter().find(|k| k.name == name).copied();
    #[cfg(test)]
    let found = found.or_else(|| testing::KINDS.iter().find(|k| k.name == name).copied());
    found
}

pub type Runner = fn(&mut Context) -> Result<Outcome, StepError>;

/// The function that runs a step kind.
pub fn runner(kind: &str) -> Option<Runner> {
    Some(match kind {
        "dataset" => dataset::run,
        "generate" => generate::run,
        "execute" => execute::run,
        "select" => select::run,
        "revise" => revise::run,
        "finetune-lora" => finetune_lora::run,
        "report" => report::run,
        "gate" => gate::run,
        #[cfg(test)]
        other => return testing::runner(other),
        #[cfg(not(test))]
        _ => return None,
    })
}

/// What a step holds while it runs, so the executor can bound each kind of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    None,
    /// One decode stream per loaded model.
    Model(String),
    /// A sandbox worker; as many as the run's `--workers`.
    Sandbox,
    /// Training uses every core: one at a time.
    Training,
}

pub fn resource(step: &PlannedStep) -> Resource {
    match step.kind() {
        "generate" | "revise" => match step.declaration.props.get("model") {
            Some(Value::Model(name)) => Resource::Model(name.clone()),
            _ => Resource::None,
        },
        "execute" => Resource::Sandbox,
        "finetune-lora" => Resource::Training,
        _ => Resource::None,
    }
}
