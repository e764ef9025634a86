//! What a run reports as it goes. The CLI shows events as a progress display on a terminal or
//! as JSON lines in CI; tests collect them.

use serde::Serialize;

use crate::nodes::context::Reporter;
use crate::store::meta::Metrics;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    RunStarted {
        workflow: String,
        run_dir: String,
    },
    StepStarted {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        reason: String,
    },
    StepProgress {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        done: u64,
        total: u64,
        /// What the step reports beside the count (a training loss).
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<String>,
    },
    StepMessage {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        message: String,
    },
    StepCached {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        metrics: Metrics,
    },
    StepFinished {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        metrics: Metrics,
        seconds: f64,
    },
    StepFailed {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        error: String,
    },
    GateFailed {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        message: String,
    },
    /// What `--dry-run` would do with a step: `run`, `finish`, `cached`, `fail` or `then`.
    StepPlanned {
        step: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        iteration: Option<u32>,
        action: String,
        reason: String,
    },
    IterationFinished {
        step: String,
        iteration: u32,
        stop: bool,
    },
    RunFinished {
        status: String,
        exit_code: i32,
        /// Why a run was refused (`invalid`): each problem on a line, `file:line:column: message [code]`.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        problems: Vec<String>,
    },
}

pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// Keeps every event; for tests and for callers that render at the end.
#[derive(Default)]
pub struct Collect(pub std::sync::Mutex<Vec<Event>>);

impl EventSink for Collect {
    fn emit(&self, event: &Event) {
        if let Ok(mut events) = self.0.lock() {
            events.push(event.clone());
        }
    }
}

impl Collect {
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// A step's progress and messages, as the run's events.
pub struct Forward(pub std::sync::Arc<dyn EventSink>);

impl Reporter for Forward {
    fn progress(&self, step: &str, iteration: Option<u32>, done: u64, total: u64, status: Option<String>) {
        self.0.emit(&Event::StepProgress { step: step.to_string(), iteration, done, total, status });
    }

    fn message(&self, step: &str, iteration: Option<u32>, message: &str) {
        self.0.emit(&Event::StepMessage { step: step.to_string(), iteration, message: message.to_string() });
    }
}
