//! Reports on whole runs, read back from their run directories: what each evaluation scored, how
//! each loop iteration went, how training loss fell, which gates held; one run or several side
//! by side. `seedflow run` writes one for its run; `seedflow report RUN_DIR...` for any runs.
//! As JSON, Markdown, and a self-contained HTML page with its charts drawn as inline SVG.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::data::Verdict;
use crate::data::paired::{self, Paired};
use crate::nodes::Reported;
use crate::store::meta::{Meta, Metrics, StepStatus};
use crate::store::{META, write_atomic};

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ReportError {
    #[error("`{0}` is not a run directory: it has no summary.json")]
    #[diagnostic(
        code(seedflow::not_a_run),
        help("a run directory is what `seedflow run` prints, e.g. `runs/<workflow>/<time>`")
    )]
    NotARun(PathBuf),
    #[error("`{0}` does not exist")]
    #[diagnostic(
        code(seedflow::not_a_run),
        help("a run directory is what `seedflow run` prints, e.g. `runs/<workflow>/<time>`")
    )]
    Missing(PathBuf),
    #[error("`{0}` is given twice")]
    #[diagnostic(
        code(seedflow::same_run),
        help("a report compares different runs, so name each run directory once; one run alone is reported too")
    )]
    Twice(PathBuf),
    #[error("cannot read `{path}`: {message}")]
    #[diagnostic(
        code(seedflow::report_io),
        help("summary.json is written by `seedflow run`; `seedflow run FILE --resume --run-dir DIR` writes it again")
    )]
    Io { path: PathBuf, message: String },
    #[error("`{0}` is a file, and `--out` names a directory")]
    #[diagnostic(
        code(seedflow::report_io),
        help("the report's three files (report.json, report.md, report.html) go into that directory: name another")
    )]
    OutIsFile(PathBuf),
    #[error("cannot write the report into `{path}`: {message}")]
    #[diagnostic(code(seedflow::report_io), help("choose with `--out` a directory you can write to"))]
    Write { path: PathBuf, message: String },
}

/// One run, as read from its directory.
#[derive(Debug, Serialize)]
pub struct Run {
    pub workflow: String,
    pub dir: PathBuf,
    /// `ok`, `failed`, `gate-failed`, `interrupted`, `running` for a run going on now, or
    /// `stopped` for one that ended without a word (killed, or the machine went down).
    pub status: String,
    /// Why a failed run failed: each failed step with its error.
    pub failures: Vec<(String, String)>,
    /// Time during which at least one step was running: steps side by side count once, and a run
    /// resumed in several sittings leaves out the pauses between them (and an interrupted step's
    /// time before it was resumed).
    pub wall_seconds: f64,
    /// Examples the `finetune-lora` steps trained on, over all iterations, each counted in the
    /// step that first trained on it (not again where `history` takes it over).
    pub training_examples: u64,
    /// Top-level `execute` steps: the run's evaluations.
    pub evaluations: Vec<Evaluation>,
    /// Steps whose `meta.json` is there but cannot be read (damaged, or edited by hand): left out
    /// of every figure, and listed so that nobody takes the figures for the whole run.
    pub unreadable: Vec<String>,
    pub loops: Vec<Loop>,
    pub training: Vec<Training>,
    pub gates: Vec<Gate>,
    /// The run's own before -> after comparisons: its `report` steps with a `baseline`.
    pub comparisons: Vec<Comparison>,
}

#[derive(Debug, Serialize)]
pub struct Evaluation {
    pub step: String,
    /// Verdicts (samples) scored.
    pub samples: u64,
    /// `pass@k` for each k the samples allow, and `pass-rate`.
    pub scores: BTreeMap<String, f64>,
    /// Each task's pass@1, for comparing runs task by task (empty if the verdicts are unreadable).
    #[serde(skip)]
    pub pass_rates: BTreeMap<String, f64>,
}

/// Two evaluations of the same tasks, compared task by task.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub label: String,
    #[serde(flatten)]
    pub paired: Paired,
}

#[derive(Debug, Serialize)]
pub struct Loop {
    pub name: String,
    pub iterations: Vec<Iteration>,
}

#[derive(Debug, Serialize)]
pub struct Iteration {
    pub number: u32,
    pub steps: Vec<StepMetrics>,
}

#[derive(Debug, Serialize)]
pub struct StepMetrics {
    pub step: String,
    pub kind: String,
    pub metrics: Metrics,
}

/// One `finetune-lora` step's loss curve.
#[derive(Debug, Serialize)]
pub struct Training {
    /// `tune`, or `adapt.tune #2` inside a loop.
    pub label: String,
    pub examples: u64,
    /// Mean loss over the last epoch.
    pub loss: Option<f64>,
    /// (optimizer step, loss)
    pub curve: Vec<(u64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct Gate {
    pub step: String,
    pub passed: bool,
    /// Whether the check was made: not when the gate's step failed or the run stopped first.
    pub checked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl Gate {
    /// How the report words it: passed, failed (why), or not checked (why).
    fn outcome(&self) -> String {
        match (&self.failure, self.checked) {
            (None, _) => "passed".into(),
            (Some(failure), true) => format!("failed: {failure}"),
            (Some(why), false) => format!("not checked: {why}"),
        }
    }
}

/// The parts of `summary.json` a report needs.
#[derive(serde::Deserialize)]
struct Summary {
    workflow: String,
    status: String,
    steps: BTreeMap<String, SummaryStep>,
}

#[derive(serde::Deserialize)]
struct SummaryStep {
    #[serde(default)]
    iterations: Vec<BTreeMap<String, serde::de::IgnoredAny>>,
    #[serde(default)]
    error: Option<String>,
}

/// The runs in `dirs`, each given once.
pub fn read_runs(dirs: &[PathBuf]) -> Result<Vec<Run>, ReportError> {
    let mut seen = vec![];
    for dir in dirs {
        let same = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if seen.contains(&same) {
            return Err(ReportError::Twice(dir.clone()));
        }
        seen.push(same);
    }
    dirs.iter().map(|dir| read_run(dir)).collect()
}

/// Reads a run back from its directory.
pub fn read_run(dir: &Path) -> Result<Run, ReportError> {
    let path = dir.join("summary.json");
    if !dir.exists() {
        return Err(ReportError::Missing(dir.to_path_buf()));
    }
    if !path.is_file() {
        return Err(ReportError::NotARun(dir.to_path_buf()));
    }
    let io = |message: String| ReportError::Io { path: path.clone(), message };
    let text = std::fs::read_to_string(&path).map_err(|e| io(e.to_string()))?;
    let summary: Summary = serde_json::from_str(&text).map_err(|e| io(e.to_string()))?;

    let mut run = Run {
        workflow: summary.workflow,
        dir: dir.to_path_buf(),
        // A run's summary says `running` from its start: no lock held, it is not.
        status: match summary.status.as_str() {
            "running" if !crate::store::run_in_progress(dir) => "stopped".into(),
            _ => summary.status,
        },
        failures: (summary.steps.iter()).filter_map(|(name, step)| Some((name.clone(), step.error.clone()?))).collect(),
        wall_seconds: 0.0,
        training_examples: 0,
        evaluations: vec![],
        unreadable: vec![],
        loops: vec![],
        training: vec![],
        gates: vec![],
        comparisons: vec![],
    };
    let mut running: Vec<(SystemTime, SystemTime)> = vec![];
    let mut visit = |step_dir: &Path, label: String, run: &mut Run| -> Option<Meta> {
        let Some(meta) = Meta::read(step_dir) else {
            if step_dir.join(META).exists() {
                run.unreadable.push(label);
            }
            return None;
        };
        if let (Some(start), Some(end)) = (time(&meta.started_at), meta.finished_at.as_deref().and_then(time)) {
            running.push((start, end));
        }
        if Reported::of(&meta.parts.kind) == Reported::Training {
            let metric = |name: &str| meta.metrics.get(name).copied().unwrap_or(0.0) as u64;
            let examples = metric("examples");
            // Pairs a step took over from an earlier one (`history`) were counted there.
            run.training_examples = run.training_examples.saturating_add(examples.saturating_sub(metric("history")));
            let loss = meta.metrics.get("loss").copied();
            run.training.push(Training { label, examples, loss, curve: loss_curve(step_dir) });
        }
        Some(meta)
    };
    for (name, step) in &summary.steps {
        if step.iterations.is_empty() {
            let Some(meta) = visit(&dir.join(name), name.clone(), &mut run) else { continue };
            match Reported::of(&meta.parts.kind) {
                Reported::Evaluation => run.evaluations.push(Evaluation {
                    step: name.clone(),
                    samples: meta.metrics.get("count").copied().unwrap_or(0.0) as u64,
                    scores: meta
                        .metrics
                        .iter()
                        .filter(|(k, _)| k.starts_with("pass@") || *k == "pass-rate")
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                    pass_rates: crate::store::read_records::<Verdict>(&dir.join(name).join("output.jsonl"))
                        .map(|verdicts| paired::pass_rates(&verdicts))
                        .unwrap_or_default(),
                }),
                Reported::Gate => run.gates.push(gate(name.clone(), &meta)),
                Reported::Comparison => run.comparisons.extend(baseline_comparison(name, &meta)),
                Reported::Metrics | Reported::Training => {}
            }
            continue;
        }
        let mut iterations = vec![];
        for (index, steps) in step.iterations.iter().enumerate() {
            let number = index as u32 + 1;
            let iteration_dir = dir.join(name).join(format!("iteration-{number}"));
            let mut rows = vec![];
            for inner in steps.keys() {
                let label = format!("{name}.{inner} #{number}");
                if let Some(meta) = visit(&iteration_dir.join(inner), label.clone(), &mut run) {
                    // A gate has no figure of its own: it is listed with the run's gates.
                    if Reported::of(&meta.parts.kind) == Reported::Gate {
                        run.gates.push(gate(label, &meta));
                        continue;
                    }
                    let order = (meta.started_at, meta.finished_at);
                    rows.push((
                        order,
                        StepMetrics { step: inner.clone(), kind: meta.parts.kind, metrics: meta.metrics },
                    ));
                }
            }
            // In the order the steps ran (RFC 3339 times in UTC sort as text).
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            iterations.push(Iteration { number, steps: rows.into_iter().map(|(_, row)| row).collect() });
        }
        run.loops.push(Loop { name: name.clone(), iterations });
    }
    run.wall_seconds = busy_seconds(running);
    Ok(run)
}

/// The comparison a `report` step with a `baseline` made, from its metrics.
fn baseline_comparison(step: &str, meta: &Meta) -> Option<Comparison> {
    let metric = |name: &str| meta.metrics.get(name).copied();
    let title = meta.parts.params.get("title").and_then(|t| t.as_str()).unwrap_or(step);
    Some(Comparison {
        label: format!("{title} ({step}): baseline -> evaluated"),
        paired: Paired {
            // Runs from before `compared` was published compared all their tasks.
            tasks: metric("compared").or(metric("count"))? as usize,
            before: metric("baseline-pass@1")?,
            after: metric("pass@1")?,
            gained: metric("gained")? as usize,
            lost: metric("lost")? as usize,
            p_value: metric("p-value")?,
            ci_low: metric("gain-low")?,
            ci_high: metric("gain-high")?,
        },
    })
}

/// Every before -> after comparison to lead a report with: each run's own, then each later run
/// against the first, on each evaluation step both have.
fn comparisons(runs: &[Run]) -> Vec<(String, Paired)> {
    let labels = labels(runs);
    let mut out: Vec<(String, Paired)> = vec![];
    for (run, label) in runs.iter().zip(&labels) {
        out.extend(run.comparisons.iter().map(|c| (format!("{label}: {}", c.label), c.paired.clone())));
    }
    let Some(first) = runs.first() else { return out };
    for (run, label) in runs.iter().zip(&labels).skip(1) {
        for evaluation in &run.evaluations {
            let Some(base) = first.evaluations.iter().find(|e| e.step == evaluation.step) else { continue };
            if let Some(paired) = paired::compare(&base.pass_rates, &evaluation.pass_rates) {
                out.push((format!("{}: {} -> {label}", evaluation.step, labels[0]), paired));
            }
        }
    }
    out
}

fn comparison_table(comparisons: &[(String, Paired)]) -> Table {
    let points = |v: f64| format!("{:+.1}", v * 100.0);
    let mut table = vec![
        ["comparison", "tasks", "pass@1 before", "pass@1 after", "points", "95% CI", "gained", "lost", "McNemar p"]
            .map(String::from)
            .to_vec(),
    ];
    for (label, p) in comparisons {
        table.push(vec![
            label.clone(),
            p.tasks.to_string(),
            format!("{:.3}", p.before),
            format!("{:.3}", p.after),
            points(p.after - p.before),
            format!("{} to {}", points(p.ci_low), points(p.ci_high)),
            p.gained.to_string(),
            p.lost.to_string(),
            format!("{:.3}", p.p_value),
        ]);
    }
    table
}

/// A gate step's outcome; a gate of a run that stopped before it finished has not passed.
fn gate(step: String, meta: &Meta) -> Gate {
    Gate {
        step,
        passed: meta.status == StepStatus::Done && meta.gate_failure.is_none(),
        checked: meta.status == StepStatus::Done,
        failure: match meta.status {
            StepStatus::Done => meta.gate_failure.clone(),
            StepStatus::Failed => Some(meta.error.clone().unwrap_or_else(|| "the gate step failed".into())),
            StepStatus::Running | StepStatus::Interrupted => Some("the run stopped".into()),
        },
    }
}

fn time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

/// The loss curve a `finetune-lora` step wrote as its output records (none if unreadable).
fn loss_curve(step_dir: &Path) -> Vec<(u64, f64)> {
    crate::store::read_records::<crate::train::StepRecord>(&step_dir.join("output.jsonl"))
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.step as u64, r.loss))
        .collect()
}

fn format_value(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 { format!("{value}") } else { format!("{value:.3}") }
}

fn minutes(seconds: f64) -> String {
    if seconds < 60.0 { format!("{seconds:.0} s") } else { format!("{:.1} min", seconds / 60.0) }
}

/// Every (evaluation step, score) column the runs have, in a stable order.
fn score_columns(runs: &[Run]) -> Vec<(String, String)> {
    let mut columns: Vec<(String, String)> = vec![];
    for run in runs {
        for evaluation in &run.evaluations {
            for score in evaluation.scores.keys().filter(|k| k.starts_with("pass@")) {
                let column = (evaluation.step.clone(), score.clone());
                if !columns.contains(&column) {
                    columns.push(column);
                }
            }
        }
    }
    columns
}

fn score(run: &Run, (step, name): &(String, String)) -> Option<f64> {
    run.evaluations.iter().find(|e| &e.step == step).and_then(|e| e.scores.get(name).copied())
}

/// Relative change of `value` against `base`, as "+12.5%".
fn gain(value: f64, base: f64) -> String {
    if base > 0.0 { format!("{:+.1}%", (value - base) / base * 100.0) } else { "n/a".into() }
}

/// A table as rows of cells; the first row is the header.
type Table = Vec<Vec<String>>;

/// A name for each run: its workflow, with as much of its directory's path as tells it apart
/// where workflows repeat (`seed (A/seed)` and `seed (B/seed)` for two experiments' SEED arms).
fn labels(runs: &[Run]) -> Vec<String> {
    runs.iter()
        .map(|run| {
            let same: Vec<&Path> =
                runs.iter().filter(|r| r.workflow == run.workflow).map(|r| r.dir.as_path()).collect();
            if same.len() == 1 {
                return run.workflow.clone();
            }
            format!("{} ({})", run.workflow, distinct_tail(&run.dir, &same))
        })
        .collect()
}

/// The fewest last components of `dir` that no other path of `all` ends with (all of it if none
/// do).
fn distinct_tail(dir: &Path, all: &[&Path]) -> String {
    let components: Vec<_> = dir.components().collect();
    let tail = |n: usize| components[components.len() - n..].iter().collect::<PathBuf>();
    let n = (1..components.len())
        .find(|&n| all.iter().filter(|other| other.ends_with(tail(n))).count() == 1)
        .unwrap_or(components.len());
    tail(n).display().to_string()
}

/// The runs side by side: one row per run.
fn comparison(runs: &[Run]) -> Table {
    let labels = labels(runs);
    let columns = score_columns(runs);
    let mut header = vec!["run".to_string(), "status".into(), "training samples".into()];
    header.extend(columns.iter().map(|(step, name)| format!("{step} {name}")));
    if runs.len() > 1 {
        header.extend(columns.iter().map(|(step, name)| format!("{step} {name} vs {}", labels[0])));
    }
    header.push("wall time".into());
    let mut table = vec![header];
    for (run, label) in runs.iter().zip(&labels) {
        let mut row = vec![label.clone(), run.status.clone(), run.training_examples.to_string()];
        row.extend(columns.iter().map(|c| score(run, c).map_or("–".into(), |v| format!("{v:.3}"))));
        if runs.len() > 1 {
            row.extend(columns.iter().map(|c| match (score(run, c), score(&runs[0], c)) {
                (Some(value), Some(base)) => gain(value, base),
                _ => "–".into(),
            }));
        }
        row.push(minutes(run.wall_seconds));
        table.push(row);
    }
    table
}

/// One row per loop iteration; a column per step with its headline metric.
fn iteration_table(lp: &Loop) -> Table {
    let mut steps: Vec<(String, &'static str)> = vec![];
    for iteration in &lp.iterations {
        for step in &iteration.steps {
            // A `select` of revisions also shows how many of them edit the model's own code, a
            // `revise` how many revisions left the code as it was.
            let headline = Reported::of(&step.kind).headline();
            let shown = |metric: &&str| *metric == headline || step.metrics.contains_key(*metric);
            for metric in [headline, "own-edit-share", "unchanged"].into_iter().filter(|m| shown(m)) {
                let column = (step.step.clone(), metric);
                if !steps.contains(&column) {
                    steps.push(column);
                }
            }
        }
    }
    let mut header = vec!["iteration".to_string()];
    header.extend(steps.iter().map(|(step, metric)| format!("{step} {metric}")));
    let mut table = vec![header];
    for iteration in &lp.iterations {
        let mut row = vec![iteration.number.to_string()];
        for (name, metric) in &steps {
            let cell = iteration.steps.iter().find(|s| &s.step == name).and_then(|s| s.metrics.get(*metric));
            row.push(cell.map_or("–".into(), |v| format_value(*v)));
        }
        table.push(row);
    }
    table
}

fn training_table(run: &Run) -> Table {
    let mut table = vec![vec![
        "step".to_string(),
        "examples".into(),
        "optimizer steps".into(),
        "first step's loss".into(),
        "last epoch's mean loss".into(),
    ]];
    for t in &run.training {
        let loss = |l: Option<f64>| l.map_or("–".into(), |l| format!("{l:.3}"));
        table.push(vec![
            t.label.clone(),
            t.examples.to_string(),
            t.curve.len().to_string(),
            loss(t.curve.first().map(|(_, l)| *l)),
            loss(t.loss),
        ]);
    }
    table
}

fn markdown_table(out: &mut String, table: &Table) {
    for (i, row) in table.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|cell| markdown_cell(cell)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if i == 0 {
            let _ = writeln!(out, "|{}", "---|".repeat(row.len()));
        }
    }
    out.push('\n');
}

pub fn markdown(runs: &[Run]) -> String {
    let mut out = String::from("# seedflow report\n\n");
    let paired = comparisons(runs);
    if !paired.is_empty() {
        out.push_str("Task by task (flips: tasks one side solved more often; p: exact McNemar):\n\n");
        markdown_table(&mut out, &comparison_table(&paired));
    }
    markdown_table(&mut out, &comparison(runs));
    for run in runs {
        let _ = writeln!(out, "## {} (`{}`)\n", run.workflow, run.dir.display());
        for lp in &run.loops {
            let _ = writeln!(out, "Loop `{}`, by iteration:\n", lp.name);
            markdown_table(&mut out, &iteration_table(lp));
        }
        if !run.training.is_empty() {
            markdown_table(&mut out, &training_table(run));
        }
        for gate in &run.gates {
            let outcome = gate.outcome();
            let emphasis = if gate.passed { outcome } else { format!("**{outcome}**") };
            let _ = writeln!(out, "- gate `{}`: {emphasis}", gate.step);
        }
        for step in &run.unreadable {
            let _ = writeln!(out, "- step `{step}`: **left out**, its `{META}` cannot be read");
        }
        for (step, error) in &run.failures {
            let _ = writeln!(out, "- step `{step}` **failed**: {}", crate::nodes::one_line(error));
        }
        if !run.gates.is_empty() || !run.unreadable.is_empty() || !run.failures.is_empty() {
            out.push('\n');
        }
    }
    out
}

/// Text in one table cell: on one line, its `|` not ending the cell (a report's title is the
/// user's).
fn markdown_cell(text: &str) -> String {
    crate::nodes::one_line(text).replace('|', "\\|")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html_table(out: &mut String, table: &Table) {
    out.push_str("<table>\n");
    for (i, row) in table.iter().enumerate() {
        let cell = if i == 0 { "th" } else { "td" };
        out.push_str("<tr>");
        for value in row {
            let _ = write!(out, "<{cell}>{}</{cell}>", escape(value));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    /// Drawn dashed: a level to compare against rather than a measured curve.
    dashed: bool,
}

const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/// Seconds during which at least one of the intervals ran: the length of their union, so steps
/// that ran side by side count once and the pauses of a run resumed in several sittings not at all.
fn busy_seconds(mut intervals: Vec<(SystemTime, SystemTime)>) -> f64 {
    intervals.sort();
    let mut total = 0.0;
    let mut current: Option<(SystemTime, SystemTime)> = None;
    for (start, end) in intervals {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total += e.duration_since(s).map_or(0.0, |d| d.as_secs_f64());
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    total + current.map_or(0.0, |(s, e)| e.duration_since(s).map_or(0.0, |d| d.as_secs_f64()))
}

/// Tick spacing of 1, 2 or 5 times a power of ten that cuts `span` into about five intervals.
fn tick_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let nice = match raw / power {
        f if f <= 1.0 => 1.0,
        f if f <= 2.0 => 2.0,
        f if f <= 5.0 => 5.0,
        _ => 10.0,
    };
    nice * power
}

/// Whether a point can be drawn: finite, and not so far out (a diverged loss, a hand-edited
/// record) that the axis's round ticks overflow to infinity.
fn plottable(&(x, y): &(f64, f64)) -> bool {
    const LIMIT: f64 = 1e15;
    x.abs() < LIMIT && y.abs() < LIMIT
}

/// A line chart as inline SVG, with axes, ticks and a legend.
fn line_chart(id: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (width, height, left, right, top, bottom) = (640.0, 320.0, 56.0, 16.0, 12.0, 44.0);
    let all = series.iter().flat_map(|s| &s.points).filter(|p| plottable(p));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return String::new();
    }
    if x1 - x0 < 1e-9 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    y0 = y0.min(0.0);
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    // The y axis spans whole ticks of a round step.
    let step = tick_step(y1 - y0);
    (y0, y1) = ((y0 / step).floor() * step, (y1 / step).ceil() * step);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (width - left - right);
    let py = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * (height - top - bottom);
    let mut svg = format!(
        "<svg id=\"{id}\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\">\n"
    );
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        width - left - right,
        height - top - bottom
    );
    let intervals = ((y1 - y0) / step).round() as i32;
    for i in 0..=intervals {
        let y = y0 + step * f64::from(i);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.decimals$}</text>",
            width - right,
            left - 4.0,
            py(y) + 4.0,
            py = py(y)
        );
    }
    // Whole numbers on the x axis (iterations, optimizer steps): every one when few, else five.
    let x_ticks: Vec<f64> = if x1 - x0 <= 8.0 {
        (x0.ceil() as i64..=x1.floor() as i64).map(|x| x as f64).collect()
    } else {
        (0..=4).map(|i| (x0 + (x1 - x0) * f64::from(i) / 4.0).round()).collect()
    };
    for x in x_ticks {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            px(x),
            height - bottom + 16.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text><text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        left + (width - left - right) / 2.0,
        height - 6.0,
        escape(x_label),
        top + (height - top - bottom) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> =
            s.points.iter().filter(|p| plottable(p)).map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let dash = if s.dashed { " stroke-dasharray=\"6 4\"" } else { "" };
        let _ = writeln!(
            svg,
            "<polyline class=\"series\" points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash}><title>{}</title></polyline>",
            points.join(" "),
            escape(&s.name)
        );
        if points.len() <= 12 {
            for p in &points {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(svg, "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{colour}\"/>");
            }
        }
    }
    svg.push_str("</svg>\n<ul class=\"legend\">");
    for (i, s) in series.iter().enumerate() {
        let style = if s.dashed { "dashed" } else { "solid" };
        let _ = write!(
            svg,
            "<li><span style=\"border-top: 3px {style} {}\"></span>{}</li>",
            COLOURS[i % COLOURS.len()],
            escape(&s.name)
        );
    }
    svg.push_str("</ul>\n");
    svg
}

/// The prefix that says which run a series belongs to, when there are several.
fn prefixes(runs: &[Run]) -> Vec<String> {
    let labels = labels(runs);
    labels.into_iter().map(|l| if runs.len() > 1 { format!("{l}: ") } else { String::new() }).collect()
}

/// pass@1 by loop iteration for every `execute` step inside a loop, and each run's evaluations
/// as dashed levels across the same iterations; nothing when no run has a loop.
fn pass_series(runs: &[Run]) -> Vec<Series> {
    let Some(iterations) = runs.iter().flat_map(|r| &r.loops).map(|l| l.iterations.len()).max() else {
        return vec![];
    };
    let mut series = vec![];
    for (run, prefix) in runs.iter().zip(prefixes(runs)) {
        for lp in &run.loops {
            let mut steps: Vec<&str> = vec![];
            for step in
                lp.iterations.iter().flat_map(|i| &i.steps).filter(|s| Reported::of(&s.kind) == Reported::Evaluation)
            {
                if !steps.contains(&step.step.as_str()) {
                    steps.push(&step.step);
                }
            }
            for name in steps {
                let points = lp
                    .iterations
                    .iter()
                    .filter_map(|i| {
                        let step = i.steps.iter().find(|s| s.step == name)?;
                        Some((f64::from(i.number), *step.metrics.get("pass@1")?))
                    })
                    .collect();
                series.push(Series { name: format!("{prefix}{}.{name}", lp.name), points, dashed: false });
            }
        }
        for evaluation in &run.evaluations {
            if let Some(&value) = evaluation.scores.get("pass@1") {
                let points = vec![(1.0, value), (iterations.max(1) as f64, value)];
                series.push(Series { name: format!("{prefix}{} (evaluation)", evaluation.step), points, dashed: true });
            }
        }
    }
    series
}

/// Training loss by optimizer step, one series per `finetune-lora` step.
fn loss_series(runs: &[Run]) -> Vec<Series> {
    let mut series = vec![];
    for (run, prefix) in runs.iter().zip(prefixes(runs)) {
        for training in &run.training {
            let points = training.curve.iter().map(|&(step, loss)| (step as f64, loss)).collect();
            series.push(Series { name: format!("{prefix}{}", training.label), points, dashed: false });
        }
    }
    series
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}\
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}svg text{font-size:11px;fill:#444}\
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1em}.legend span{display:inline-block;width:24px;margin-right:6px;vertical-align:middle}\
.failed{color:#b00}";

pub fn html(runs: &[Run]) -> String {
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>seedflow report: {}</title><style>{STYLE}</style></head><body>\n<h1>seedflow report</h1>\n",
        escape(&runs.iter().map(|r| r.workflow.as_str()).collect::<Vec<_>>().join(", "))
    );
    let paired = comparisons(runs);
    if !paired.is_empty() {
        out.push_str("<p>Task by task (flips: tasks one side solved more often; p: exact McNemar):</p>\n");
        html_table(&mut out, &comparison_table(&paired));
    }
    html_table(&mut out, &comparison(runs));
    let charts = [
        ("pass@1 by iteration", line_chart("pass-at-1", "loop iteration", "pass@1", &pass_series(runs))),
        ("Training loss", line_chart("training-loss", "optimizer step", "loss", &loss_series(runs))),
    ];
    for (heading, chart) in charts.iter().filter(|(_, chart)| !chart.is_empty()) {
        let _ = write!(out, "<h2>{heading}</h2>\n{chart}");
    }
    for run in runs {
        let _ = writeln!(
            out,
            "<h2>{} <small><code>{}</code></small></h2>",
            escape(&run.workflow),
            escape(&run.dir.display().to_string())
        );
        for lp in &run.loops {
            let _ = writeln!(out, "<h3>Loop <code>{}</code>, by iteration</h3>", escape(&lp.name));
            html_table(&mut out, &iteration_table(lp));
        }
        if !run.training.is_empty() {
            out.push_str("<h3>Training</h3>\n");
            html_table(&mut out, &training_table(run));
        }
        for gate in &run.gates {
            let class = if gate.passed { "" } else { " class=\"failed\"" };
            let _ =
                writeln!(out, "<p{class}>gate <code>{}</code>: {}</p>", escape(&gate.step), escape(&gate.outcome()));
        }
        for step in &run.unreadable {
            let _ = writeln!(
                out,
                "<p class=\"failed\">step <code>{}</code>: left out, its <code>{META}</code> cannot be read</p>",
                escape(step)
            );
        }
        for (step, error) in &run.failures {
            let _ =
                writeln!(out, "<p class=\"failed\">step <code>{}</code> failed: {}</p>", escape(step), escape(error));
        }
    }
    out.push_str("</body></html>\n");
    out
}

/// Writes `report.json`, `report.md` and `report.html` into `dir`.
pub fn write(runs: &[Run], dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(runs).map_err(std::io::Error::other)?;
    write_atomic(&dir.join("report.json"), &json)?;
    write_atomic(&dir.join("report.md"), markdown(runs).as_bytes())?;
    write_atomic(&dir.join("report.html"), html(runs).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{Gate, Series, SystemTime, busy_seconds, distinct_tail, line_chart, tick_step};
    use std::path::Path;

    #[test]
    fn runs_of_one_workflow_are_named_by_as_much_of_their_path_as_differs() {
        let (a, b, c) = (Path::new("/x/A/seed"), Path::new("/x/B/seed"), Path::new("/x/B/seed-2"));
        assert_eq!(distinct_tail(a, &[a, b]), "A/seed");
        assert_eq!(distinct_tail(b, &[a, b, c]), "B/seed");
        assert_eq!(distinct_tail(c, &[a, b, c]), "seed-2");
        // The same directory twice: nothing tells them apart, so the whole path.
        assert_eq!(distinct_tail(a, &[a, a]), "/x/A/seed");
    }

    #[test]
    fn a_gate_that_was_not_checked_is_not_called_failed() {
        let gate = |checked, failure: Option<&str>| Gate {
            step: "g".into(),
            passed: failure.is_none(),
            checked,
            failure: failure.map(str::to_string),
        };
        assert_eq!(gate(true, None).outcome(), "passed");
        assert_eq!(gate(true, Some("x = 1 is below 2")).outcome(), "failed: x = 1 is below 2");
        assert_eq!(gate(false, Some("the run stopped")).outcome(), "not checked: the run stopped");
    }

    #[test]
    fn busy_time_counts_overlapping_steps_once_and_leaves_out_pauses() {
        let at = |seconds: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
        // Two steps side by side (0-10, 5-20), a pause, one more step (100-130) inside nothing.
        let intervals = vec![(at(100), at(130)), (at(5), at(20)), (at(0), at(10)), (at(12), at(15))];
        assert_eq!(busy_seconds(intervals), 50.0);
        assert_eq!(busy_seconds(vec![]), 0.0);
    }

    #[test]
    fn ticks_fall_on_round_numbers() {
        for (span, step) in [(1.0, 0.2), (0.6, 0.2), (2.1, 0.5), (37.0, 10.0), (0.03, 0.01)] {
            assert!((tick_step(span) - step).abs() < 1e-12, "span {span}: {} not {step}", tick_step(span));
        }
    }

    #[test]
    fn a_chart_leaves_out_points_too_far_out_to_draw() {
        let points = vec![(1.0, -1.7e308), (2.0, 0.5), (3.0, f64::NAN), (4.0, 0.25)];
        let svg = line_chart("loss", "step", "loss", &[Series { name: "tune".into(), points, dashed: false }]);
        assert!(svg.contains("<polyline") && !svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 2);
    }
}
