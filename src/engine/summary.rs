//! `summary.json`: every step's status and metrics; for loops, per iteration plus the last.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use crate::store::meta::Metrics;

#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    pub status: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    pub metrics: Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub iterations: Vec<BTreeMap<String, StepSummary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<BTreeMap<String, StepSummary>>,
}

impl StepSummary {
    fn with_status(status: &'static str) -> Self {
        StepSummary { status, cached: false, metrics: Metrics::new(), error: None, iterations: vec![], last: None }
    }

    pub fn running() -> Self {
        Self::with_status("running")
    }

    pub fn interrupted() -> Self {
        Self::with_status("interrupted")
    }

    pub fn done(metrics: Metrics, cached: bool) -> Self {
        StepSummary { metrics, cached, ..Self::with_status("done") }
    }

    pub fn failed(error: String) -> Self {
        StepSummary { error: Some(error), ..Self::with_status("failed") }
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub workflow: String,
    /// The workflow file, as a path from the run directory: two copies of a workflow share its
    /// name, and `--resume` must not take one's run for the other's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub status: String,
    pub steps: BTreeMap<String, StepSummary>,
}

impl Summary {
    pub fn new(workflow: &str, file: &Path, run_dir: &Path) -> Self {
        Summary {
            workflow: workflow.to_string(),
            file: path_from(run_dir, file),
            status: "running".into(),
            steps: BTreeMap::new(),
        }
    }

    /// Records a step's state; `within` is the loop and iteration it ran in.
    pub fn record(&mut self, within: Option<(&str, u32)>, step: &str, entry: StepSummary) {
        match within {
            None => match self.steps.get_mut(step) {
                // A loop finishing keeps its iterations.
                Some(existing) if !existing.iterations.is_empty() => {
                    existing.status = entry.status;
                    existing.error = entry.error;
                }
                _ => {
                    self.steps.insert(step.to_string(), entry);
                }
            },
            Some((loop_name, iteration)) => {
                let holder = self.steps.entry(loop_name.to_string()).or_insert_with(StepSummary::running);
                let index = iteration.saturating_sub(1) as usize;
                if holder.iterations.len() <= index {
                    holder.iterations.resize_with(index + 1, BTreeMap::new);
                }
                holder.iterations[index].insert(step.to_string(), entry);
                holder.last = Some(holder.iterations[index].clone());
            }
        }
    }
}

/// `file` as a path from the folder `dir` (`../../flows/seed.kdl`), both resolved first: it stays
/// the same when a checkout moves together with its runs.
pub fn path_from(dir: &Path, file: &Path) -> Option<PathBuf> {
    let (dir, file) = (dir.canonicalize().ok()?, file.canonicalize().ok()?);
    let common = dir.components().zip(file.components()).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = dir.components().skip(common).map(|_| Component::ParentDir).collect();
    path.extend(file.components().skip(common));
    Some(path)
}
