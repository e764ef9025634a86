//! The step contract: what a step sees while it runs (its parameters, its inputs, its directory,
//! the means to write records, report progress and notice cancellation) and what it returns.
//! The engine builds a [`Context`] for each step it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::resources::Resources;
use crate::dsl::schema::{Artifact, FromValue, Input, Param, Props};
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

    /// The step's records.
    pub fn read<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, StepError> {
        let path = self.records_path();
        files::read_records(&path).map_err(|e| StepError::Failed(format!("cannot read `{}`: {e}", path.display())))
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
    /// The name and declaration of the model the step names with `model=`, if it does.
    pub model: Option<(String, Props)>,
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
    /// A property's value: as written in the workflow, its schema default, or `None` for an
    /// `Option` one left unset. Fails only if the kind does not list `param` in its spec.
    pub fn get<T: FromValue>(&self, param: &Param<T>) -> Result<T, StepError> {
        self.props
            .param(param)
            .ok_or_else(|| StepError::Failed(format!("`{}` has no property `{}`", self.step, param.name())))
    }

    /// The output of the step an input property names.
    pub fn input(&self, param: &Param<Input>) -> Result<&Output, StepError> {
        self.inputs.get(param.name()).ok_or_else(|| StepError::Failed(format!("input `{}` is missing", param.name())))
    }

    /// The output of the step an optional input names, if it names one (and, for `prev.`, this
    /// is not the loop's first iteration).
    pub fn optional_input(&self, param: &Param<Option<Input>>) -> Option<&Output> {
        self.inputs.get(param.name())
    }

    /// The records of an input step.
    pub fn read<T: serde::de::DeserializeOwned>(&self, param: &Param<Input>) -> Result<Vec<T>, StepError> {
        self.input(param)?.read()
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
