//! The records steps pass to each other: tasks, samples and verdicts, one JSON object per line.

pub mod formats;
pub mod paired;
pub mod pass_at_k;

use serde::{Deserialize, Serialize};

/// A problem to solve: a requirement, tests, and (usually) a reference solution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub task_id: String,
    /// The requirement, as the prompt shows it.
    pub prompt: String,
    /// The dataset's own solution, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Code run before the tests (imports, helpers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub test_setup: String,
    /// Test statements run one at a time, so a failure names the test (MBPP's asserts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<String>,
    /// A test program run as a whole (HumanEval's `check` function).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_program: Option<String>,
    /// The function under test, where the format names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// How the prompt presents the task: `mbpp` shows the requirement and tests, `requirement`
    /// the requirement alone, `humaneval` a signature to complete.
    pub style: TaskStyle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStyle {
    Mbpp,
    /// The requirement alone: tests are checks, not part of what the model is told (a jsonl
    /// task's default, as a user's model sees it at work).
    Requirement,
    Humaneval,
}

/// The outcome of running a program against its tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passed,
    Failed,
    Error,
    Syntax,
    Timeout,
    Memory,
}

impl Sample {
    /// A task's reference solution as a sample, to run or train on.
    pub fn reference(task: &Task) -> Option<Sample> {
        Some(Sample {
            task_id: task.task_id.clone(),
            sample_id: format!("{}/reference", task.task_id),
            code: task.reference.clone()?,
            task: task.clone(),
            logprob: None,
            tokens: None,
            answer: None,
            parent: None,
        })
    }
}

impl Task {
    /// A task for unit tests.
    #[cfg(test)]
    pub fn example(id: &str) -> Task {
        Task {
            task_id: id.into(),
            prompt: format!("Solve {id}."),
            reference: None,
            test_setup: String::new(),
            tests: vec!["assert True".into()],
            test_program: None,
            entry_point: None,
            style: TaskStyle::Mbpp,
        }
    }
}

/// How alike two programs are, from 0 (nothing in common) to 1 (the same): one minus their edit
/// distance in characters over the longer one's length, with trailing spaces and line-end styles
/// ignored.
pub fn similarity(a: &str, b: &str) -> f64 {
    let tidy = |code: &str| code.lines().map(str::trim_end).collect::<Vec<_>>().join("\n");
    strsim::normalized_levenshtein(tidy(a).trim_end(), tidy(b).trim_end())
}

impl Sample {
    /// For a revision of a task with a reference solution: whether it is an edit of the code it
    /// revises (closer to that than to the reference) rather than a copy of the reference.
    pub fn own_edit(&self) -> Option<bool> {
        let parent = self.parent.as_ref()?;
        let reference = self.task.reference.as_deref()?;
        Some(similarity(&self.code, &parent.code) > similarity(&self.code, reference))
    }

    /// For a revision: whether it is the code it revises again, but for blank lines and
    /// whitespace at line ends — a model that did not act on the feedback.
    pub fn unchanged(&self) -> Option<bool> {
        fn lines(code: &str) -> impl Iterator<Item = &str> {
            code.lines().map(str::trim_end).filter(|l| !l.is_empty())
        }
        Some(lines(&self.code).eq(lines(&self.parent.as_ref()?.code)))
    }
}

/// The seed of one sample, from the workflow's seed, the step, the task (or the sample revised)
/// and the sample's index: the same wherever and whenever it is drawn.
pub fn sample_seed(workflow_seed: u64, step: &str, item: &str, index: usize) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{workflow_seed}\0{step}\0{item}\0{index}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
}

impl Status {
    pub const NAMES: &'static [&'static str] = &["passed", "failed", "error", "syntax", "timeout", "memory"];

    pub fn parse(name: &str) -> Option<Status> {
        Some(match name {
            "passed" => Status::Passed,
            "failed" => Status::Failed,
            "error" => Status::Error,
            "syntax" => Status::Syntax,
            "timeout" => Status::Timeout,
            "memory" => Status::Memory,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Failed => "failed",
            Status::Error => "error",
            Status::Syntax => "syntax",
            Status::Timeout => "timeout",
            Status::Memory => "memory",
        }
    }
}

/// A generated program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub task_id: String,
    /// The task, carried along so every later step has its requirement, tests and reference.
    pub task: Task,
    /// Unique within its step: `<task>/<index>`, or `<parent>/r<index>` for a revision.
    pub sample_id: String,
    pub code: String,
    /// Mean log-probability of the generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    /// The model's whole answer, of which `code` is the extracted program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The sample this one revises, with its code (so a revision can be compared to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    pub sample_id: String,
    pub code: String,
}

/// A sample with the result of running it against its task's tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    #[serde(flatten)]
    pub sample: Sample,
    pub status: Status,
    /// What Self-Revise needs: the failing test, the exception and a short traceback.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub feedback: String,
    /// The test that failed, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_test: Option<String>,
    #[serde(default)]
    pub duration_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(code: &str, parent: Option<&str>) -> Sample {
        Sample {
            task_id: "a".into(),
            task: Task::example("a"),
            sample_id: "a/0/r0".into(),
            code: code.into(),
            logprob: None,
            tokens: None,
            answer: None,
            parent: parent.map(|code| Parent { sample_id: "a/0".into(), code: code.into() }),
        }
    }

    #[test]
    fn a_revision_that_changes_only_blank_lines_and_line_ends_is_unchanged() {
        let error = "def f(x):\n    return x + 1\n";
        assert_eq!(revision("def f(x):  \r\n\n    return x + 1", Some(error)).unchanged(), Some(true));
        assert_eq!(revision("def f(x):\n    return x + 2\n", Some(error)).unchanged(), Some(false));
        // Indentation is Python's syntax, so it counts.
        assert_eq!(revision("def f(x):\n  return x + 1\n", Some(error)).unchanged(), Some(false));
        assert_eq!(revision(error, None).unchanged(), None);
    }
}
