//! How a run shows itself: a progress display on a terminal, plain lines elsewhere, JSON lines
//! in CI.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::engine::RunOutcome;
use crate::engine::events::{Event, EventSink};
use crate::store::meta::Metrics;

/// `eprintln!` for a run, which may outlive its reader (`seedflow run 2>&1 | head`): a closed
/// stderr stops the run (SIGPIPE, as Ctrl-C does) and must not panic what is still writing.
macro_rules! say {
    ($($arg:tt)*) => {
        _ = writeln!(std::io::stderr(), $($arg)*)
    };
}

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

/// A line on stderr per event that matters, for logs and pipes. A long step adds a line about
/// once a minute with its count and a rough time left, so a log shows that it is moving.
pub struct Plain {
    every: Duration,
    running: Mutex<BTreeMap<String, Pace>>,
}

/// A running step's first count in this run and when it came (a resumed step starts part-way),
/// for the time left at its pace since; and when its last line was shown.
struct Pace {
    first: Option<(Instant, u64)>,
    last_line: Instant,
}

impl Plain {
    pub fn new() -> Self {
        Self::every(Duration::from_secs(60))
    }

    fn every(every: Duration) -> Self {
        Plain { every, running: Mutex::new(BTreeMap::new()) }
    }

    fn line(&self, event: &Event) -> Option<String> {
        let mut running = self.running.lock().ok()?;
        Some(match event {
            Event::RunStarted { workflow, run_dir } => {
                format!("running `{workflow}` in `{run_dir}`")
            }
            Event::StepMessage { step, iteration, message } => {
                format!("  note    {}: {message}", label(step, *iteration))
            }
            Event::StepStarted { step, iteration, reason } => {
                running.insert(label(step, *iteration), Pace { first: None, last_line: Instant::now() });
                format!("  start   {}: {reason}", label(step, *iteration))
            }
            Event::StepProgress { step, iteration, done, total, status } => {
                let pace = running.get_mut(&label(step, *iteration))?;
                let now = Instant::now();
                let (since, first) = *pace.first.get_or_insert((now, *done));
                if now - pace.last_line < self.every || done >= total {
                    return None;
                }
                pace.last_line = now;
                let mut line = format!("  running {}: {done}/{total}", label(step, *iteration));
                if *done > first {
                    let left = (now - since).mul_f64((total - done) as f64 / (done - first) as f64);
                    line.push_str(&format!(", {} left", about(left)));
                }
                if let Some(status) = status {
                    line.push_str(&format!(", {status}"));
                }
                line
            }
            Event::StepCached { step, iteration, metrics } => {
                format!("  cached  {} {}", label(step, *iteration), show_metrics(metrics))
            }
            Event::StepFinished { step, iteration, metrics, seconds } => {
                running.remove(&label(step, *iteration));
                format!("  done    {} in {seconds:.1}s {}", label(step, *iteration), show_metrics(metrics))
            }
            Event::StepFailed { step, iteration, error } => {
                running.remove(&label(step, *iteration));
                format!("  failed  {}: {error}", label(step, *iteration))
            }
            Event::GateFailed { step, iteration, message } => {
                format!("  gate    {} failed: {message}", label(step, *iteration))
            }
            Event::IterationFinished { step, iteration, stop: true } => {
                format!("  loop    {step} stops after iteration {iteration}")
            }
            // A dry run prints its plan as text itself; as events only in CI.
            Event::IterationFinished { .. } | Event::RunFinished { .. } | Event::StepPlanned { .. } => return None,
        })
    }
}

/// A duration as a person estimates one.
fn about(duration: Duration) -> String {
    match duration.as_secs() {
        0..90 => "about a minute".to_string(),
        90..7200 => format!("about {} min", (duration.as_secs_f64() / 60.0).round()),
        _ => format!("about {:.1} h", duration.as_secs_f64() / 3600.0),
    }
}

impl EventSink for Plain {
    fn emit(&self, event: &Event) {
        if let Some(line) = self.line(event) {
            say!("{line}");
        }
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
                bar.enable_steady_tick(Duration::from_millis(120));
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
            Event::GateFailed { step, iteration, message } => {
                let _ = self.bars.println(format!("  gate {} failed: {message}", label(step, *iteration)));
            }
            _ => {}
        }
    }
}

/// The last word of a run on a terminal or in a log.
pub fn conclude(
    outcome: &RunOutcome,
    resume: &str,
    run_dir: &Path,
    reported: bool,
    comparisons: &[crate::report::Comparison],
) {
    // Did adaptation help: each report step's baseline against what it evaluated.
    for comparison in comparisons {
        say!("{}: {}", comparison.label, comparison.paired);
    }
    match outcome {
        RunOutcome::Ok => say!("finished; outputs and summary.json in `{}`", run_dir.display()),
        RunOutcome::Failed(message) => {
            say!("error: {message}");
            say!("  help: fix the cause, then continue with `{resume}`");
        }
        RunOutcome::GateFailed(failures) => {
            for failure in failures {
                say!("gate failed: {failure}");
            }
            say!("finished with failed gates; outputs in `{}`", run_dir.display());
        }
        RunOutcome::Interrupted => say!("interrupted; continue with `{resume}`"),
    }
    if reported && matches!(outcome, RunOutcome::Ok | RunOutcome::GateFailed(_)) {
        say!("report: `{}`", run_dir.join("report.html").display());
    }
}

/// The command that continues a run: with the overrides it was started with, which a resume
/// without them would take as changes (`--set train.path=…` left out reruns on the shipped data).
pub fn resume_command(file: &Path, set: &[String], run_dir: &Path) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./=:@%+,-".contains(c);
    let quote = |word: &str| match word.chars().all(plain) {
        true => word.to_string(),
        false => shlex::try_quote(word).map_or_else(|_| word.to_string(), |quoted| quoted.into_owned()),
    };
    let mut words = vec!["seedflow run".to_string(), quote(&file.to_string_lossy())];
    words.extend(["--resume --run-dir".to_string(), quote(&run_dir.to_string_lossy())]);
    for assignment in set {
        words.extend(["--set".to_string(), quote(assignment)]);
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> Event {
        Event::StepStarted { step: "attempts".into(), iteration: Some(1), reason: "not run before".into() }
    }

    fn progress(done: u64) -> Event {
        Event::StepProgress { step: "attempts".into(), iteration: Some(1), done, total: 500, status: None }
    }

    #[test]
    fn the_command_that_resumes_a_run_repeats_its_overrides_quoted_for_a_shell() {
        let set = ["train.path=my data.jsonl".to_string(), "adapt.max-iterations=2".to_string()];
        assert_eq!(
            resume_command(Path::new("flows/seed.kdl"), &set, Path::new("runs/seed/x")),
            "seedflow run flows/seed.kdl --resume --run-dir runs/seed/x --set 'train.path=my data.jsonl' --set adapt.max-iterations=2"
        );
        assert_eq!(
            resume_command(Path::new("it's.kdl"), &[], Path::new("out")),
            r#"seedflow run "it's.kdl" --resume --run-dir out"#
        );
    }

    #[test]
    fn a_long_step_shows_its_count_and_time_left_in_a_log() {
        let plain = Plain::every(Duration::ZERO);
        assert_eq!(plain.line(&started()).as_deref(), Some("  start   attempts #1: not run before"));
        // The first count is where this run began (a resumed step's is not 0): no pace yet.
        assert_eq!(plain.line(&progress(100)).as_deref(), Some("  running attempts #1: 100/500"));
        assert_eq!(plain.line(&progress(300)).as_deref(), Some("  running attempts #1: 300/500, about a minute left"));
        assert_eq!(plain.line(&progress(500)), None, "the step's own line says when it is done");
        let metrics = Metrics::from([("count".to_string(), 500.0)]);
        let done = Event::StepFinished { step: "attempts".into(), iteration: Some(1), metrics, seconds: 2.0 };
        assert_eq!(plain.line(&done).as_deref(), Some("  done    attempts #1 in 2.0s count=500"));
        assert_eq!(plain.line(&progress(300)), None, "no count for a step that is not running");
    }

    #[test]
    fn a_step_is_shown_at_most_once_a_minute() {
        let plain = Plain::new();
        plain.line(&started());
        assert_eq!(plain.line(&progress(1)), None);
        assert_eq!(plain.line(&progress(2)), None);
    }

    #[test]
    fn time_left_reads_as_a_person_says_it() {
        assert_eq!(about(Duration::from_secs(20)), "about a minute");
        assert_eq!(about(Duration::from_secs(45 * 60 + 10)), "about 45 min");
        assert_eq!(about(Duration::from_secs(3 * 3600 + 360)), "about 3.1 h");
    }
}
