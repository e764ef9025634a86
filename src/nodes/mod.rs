//! One file per node kind. Each holds its kind's [`KindSpec`] (the schema, its documentation and
//! an example) and, for steps, the function that runs it; [`KINDS`] registers them all, once.

pub mod context;
mod dataset;
mod execute;
mod finetune_lora;
mod gate;
mod generate;
pub mod loop_until;
pub mod model;
mod report;
pub mod resources;
mod revise;
mod select;
#[cfg(test)]
pub(crate) mod testing;
mod workflow;

pub use execute::default_limits;
pub use report::one_line;

use crate::dsl::schema::{KindSpec, Vocabulary};
use context::{Context, Outcome, StepError};

pub type Runner = fn(&mut Context) -> Result<Outcome, StepError>;

/// One node kind, registered once: what the language knows of it (schema, documentation,
/// example) and, for steps, how it runs and what it holds while it runs.
#[derive(Clone, Copy)]
pub struct Kind {
    pub spec: &'static KindSpec,
    /// `None` for declarations and for `loop-until`, whose body the executor walks itself.
    pub run: Option<Runner>,
    pub holds: Holds,
    /// What a finished step of this kind contributes to a run's report.
    pub reported: Reported,
}

/// A step's part in a run's report (`seedflow report`, the report step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// A row of its metrics, headed by `count`.
    Metrics,
    /// Verdicts: pass@k, the pass rates compared task by task; headed by `pass@1`.
    Evaluation,
    /// A training: examples, the loss curve; headed by `loss`.
    Training,
    /// A quality gate's check.
    Gate,
    /// A report step's comparison with its baseline.
    Comparison,
}

impl Reported {
    /// The kind of a step a run directory's `meta.json` names (`Metrics` for one this seedflow
    /// does not know).
    pub fn of(kind: &str) -> Reported {
        KINDS.iter().find(|k| k.spec.name == kind).map_or(Reported::Metrics, |k| k.reported)
    }

    /// The metric that says the most about such a step, for its column.
    pub fn headline(self) -> &'static str {
        match self {
            Reported::Evaluation => "pass@1",
            Reported::Training => "loss",
            _ => "count",
        }
    }
}

/// What a step holds while it runs, so the executor can bound each kind of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    Nothing,
    /// The decode stream of the model its `model` property names (one per loaded model).
    Model,
    /// Sandbox workers: as many as the run's `--workers`.
    Sandbox,
    /// Every core: one training at a time.
    Training,
}

const fn declaration(spec: &'static KindSpec) -> Kind {
    Kind { spec, run: None, holds: Holds::Nothing, reported: Reported::Metrics }
}

const fn step(spec: &'static KindSpec, run: Runner, holds: Holds, reported: Reported) -> Kind {
    Kind { spec, run: Some(run), holds, reported }
}

/// Every kind of the language, in the order the language reference lists them.
pub static KINDS: &[Kind] = &[
    declaration(&workflow::SPEC),
    declaration(&model::SPEC),
    step(&dataset::SPEC, dataset::run, Holds::Nothing, Reported::Metrics),
    step(&generate::SPEC, generate::run, Holds::Model, Reported::Metrics),
    step(&execute::SPEC, execute::run, Holds::Sandbox, Reported::Evaluation),
    step(&select::SPEC, select::run, Holds::Nothing, Reported::Metrics),
    step(&revise::SPEC, revise::run, Holds::Model, Reported::Metrics),
    step(&finetune_lora::SPEC, finetune_lora::run, Holds::Training, Reported::Training),
    declaration(&loop_until::SPEC),
    step(&report::SPEC, report::run, Holds::Nothing, Reported::Comparison),
    step(&gate::SPEC, gate::run, Holds::Nothing, Reported::Gate),
];

/// The language's node kinds, for the checker and the planner.
pub fn vocabulary() -> Vocabulary {
    vocabulary_of(KINDS)
}

pub fn vocabulary_of(kinds: &[Kind]) -> Vocabulary {
    Vocabulary::new(kinds.iter().map(|k| k.spec))
}
