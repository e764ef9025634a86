//! The `seedflow` command line. Each subcommand is a function returning the process's exit
//! code: 0 ok, 1 run failed, 2 invalid workflow (or usage), 3 a quality gate failed, 130
//! interrupted. Data goes to stdout; diagnostics and progress to stderr.

mod display;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::dsl::{Code, Problem};
use crate::engine::{self, DryRunLine, RunOptions};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;

#[derive(Parser)]
#[command(name = "seedflow", version, about = "Adapt code LLMs to a new scenario from a handful of examples (SEED)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workflow
    Run(RunArgs),
    /// Check a workflow without running it; exit code 2 and diagnostics when it is invalid
    Check {
        file: PathBuf,
        /// Override a property: `name.property=value`
        #[arg(long = "set", value_name = "NAME.PROPERTY=VALUE")]
        set: Vec<String>,
    },
    /// Print a workflow's step graph
    Graph {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "dot")]
        format: GraphFormat,
        #[arg(long = "set", value_name = "NAME.PROPERTY=VALUE")]
        set: Vec<String>,
    },
    /// Report on runs, side by side: Markdown on stdout; JSON, Markdown and HTML with --out
    Report {
        /// Run directories, as `seedflow run` names them (`runs/<workflow>/<time>`)
        #[arg(required = true, value_name = "RUN_DIR")]
        runs: Vec<PathBuf>,
        /// Write report.json, report.md and report.html into this directory
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Print the language reference (every node kind and property) as Markdown
    Docs,
    /// Fetch a pinned asset into the cache now, rather than on first use
    Fetch {
        #[arg(value_enum)]
        asset: AssetName,
    },
    /// Runs sandboxed programs for `seedflow run`, which starts it (see src/sandbox/worker.rs)
    #[command(hide = true)]
    SandboxWorker { key: String, memory: u64, parent: u32 },
}

#[derive(Clone, Copy, ValueEnum)]
enum AssetName {
    /// The sandbox `execute` runs programs in: CPython for WASI with seedflow's harness,
    /// pre-initialised (built with componentize-py, which pip fetches)
    Python,
    /// A plain CPython 3.12 for WASI, for `SEEDFLOW_PYTHON_WASM` (slower: starts per program)
    PythonWasm,
    /// The default model, Qwen2.5-Coder-0.5B-Instruct (491 MB)
    Model,
    /// The larger built-in model, Qwen2.5-Coder-1.5B-Instruct (1.1 GB; `path="qwen2.5-coder-1.5b"`)
    #[value(name = "model-1.5b")]
    Model1_5b,
    /// llama.cpp's OpenAI-compatible server, built from llama.cpp's source (several minutes), for
    /// trying `model … server=` on this machine and for the server tests
    LlamaServer,
}

#[derive(clap::Args)]
struct RunArgs {
    file: PathBuf,
    /// Where the run's outputs go [default: runs/<workflow>/<timestamp>]
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Continue a run: reuse steps whose inputs and parameters are unchanged, finish unfinished
    /// ones (the newest run of the workflow unless --run-dir is given)
    #[arg(long)]
    resume: bool,
    /// Say what would run and why, and run nothing
    #[arg(long)]
    dry_run: bool,
    /// Override a property: `name.property=value`
    #[arg(long = "set", value_name = "NAME.PROPERTY=VALUE")]
    set: Vec<String>,
    /// Machine-readable output: JSON-lines events on stdout, no progress display (also when CI=true)
    #[arg(long)]
    ci: bool,
    /// Parallel sandbox workers, up to 256 [default: the number of cores]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

pub fn main() -> i32 {
    crate::sandbox::run_workers_from_this_program();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() { EXIT_INVALID } else { EXIT_OK };
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Check { file, set } => check(&file, &set),
        Command::Graph { file, format, set } => graph(&file, format, &set),
        Command::Fetch { asset } => fetch(asset),
        Command::Report { runs, out } => report_runs(&runs, out.as_deref()),
        Command::SandboxWorker { key, memory, parent } => match crate::sandbox::serve_worker(&key, memory, parent) {
            Ok(()) => EXIT_OK,
            Err(error) => {
                eprintln!("seedflow: {error}");
                EXIT_FAILED
            }
        },
        Command::Docs => {
            print!("{}", crate::reference::language_reference());
            EXIT_OK
        }
    }
}

/// The most problems shown: past them a file is not a workflow with mistakes, and each one shown
/// costs a pass over its line.
const MOST_PROBLEMS_SHOWN: usize = 50;

/// Prints problems to stderr, coloured on a terminal unless `NO_COLOR` is set.
fn report(problems: &[Problem]) {
    for problem in problems.iter().take(MOST_PROBLEMS_SHOWN) {
        print_diagnostic(problem);
    }
    if problems.len() > MOST_PROBLEMS_SHOWN {
        eprintln!("{} problems found; the first {MOST_PROBLEMS_SHOWN} are shown", problems.len());
    } else if problems.len() > 1 {
        eprintln!("{} problems found", problems.len());
    }
}

fn check(file: &Path, set: &[String]) -> i32 {
    match crate::load_plan(file, set) {
        Ok(plan) => {
            let steps = plan.all_steps().len();
            let models = plan.models.len();
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            println!("`{}` is valid: {steps} step{}, {models} model{}", plan.name, plural(steps), plural(models));
            EXIT_OK
        }
        Err(problems) => {
            report(&problems);
            EXIT_INVALID
        }
    }
}

fn graph(file: &Path, format: GraphFormat, set: &[String]) -> i32 {
    match crate::load_plan(file, set) {
        Ok(plan) => {
            print!(
                "{}",
                match format {
                    GraphFormat::Dot => crate::plan::to_dot(&plan),
                    GraphFormat::Mermaid => crate::plan::to_mermaid(&plan),
                }
            );
            EXIT_OK
        }
        Err(problems) => {
            report(&problems);
            EXIT_INVALID
        }
    }
}

fn fetch(asset: AssetName) -> i32 {
    let progress = |message: &str| eprintln!("{message}");
    let fetched = match asset {
        // Compiled here too, so the first `execute` starts at once.
        AssetName::Python => crate::sandbox::interpreter(&progress).and_then(|path| {
            progress("compiling the sandbox (once)");
            let memory = crate::nodes::default_limits().map_or(crate::sandbox::LEAST_MEMORY, |l| l.memory);
            match crate::sandbox::Sandbox::new(&path, 1, memory) {
                Ok(_) => Ok(path),
                Err(error) => Err(crate::assets::AssetError::SandboxBuild { stderr: error.to_string() }),
            }
        }),
        AssetName::PythonWasm => crate::assets::ensure(&crate::assets::PYTHON_WASM, &progress),
        AssetName::Model => crate::assets::ensure(&crate::assets::DEFAULT_MODEL, &progress),
        AssetName::Model1_5b => crate::assets::ensure(&crate::assets::CODER_1_5B, &progress),
        AssetName::LlamaServer => crate::assets::llama_server(&progress),
    };
    match fetched {
        Ok(path) => {
            println!("{}", path.display());
            EXIT_OK
        }
        Err(err) => {
            print_diagnostic(&err);
            EXIT_FAILED
        }
    }
}

fn print_diagnostic(err: &dyn miette::Diagnostic) {
    let mut out = String::new();
    let _ = miette::GraphicalReportHandler::new().render_report(&mut out, err);
    eprintln!("{out}");
}

fn report_runs(dirs: &[PathBuf], out: Option<&Path>) -> i32 {
    let runs = match crate::report::read_runs(dirs) {
        Ok(runs) => runs,
        Err(err) => {
            print_diagnostic(&err);
            return EXIT_INVALID;
        }
    };
    match out {
        None => print!("{}", crate::report::markdown(&runs)),
        Some(dir) if dir.exists() && !dir.is_dir() => {
            print_diagnostic(&crate::report::ReportError::OutIsFile(dir.to_path_buf()));
            return EXIT_INVALID;
        }
        Some(dir) => {
            if let Err(err) = crate::report::write(&runs, dir) {
                let path = dir.to_path_buf();
                print_diagnostic(&crate::report::ReportError::Write { path, message: err.to_string() });
                return EXIT_FAILED;
            }
            println!("{}", dir.join("report.html").display());
        }
    }
    EXIT_OK
}

fn is_ci(flag: bool) -> bool {
    flag || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A run directory name from the current time: `20261126T104000Z`.
fn timestamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(['-', ':'], "")
}

/// Picks the run directory, or says why none fits. A new run's directory is created here (not
/// for `--dry-run`), so that two runs started in the same second each get one of their own.
#[allow(clippy::result_large_err)] // built once per run, on the way out
fn run_directory(args: &RunArgs, workflow: &str) -> Result<PathBuf, Problem> {
    let base = Path::new("runs").join(workflow);
    let dir = match (&args.run_dir, args.resume) {
        (Some(dir), _) if dir.exists() && !dir.is_dir() => {
            return Err(Problem::new(Code::RunDirectory, format!("run directory `{}` is a file", dir.display()))
                .with_help("choose another `--run-dir`"));
        }
        // `--resume` continues a run of this workflow only.
        (Some(dir), false) if dir.join("summary.json").exists() => {
            let (whose, help) = match described_run(dir) {
                Some(other) if !run_of(dir, workflow, &args.file) => (other, "choose another `--run-dir`"),
                _ => ("an earlier run".to_string(), "pass `--resume` to continue it, or choose another `--run-dir`"),
            };
            return Err(Problem::new(Code::RunDirectory, format!("run directory `{}` holds {whose}", dir.display()))
                .with_help(help));
        }
        // A step's folder replaces any of the same name: a folder of the user's is no place for a run.
        (Some(dir), _)
            if !dir.join("summary.json").exists()
                && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) =>
        {
            return Err(Problem::new(
                Code::RunDirectory,
                format!("run directory `{}` is not empty and holds no seedflow run", dir.display()),
            )
            .with_help("a run writes a folder per step there, replacing folders of the same names: choose an empty or new `--run-dir`"));
        }
        (Some(dir), _) => dir.clone(),
        (None, false) if args.dry_run => base.join(timestamp()),
        (None, false) => return new_run_directory(&base),
        (None, true) => {
            // The run of this workflow whose summary was written last; other folders are not runs.
            let newest = std::fs::read_dir(&base).ok().and_then(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let written = e.path().join("summary.json").metadata().and_then(|m| m.modified()).ok()?;
                        run_of(&e.path(), workflow, &args.file).then(|| (written, e.path()))
                    })
                    .max()
                    .map(|(_, dir)| dir)
            });
            newest.ok_or_else(|| {
                Problem::new(
                    Code::RunDirectory,
                    format!("there is no earlier run of `{workflow}` under `{}` to resume", base.display()),
                )
                .with_help("run it without `--resume` first, or name the run with `--run-dir`")
            })?
        }
    };
    // Resuming another workflow's run would mix its steps with this one's (and replace them).
    if args.resume
        && let Some(other) = described_run(&dir)
        && !run_of(&dir, workflow, &args.file)
    {
        return Err(Problem::new(
            Code::RunDirectory,
            format!("run directory `{}` holds {other}, not of `{}`", dir.display(), args.file.display()),
        )
        .with_help("resume it with the workflow file that made it, or choose another `--run-dir`"));
    }
    Ok(dir)
}

/// `path` with `folder/..` taken out, to show (`out/../flow.kdl` is `flow.kdl`).
fn tidy(path: &Path) -> PathBuf {
    let mut tidy = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir
                if matches!(tidy.components().next_back(), Some(std::path::Component::Normal(_))) =>
            {
                tidy.pop();
            }
            other => tidy.push(other),
        }
    }
    tidy
}

/// Whose run the folder `dir` holds, if it holds one: the workflow's name and its file as a path
/// from `dir` (absent from runs made before it was recorded).
fn run_in(dir: &Path) -> Option<(String, Option<PathBuf>)> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).ok()?).ok()?;
    let file = summary.get("file").and_then(|f| f.as_str()).map(PathBuf::from);
    Some((summary.get("workflow")?.as_str()?.to_string(), file))
}

/// Whether `dir` holds a run of the workflow named `workflow` in `file` (another copy of the
/// workflow has the same name).
/// "a run of workflow `name` from `file`", for the run in `dir`.
fn described_run(dir: &Path) -> Option<String> {
    let (name, file) = run_in(dir)?;
    let from = file.map(|f| format!(" from `{}`", tidy(&dir.join(f)).display())).unwrap_or_default();
    Some(format!("a run of workflow `{name}`{from}"))
}

fn run_of(dir: &Path, workflow: &str, file: &Path) -> bool {
    run_in(dir).is_some_and(|(name, recorded)| {
        name == workflow && recorded.is_none_or(|recorded| Some(recorded) == crate::engine::path_from(dir, file))
    })
}

/// Creates the run directory if need be and locks it for this process (released when the
/// returned file is dropped, or the process ends): two runs in one directory would interleave
/// their steps' records.
#[allow(clippy::result_large_err)]
fn lock_run_directory(dir: &Path) -> Result<std::fs::File, Problem> {
    let failed = |err: std::io::Error| {
        Problem::new(Code::RunDirectory, format!("cannot use run directory `{}`: {err}", dir.display()))
            .with_help("check that the directory is writable, or choose another with `--run-dir`")
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    let lock = std::fs::File::create(dir.join(crate::store::RUN_LOCK)).map_err(failed)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(in_use(dir)),
        Err(std::fs::TryLockError::Error(err)) => Err(failed(err)),
    }
}

fn in_use(dir: &Path) -> Problem {
    Problem::new(Code::RunDirectory, format!("run directory `{}` is in use by another seedflow run", dir.display()))
        .with_help("wait for that run to end, then `--resume` it; or choose another `--run-dir`")
}

/// Creates `base/<time>`, or `base/<time>-2` and so on when a run started in the same second.
#[allow(clippy::result_large_err)]
fn new_run_directory(base: &Path) -> Result<PathBuf, Problem> {
    let failed = |dir: &Path, err: std::io::Error| {
        Problem::new(Code::RunDirectory, format!("cannot create run directory `{}`: {err}", dir.display()))
            .with_help("check that the directory is writable, or choose another with `--run-dir`")
    };
    std::fs::create_dir_all(base).map_err(|e| failed(base, e))?;
    let time = timestamp();
    let mut n = 1u64;
    loop {
        let dir = base.join(if n == 1 { time.clone() } else { format!("{time}-{n}") });
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(err) => return Err(failed(&dir, err)),
        }
    }
}

fn run(args: RunArgs) -> i32 {
    let ci = is_ci(args.ci);
    // A run refused before it starts; in CI its one event says so, as a run's last one does.
    let refused = |problems: &[Problem]| {
        report(problems);
        if ci {
            let finished = engine::events::Event::RunFinished {
                status: "invalid".into(),
                exit_code: EXIT_INVALID,
                problems: problems.iter().map(crate::dsl::diagnostics::one_line).collect(),
            };
            engine::events::EventSink::emit(&display::JsonLines, &finished);
        }
        EXIT_INVALID
    };
    let plan = match crate::load_plan(&args.file, &args.set) {
        Ok(plan) => Arc::new(plan),
        Err(problems) => return refused(&problems),
    };
    let run_dir = match run_directory(&args, &plan.name) {
        Ok(dir) => dir,
        Err(problem) => return refused(&[problem]),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return EXIT_FAILED;
        }
    };
    // A mistyped `--run-dir` would start afresh unseen, running everything again.
    if args.resume && !run_dir.join("summary.json").exists() {
        eprintln!("no earlier run in `{}` to resume: starting one", run_dir.display());
    }
    if args.dry_run {
        // A dry run looks, and writes nothing.
        if crate::store::run_in_progress(&run_dir) {
            return refused(&[in_use(&run_dir)]);
        }
        let lines = runtime.block_on(engine::dry_run(plan.clone(), &run_dir, args.resume));
        if ci {
            use engine::events::{Event, EventSink};
            for line in lines {
                let DryRunLine { step, iteration, action, reason } = line;
                display::JsonLines.emit(&Event::StepPlanned { step, iteration, action: action.into(), reason });
            }
            display::JsonLines.emit(&Event::RunFinished {
                status: "dry-run".into(),
                exit_code: EXIT_OK,
                problems: vec![],
            });
            return EXIT_OK;
        }
        println!("would run `{}` in `{}`:", plan.name, run_dir.display());
        for line in lines {
            let step = match line.iteration {
                Some(i) => format!("{} (iteration {i})", line.step),
                None => line.step.clone(),
            };
            println!("  {:<7} {step}: {}", line.action, line.reason);
        }
        return EXIT_OK;
    }
    let _lock = match lock_run_directory(&run_dir) {
        Ok(lock) => lock,
        Err(problem) => return refused(&[problem]),
    };
    let workers =
        args.workers.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(256)), usize::from);
    let options = RunOptions { run_dir: run_dir.clone(), resume: args.resume, workers, kinds: crate::nodes::KINDS };
    let sink: Arc<dyn engine::events::EventSink> = if ci {
        Arc::new(display::JsonLines)
    } else if std::io::stderr().is_terminal() {
        Arc::new(display::Progress::new())
    } else {
        Arc::new(display::Plain::new())
    };
    let outcome = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        let stop = stop_requested();
        tokio::spawn(async move {
            stop.await;
            on_signal.cancel();
        });
        engine::run(plan.clone(), options, sink, cancel).await
    });
    // The run's own report beside its summary; a report that cannot be written fails nothing.
    let report = crate::report::read_run(&run_dir).ok();
    let reported = report.as_ref().is_some_and(|r| crate::report::write(std::slice::from_ref(r), &run_dir).is_ok());
    if !ci {
        let comparisons = report.as_ref().map_or(&[][..], |r| &r.comparisons[..]);
        let resume = display::resume_command(&args.file, &args.set, &run_dir);
        display::conclude(&outcome, &resume, &run_dir, reported, comparisons);
    }
    outcome.exit_code()
}

/// Ctrl-C, SIGTERM (what `kill`, container runtimes and CI runners send to stop a job) or SIGPIPE
/// (what reads the run's output went away: `seedflow run --ci | head`): each stops the run the
/// same way, keeping what finished for `--resume`, where SIGPIPE's default would end seedflow
/// with its summary still saying `running`. The handlers are in place once this returns.
fn stop_requested() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let (terminate, closed_pipe) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate()).ok(), signal(SignalKind::pipe()).ok())
    };
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        let ctrl_c = async {
            if ctrl_c.await.is_err() {
                std::future::pending::<()>().await; // no handler could be installed: never
            }
        };
        #[cfg(unix)]
        {
            // A signal whose handler could not be installed never comes.
            let received = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => _ = signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = received(terminate) => {}
                _ = received(closed_pipe) => {}
            }
        }
        #[cfg(not(unix))]
        ctrl_c.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_started_in_the_same_second_get_directories_of_their_own() {
        let base = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..3).map(|_| new_run_directory(base.path()).unwrap()).collect();
        assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
        assert!(dirs[0] != dirs[1] && dirs[1] != dirs[2] && dirs[0] != dirs[2], "{dirs:?}");
    }
}
