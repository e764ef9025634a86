//! The step contract: what a step sees while it runs (its parameters, its inputs, its directory,
//! the means to write records, report progress and notice cancellation) and what it returns.
//! The engine builds a [`Context`] for each step it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::resources::Resources;
use crate::choice::Choice;
use crate::dsl::schema::{Artifact, Props, Value};
use crate::store::meta::Metrics;
use crate::store::{self as files, RecordWriter};

/// A finished step's output, as later steps see it.
#[derive(Debug, Clone)]
pub struct Output {
    /// What kind of output it is (a `code` input may be tasks or samples).
    pub artifact: Artifact,
    pub dir: PathBuf,
    pub hash: String,
    pub metrics: Metrics,
}

impl Output {
    pub fn records_path(&self) -> PathBuf {
        self.dir.join(files::RECORDS)
    }
}

/// What a step returns when it succeeds.
#[derive(Debug, Default)]
pub struct Outcome {
    pub metrics: Metrics,
    /// Set by a `gate` whose check failed: the run goes on, and ends with exit code 3.
    pub gate_failure: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("interrupted")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl From<std::io::Error> for StepError {
    fn from(err: std::io::Error) -> Self {
        StepError::Failed(err.to_string())
    }
}

pub struct Context {
    pub step: String,
    pub iteration: Option<u32>,
    pub props: Props,
    /// The declaration of the model the step names with `model=`, if it does.
    pub model: Option<Props>,
    pub seed: u64,
    /// Outputs of the steps this one reads, by property. A `prev.` input is absent in a loop's
    /// first iteration.
    pub inputs: BTreeMap<String, Output>,
    /// The step's own directory; everything it writes goes here.
    pub dir: PathBuf,
    /// Parallel workers the step may use (sandbox runs).
    pub workers: usize,
    /// Keep the complete records of an unfinished earlier run.
    pub finish_partial: bool,
    pub cancel: CancellationToken,
    pub reporter: Arc<dyn Reporter>,
    /// The run's models, sandbox and sandbox runtime.
    pub resources: Arc<Resources>,
}

/// Where a running step's progress and messages go; the engine forwards them to the run's
/// display.
pub trait Reporter: Send + Sync {
    fn progress(&self, step: &str, iteration: Option<u32>, done: u64, total: u64, status: Option<String>);
    fn message(&self, step: &str, iteration: Option<u32>, message: &str);
}

impl Context {
    /// A property the checker always gives a value: written in the workflow, or its schema's
    /// default (the one place a default is written). Missing only if `name` is not one of the
    /// kind's properties, which `tests/docs.rs` checks for every name a step reads.
    fn given<T>(&self, name: &str, value: Option<T>) -> Result<T, StepError> {
        value.ok_or_else(|| StepError::Failed(format!("`{}` has no property `{name}` with a value", self.step)))
    }

    pub fn value(&self, name: &str) -> Result<&Value, StepError> {
        self.given(name, self.props.get(name))
    }

    pub fn integer(&self, name: &str) -> Result<i64, StepError> {
        self.given(name, self.props.integer(name))
    }

    pub fn number(&self, name: &str) -> Result<f64, StepError> {
        self.given(name, self.props.number(name))
    }

    pub fn flag(&self, name: &str) -> Result<bool, StepError> {
        self.given(name, self.props.boolean(name))
    }

    pub fn text(&self, name: &str) -> Result<&str, StepError> {
        self.given(name, self.props.text(name))
    }

    pub fn choice<T: Choice>(&self, name: &str) -> Result<T, StepError> {
        self.given(name, self.props.text(name).and_then(T::parse))
    }

    pub fn input(&self, property: &str) -> Result<&Output, StepError> {
        self.inputs.get(property).ok_or_else(|| StepError::Failed(format!("input `{property}` is missing")))
    }

    /// The records of an input step.
    pub fn read<T: serde::de::DeserializeOwned>(&self, property: &str) -> Result<Vec<T>, StepError> {
        let path = self.input(property)?.records_path();
        files::read_records(&path).map_err(|e| StepError::Failed(format!("cannot read `{}`: {e}", path.display())))
    }

    /// Opens this step's record file. Returns the records an unfinished earlier run wrote, so a
    /// step can skip what is done.
    pub fn records(&self) -> Result<(RecordWriter, Vec<String>), StepError> {
        Ok(RecordWriter::open(&self.dir, self.finish_partial)?)
    }

    /// Opens this step's record file empty, dropping what an unfinished earlier run wrote: for
    /// steps that start again from the beginning, such as training.
    pub fn fresh_records(&self) -> Result<RecordWriter, StepError> {
        Ok(RecordWriter::open(&self.dir, false)?.0)
    }

    pub fn progress(&self, done: u64, total: u64) {
        self.progress_with(done, total, None);
    }

    /// Progress with a status shown beside the bar, such as the current training loss.
    pub fn progress_with(&self, done: u64, total: u64, status: Option<String>) {
        self.reporter.progress(&self.step, self.iteration, done, total, status);
    }

    /// A line for the user about what the step is doing (fetching an asset, loading a model).
    pub fn message(&self, message: &str) {
        self.reporter.message(&self.step, self.iteration, message);
    }

    /// Returns `Err(Cancelled)` once the run is being stopped; call between batches.
    pub fn check_cancelled(&self) -> Result<(), StepError> {
        if self.cancel.is_cancelled() { Err(StepError::Cancelled) } else { Ok(()) }
    }

    /// Completes once the run is being stopped: for work that can be dropped midway.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}
