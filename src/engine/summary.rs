//! `summary.json`: every step's status and metrics; for loops, per iteration plus the last.

use std::collections::BTreeMap;

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
    pub status: String,
    pub steps: BTreeMap<String, StepSummary>,
}

impl Summary {
    pub fn new(workflow: &str) -> Self {
        Summary { workflow: workflow.to_string(), status: "running".into(), steps: BTreeMap::new() }
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
