use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::data::TaskStyle;
use crate::data::formats::{self, Format};
use crate::dsl::schema::{Artifact, KindSpec, Props, Role, ValueType, params};
use crate::nodes::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "dataset",
    role: Role::Step(Artifact::Tasks),
    doc: "Reads problems from a JSON-lines file: each with a requirement, tests and, usually, a \
          reference solution. Formats: `mbpp` (`text`, `code`, `test_list`, `test_setup_code`), \
          `humaneval` (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`) and \
          `jsonl`, seedflow's own: `task_id` and `prompt` required; `solution`, `setup` and \
          `entry_point` optional; tests as `tests` (a list of statements run one by one) or as \
          `test` (one program checking `entry_point`). `skip` and `limit` take a slice of the file. \
          What the model is shown of a task is the same in `generate` and in `finetune-lora`'s \
          training text: an `mbpp` task shows its requirement and its tests, a `jsonl` task its \
          requirement alone (a user's tests are checks, not part of the prompt the model will \
          see at work), a `humaneval` task its signature and docstring; `show-tests` changes that \
          for `mbpp` and `jsonl` tasks with `tests`. `seedflow check` reads the file too (up to \
          64 MiB), so a wrong `format`, a task given twice or a blank field is said before \
          anything runs.",
    properties: &[FORMAT.spec, PATH.spec, SKIP.spec, LIMIT.spec, SHOW_TESTS.spec],
    metrics: &["count"],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: Some(check_values),
    unkeyed: &[],
    example: r#"dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=20
"#,
};

params! {
    /// How the file's records are laid out.
    FORMAT: Format = required("format", ValueType::Choice(Format::NAMES));
    /// The JSON-lines file, relative to the workflow file; gzipped if its name ends in `.gz`.
    PATH: PathBuf = required("path", ValueType::File);
    /// Records to skip from the start.
    SKIP: i64 = optional("skip", ValueType::at_least(0), "0");
    /// Most records to read after `skip`; 0 reads all.
    LIMIT: i64 = optional("limit", ValueType::at_least(0), "0");
    /// Show a task's `tests` in its prompt: #true by default for `mbpp`, #false for `jsonl`.
    SHOW_TESTS: Option<bool> = unset("show-tests", ValueType::Bool);
}

const BATCH: usize = 256;

/// The file's text: decompressed if it is gzipped (`.gz`; HumanEval ships as `HumanEval.jsonl.gz`).
fn read_text(path: &Path) -> std::io::Result<String> {
    if path.extension().is_none_or(|extension| extension != "gz") {
        return crate::stdlib::read_to_string(path);
    }
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path)?).read_to_string(&mut text)?;
    Ok(text)
}

/// `show-tests` with HumanEval tasks, which it cannot change; and the file's tasks as the step
/// will read them, so a wrong `format`, a task given twice or a `skip` past the end is said
/// before the steps ahead of this one run. (A file too large to read twice is read by the step.)
fn check_values(props: &Props, _model: Option<&Path>) -> Result<(), (&'static str, String)> {
    if props.param(&SHOW_TESTS).flatten().is_some() && props.param(&FORMAT) == Some(Format::Humaneval) {
        let why = "`show-tests` does nothing for `humaneval` tasks (their prompt is the function's signature and \
                   docstring, their test one program): remove it";
        return Err((SHOW_TESTS.name(), why.into()));
    }
    let (Some(format), Some(path), Some(skip), Some(limit)) =
        (props.param(&FORMAT), props.param(&PATH), props.param(&SKIP), props.param(&LIMIT))
    else {
        return Ok(());
    };
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > MOST_CHECKED_BYTES) {
        return Ok(());
    }
    match read_tasks(&path, format, (skip, limit), props.param(&SHOW_TESTS).flatten()) {
        Ok(_) => Ok(()),
        Err(why) => Err((PATH.name(), why)),
    }
}

/// Dataset files up to this size are read when the workflow is checked.
const MOST_CHECKED_BYTES: u64 = 64 << 20;

/// The tasks of the file at `path`, `skip` records on and at most `limit` (0: all) of them.
fn read_tasks(
    path: &Path,
    format: Format,
    (skip, limit): (i64, i64),
    show_tests: Option<bool>,
) -> Result<Vec<crate::data::Task>, String> {
    let (skip, limit) = (skip as usize, if limit == 0 { usize::MAX } else { limit as usize });
    let text = read_text(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    // Editors on Windows start a UTF-8 file with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut tasks = vec![];
    let mut seen = BTreeSet::new();
    let lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).skip(skip).take(limit);
    for (number, line) in lines {
        let mut task =
            formats::parse_line(format, line).map_err(|e| format!("{}:{}: {e}", path.display(), number + 1))?;
        if let (Some(show), TaskStyle::Mbpp | TaskStyle::Requirement) = (show_tests, task.style) {
            task.style = if show { TaskStyle::Mbpp } else { TaskStyle::Requirement };
        }
        if !seen.insert(task.task_id.clone()) {
            return Err(format!("{}:{}: task `{}` appears twice", path.display(), number + 1, task.task_id));
        }
        tasks.push(task);
    }
    if tasks.is_empty() {
        let records = text.lines().filter(|l| !l.trim().is_empty()).count();
        return Err(match records {
            0 => format!("`{}` holds no tasks", path.display()),
            n => format!("`{}` holds {n} tasks, and `skip={skip}` leaves none", path.display()),
        });
    }
    Ok(tasks)
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let window = (ctx.get(&SKIP)?, ctx.get(&LIMIT)?);
    let tasks =
        read_tasks(&ctx.get(&PATH)?, ctx.get(&FORMAT)?, window, ctx.get(&SHOW_TESTS)?).map_err(StepError::Failed)?;
    let (mut writer, kept) = ctx.records()?;
    for (i, batch) in tasks.chunks(BATCH).enumerate() {
        // Batches an unfinished run already wrote are kept as they are.
        if (i + 1) * BATCH <= kept.len() {
            continue;
        }
        ctx.check_cancelled()?;
        writer.append(batch)?;
        ctx.progress(writer.count as u64, tasks.len() as u64);
    }
    writer.finish()?;
    Ok(Outcome { metrics: [("count".to_string(), tasks.len() as f64)].into(), gate_failure: None })
}
