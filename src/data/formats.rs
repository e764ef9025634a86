//! Dataset formats: MBPP, HumanEval, and seedflow's own plain `jsonl`.
//!
//! `jsonl` — one object per line:
//! `{"task_id": "add", "prompt": "Write a function add(a, b).", "solution": "def add(a, b): …",
//!   "tests": ["assert add(1, 2) == 3"], "setup": "import math"}`.
//! `task_id` (string or integer) and `prompt` are required; `solution`, `setup` and
//! `entry_point` are optional; give the tests either as `tests` (statements run one by one) or as
//! `test` (one program, with `entry_point` naming the function it checks, as HumanEval does).
//!
//! Reference solutions are read with `\n` line ends (MBPP's are `\r\n`), so code trained on or
//! compared with them carries no stray carriage returns.

use serde::Deserialize;
use serde_json::Value as Json;

use super::{Task, TaskStyle};

crate::choice! {
    pub enum Format {
        Mbpp = "mbpp",
        Humaneval = "humaneval",
        Jsonl = "jsonl",
    }
}

#[derive(Deserialize)]
struct Mbpp {
    task_id: Json,
    text: String,
    code: Option<String>,
    test_list: Vec<String>,
    #[serde(default)]
    test_setup_code: String,
}

#[derive(Deserialize)]
struct Humaneval {
    task_id: Json,
    prompt: String,
    canonical_solution: Option<String>,
    test: String,
    entry_point: String,
}

#[derive(Deserialize)]
struct Plain {
    task_id: Json,
    prompt: String,
    solution: Option<String>,
    tests: Option<Vec<String>>,
    test: Option<String>,
    #[serde(default)]
    setup: String,
    entry_point: Option<String>,
}

fn id(value: &Json) -> Result<String, String> {
    match value {
        Json::String(s) if !s.is_empty() => Ok(s.clone()),
        Json::Number(n) => Ok(n.to_string()),
        _ => Err("`task_id` must be a non-empty string or a number".into()),
    }
}

/// Code with `\n` line ends.
fn normalise(code: String) -> String {
    if code.contains('\r') { code.replace("\r\n", "\n").replace('\r', "\n") } else { code }
}

/// The fields a record of `format` has, for a message about one that lacks them.
fn fields(format: Format) -> &'static str {
    match format {
        Format::Mbpp => "`task_id`, `text`, `code`, `test_list`",
        Format::Humaneval => "`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`",
        Format::Jsonl => "`task_id`, `prompt`, and `tests` or `test`",
    }
}

/// Parses one line of a dataset file.
pub fn parse_line(format: Format, line: &str) -> Result<Task, String> {
    parse_record(format, line).and_then(|task| not_blank(format, task))
}

/// A task whose requirement, reference solution, a test or its entry point is blank: text that
/// looks given and says nothing (a blank reference would pass every test it is run against).
fn not_blank(format: Format, task: Task) -> Result<Task, String> {
    let (prompt, reference, tests) = match format {
        Format::Mbpp => ("text", "code", "test_list"),
        Format::Humaneval => ("prompt", "canonical_solution", "test"),
        Format::Jsonl => ("prompt", "solution", if task.test_program.is_some() { "test" } else { "tests" }),
    };
    let blank = |text: &str| text.trim().is_empty();
    if blank(&task.prompt) {
        return Err(format!("`{prompt}` is empty: a task needs its requirement"));
    }
    if task.reference.as_deref().is_some_and(blank) {
        return Err(format!("`{reference}` is empty: leave it out for a task without a reference solution"));
    }
    if let Some(n) = task.tests.iter().position(|test| blank(test)) {
        return Err(format!("test {} of `{tests}` is empty", n + 1));
    }
    if task.test_program.as_deref().is_some_and(blank) {
        return Err(format!("`{tests}` is empty: a task needs its test program"));
    }
    if task.entry_point.as_deref().is_some_and(blank) {
        return Err("`entry_point` is empty: name the function the tests call".into());
    }
    Ok(task)
}

fn parse_record(format: Format, line: &str) -> Result<Task, String> {
    if !line.trim_start().starts_with('{') {
        return Err("expected one JSON object on each line".into());
    }
    let error = |e: serde_json::Error| {
        // One line is parsed at a time: serde's position is always on its "line 1".
        let message = e.to_string();
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        let hint = match message.starts_with("missing field") {
            true => format!(" (a `{}` record has {}; is `format` right?)", format.name(), fields(format)),
            false => String::new(),
        };
        format!("{message}, at column {}{hint}", e.column())
    };
    match format {
        Format::Mbpp => {
            let r: Mbpp = serde_json::from_str(line).map_err(error)?;
            if r.test_list.is_empty() {
                return Err("a task needs at least one test in `test_list`".into());
            }
            Ok(Task {
                task_id: id(&r.task_id)?,
                prompt: r.text,
                reference: r.code.map(normalise),
                test_setup: r.test_setup_code,
                tests: r.test_list,
                test_program: None,
                entry_point: None,
                style: TaskStyle::Mbpp,
            })
        }
        Format::Humaneval => {
            let r: Humaneval = serde_json::from_str(line).map_err(error)?;
            // The reference is the prompt and this together: the part alone must say something.
            if r.canonical_solution.as_deref().is_some_and(|body| body.trim().is_empty()) {
                return Err(
                    "`canonical_solution` is empty: leave it out for a task without a reference solution".into()
                );
            }
            Ok(Task {
                task_id: id(&r.task_id)?,
                // HumanEval's solution completes the prompt; the reference is the whole function.
                reference: r.canonical_solution.map(|body| normalise(format!("{}{}", r.prompt, body))),
                prompt: r.prompt,
                test_setup: String::new(),
                tests: vec![],
                test_program: Some(r.test),
                entry_point: Some(r.entry_point),
                style: TaskStyle::Humaneval,
            })
        }
        Format::Jsonl => {
            let r: Plain = serde_json::from_str(line).map_err(error)?;
            match (&r.tests, &r.test) {
                (Some(_), Some(_)) => return Err("a task has either `tests` or `test`, not both".into()),
                (None, None) => {
                    return Err("a task needs `tests` (a list of statements) or `test` (a program)".into());
                }
                (Some(tests), None) if tests.is_empty() => {
                    return Err("`tests` is empty: a task needs at least one test statement".into());
                }
                _ => {}
            }
            if r.test.is_some() && r.entry_point.is_none() {
                return Err("a task with a `test` program needs `entry_point`".into());
            }
            Ok(Task {
                task_id: id(&r.task_id)?,
                prompt: r.prompt,
                reference: r.solution.map(normalise),
                test_setup: r.setup,
                tests: r.tests.unwrap_or_default(),
                style: if r.test.is_some() { TaskStyle::Humaneval } else { TaskStyle::Requirement },
                test_program: r.test,
                entry_point: r.entry_point,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_format() {
        let mbpp = r#"{"text": "Add.", "code": "def add(a,b):\r\n  return a+b", "task_id": 7, "test_setup_code": "", "test_list": ["assert add(1,2)==3"], "challenge_test_list": []}"#;
        let task = parse_line(Format::Mbpp, mbpp).unwrap();
        assert_eq!((task.task_id.as_str(), task.tests.len(), task.style), ("7", 1, TaskStyle::Mbpp));
        assert_eq!(task.reference.as_deref(), Some("def add(a,b):\n  return a+b"));

        let he = r#"{"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n", "test": "def check(c): assert c(1) == 1", "entry_point": "f"}"#;
        let task = parse_line(Format::Humaneval, he).unwrap();
        assert_eq!(task.reference.as_deref(), Some("def f(x):\n    return x\n"));
        assert_eq!(task.entry_point.as_deref(), Some("f"));

        let plain = r#"{"task_id": "a", "prompt": "p", "tests": ["assert True"]}"#;
        assert_eq!(parse_line(Format::Jsonl, plain).unwrap().style, TaskStyle::Requirement);
    }

    #[test]
    fn explains_bad_lines() {
        let error = |format, line| parse_line(format, line).unwrap_err();
        assert!(error(Format::Jsonl, r#"{"task_id": "a", "prompt": "p"}"#).contains("needs `tests`"));
        assert!(error(Format::Jsonl, r#"{"task_id": "a", "prompt": "p", "tests": []}"#).contains("`tests` is empty"));
        // Blank text that looks given.
        for (record, said) in [
            (r#"{"task_id": "a", "prompt": " ", "tests": ["assert True"]}"#, "`prompt` is empty"),
            (r#"{"task_id": "a", "prompt": "p", "solution": "\n", "tests": ["assert True"]}"#, "`solution` is empty"),
            (r#"{"task_id": "a", "prompt": "p", "tests": ["assert True", "  "]}"#, "test 2 of `tests` is empty"),
            (r#"{"task_id": "a", "prompt": "p", "test": "", "entry_point": "f"}"#, "`test` is empty"),
            (
                r#"{"task_id": "a", "prompt": "p", "test": "def check(c): pass", "entry_point": " "}"#,
                "`entry_point` is empty",
            ),
        ] {
            assert!(error(Format::Jsonl, record).contains(said), "{record}: {}", error(Format::Jsonl, record));
        }
        let both = r#"{"task_id": "a", "prompt": "p", "tests": ["assert f(1)"], "test": "def check(c): pass", "entry_point": "f"}"#;
        assert!(error(Format::Jsonl, both).contains("not both"));
        assert!(error(Format::Mbpp, r#"{"task_id": 1, "text": "t", "test_list": []}"#).contains("at least one test"));
        // Which format has which fields, where a record lacks one; the line's own column.
        assert_eq!(
            error(Format::Mbpp, r#"{"task_id": 1}"#),
            "missing field `text`, at column 14 (a `mbpp` record has `task_id`, `text`, `code`, `test_list`; is `format` right?)"
        );
        assert_eq!(error(Format::Jsonl, r#"{"task_id": "a", "pro"#), "EOF while parsing a string, at column 21");
        assert_eq!(error(Format::Jsonl, r#"[{"task_id": "a"}]"#), "expected one JSON object on each line");
        assert!(
            parse_line(Format::Jsonl, r#"{"task_id": null, "prompt": "p", "tests": ["x"]}"#)
                .unwrap_err()
                .contains("task_id")
        );
    }
}
