//! How a run shows itself: a progress display on a terminal, plain lines elsewhere, JSON lines
//! in CI.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::engine::RunOutcome;
use crate::engine::cache::Metrics;
use crate::engine::events::{Event, EventSink};

/// One JSON object per line on stdout; documented in the README.
pub struct JsonLines;

impl EventSink for JsonLines {
    fn emit(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

fn label(step: &str, iteration: Option<u32>) -> String {
    match iteration {
        Some(i) => format!("{step} #{i}"),
        None => step.to_string(),
    }
}

fn show_metrics(metrics: &Metrics) -> String {
    metrics
        .iter()
        .map(|(k, v)| if v.fract() == 0.0 && v.abs() < 1e15 { format!("{k}={v}") } else { format!("{k}={v:.4}") })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A line on stderr per event that matters, for logs and pipes.
pub struct Plain;

impl EventSink for Plain {
    fn emit(&self, event: &Event) {
        let line = match event {
            Event::RunStarted { workflow, run_dir } => {
                format!("running `{workflow}` in `{run_dir}`")
            }
            Event::StepMessage { step, iteration, message } => {
                format!("  note    {}: {message}", label(step, *iteration))
            }
            Event::StepStarted { step, iteration, reason } => {
                format!("  start   {}: {reason}", label(step, *iteration))
            }
            Event::StepCached { step, iteration, metrics } => {
                format!("  cached  {} {}", label(step, *iteration), show_metrics(metrics))
            }
            Event::StepFinished { step, iteration, metrics, seconds } => {
                format!("  done    {} in {seconds:.1}s {}", label(step, *iteration), show_metrics(metrics))
            }
            Event::StepFailed { step, iteration, error } => format!("  failed  {}: {error}", label(step, *iteration)),
            Event::GateFailed { step, message } => format!("  gate    {step} failed: {message}"),
            Event::IterationFinished { step, iteration, stop: true } => {
                format!("  loop    {step} stops after iteration {iteration}")
            }
            Event::StepProgress { .. } | Event::IterationFinished { .. } | Event::RunFinished { .. } => return,
        };
        eprintln!("{line}");
    }
}

/// Progress bars on a terminal: one per running step.
pub struct Progress {
    bars: MultiProgress,
    running: Mutex<BTreeMap<String, ProgressBar>>,
}

impl Progress {
    pub fn new() -> Self {
        Progress { bars: MultiProgress::new(), running: Mutex::new(BTreeMap::new()) }
    }

    fn style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner} {prefix:<24} {bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
    }
}

impl EventSink for Progress {
    fn emit(&self, event: &Event) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        match event {
            Event::StepStarted { step, iteration, .. } => {
                let bar =
                    self.bars.add(ProgressBar::new(0).with_style(Self::style()).with_prefix(label(step, *iteration)));
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                running.insert(label(step, *iteration), bar);
            }
            Event::StepProgress { step, iteration, done, total, status } => {
                if let Some(bar) = running.get(&label(step, *iteration)) {
                    bar.set_length(*total);
                    bar.set_position(*done);
                    if let Some(status) = status {
                        bar.set_message(status.clone());
                    }
                }
            }
            Event::StepFinished { step, iteration, metrics, .. } => {
                if let Some(bar) = running.remove(&label(step, *iteration)) {
                    bar.finish_with_message(show_metrics(metrics));
                }
            }
            Event::StepFailed { step, iteration, error } => match running.remove(&label(step, *iteration)) {
                Some(bar) => bar.abandon_with_message(format!("failed: {error}")),
                None => {
                    let _ = self.bars.println(format!("failed {}: {error}", label(step, *iteration)));
                }
            },
            Event::StepCached { step, iteration, metrics } => {
                let _ = self.bars.println(format!("  cached {} {}", label(step, *iteration), show_metrics(metrics)));
            }
            Event::GateFailed { step, message } => {
                let _ = self.bars.println(format!("  gate {step} failed: {message}"));
            }
            _ => {}
        }
    }
}

/// The last word of a run on a terminal or in a log.
pub fn conclude(outcome: &RunOutcome, file: &Path, run_dir: &Path, reported: bool) {
    match outcome {
        RunOutcome::Ok => eprintln!("finished; outputs and summary.json in `{}`", run_dir.display()),
        RunOutcome::Failed(message) => {
            eprintln!("error: {message}");
            eprintln!(
                "  help: fix the cause, then continue with `seedflow run {} --resume --run-dir {}`",
                file.display(),
                run_dir.display()
            );
        }
        RunOutcome::GateFailed(failures) => {
            for failure in failures {
                eprintln!("gate failed: {failure}");
            }
            eprintln!("finished with failed gates; outputs in `{}`", run_dir.display());
        }
        RunOutcome::Interrupted => {
            eprintln!(
                "interrupted; continue with `seedflow run {} --resume --run-dir {}`",
                file.display(),
                run_dir.display()
            );
        }
    }
    if reported && matches!(outcome, RunOutcome::Ok | RunOutcome::GateFailed(_)) {
        eprintln!("report: `{}`", run_dir.join("report.html").display());
    }
}
