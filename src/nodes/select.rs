use std::collections::BTreeMap;

use crate::data::Verdict;
use crate::dsl::schema::{Artifact, Input, KindSpec, Role, StatusFilter, ValueType, params};
use crate::nodes::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "select",
    role: Role::Step(Artifact::Verdicts),
    doc: "Keeps the verdicts whose status matches `status` (`passed`, `!passed`, or a list such as \
          `failed,error`), then at most `per-task` of them per task (0 keeps all), preferring by \
          `prefer`: `first` (in order), `highest-logprob` (the sample the model found most \
          likely), or `min-edit-distance` (the revision closest to the code it revises; samples \
          without a parent rank by order). Tasks come out in the order they went in. A revision \
          closer (by edit distance) to its task's reference solution than to the error code it \
          revises is a copy of the reference, not a fix of the model's own code; `own-code` says \
          what to do with copies: `prefer` (the default) ranks a task's own-code edits before \
          its copies, so a copy is kept only where no edit of the model's own code passed; \
          `require` drops every copy; `ignore` treats them alike. Samples without a parent, or \
          of tasks without a reference, are never copies. `copies` counts the copies among the \
          verdicts the status kept, and `own-edit-share` is the share of the chosen revisions \
          that are edits of their own error code (what SEED means to learn from).",
    properties: &[FROM.spec, STATUS.spec, PER_TASK.spec, PREFER.spec, OWN_CODE.spec],
    metrics: &["count", "tasks", "copies", "own-edit-share"],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: r#"dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=10
execute "verdicts" code="train"
select "failures" from="verdicts" status="failed,error,timeout" per-task=1 prefer="first"
"#,
};

params! {
    /// The verdicts to choose from.
    FROM: Input = required("from", ValueType::Input(&[Artifact::Verdicts]));
    /// Which statuses to keep.
    STATUS: StatusFilter = optional("status", ValueType::Statuses, r#""passed""#);
    /// Most verdicts kept per task; 0 keeps all.
    PER_TASK: i64 = optional("per-task", ValueType::at_least(0), "1");
    /// Which verdicts of a task to keep first.
    PREFER: Prefer = optional("prefer", ValueType::Choice(Prefer::NAMES), r#""first""#);
    /// What to do with revisions that copy the task's reference rather than edit their own code.
    OWN_CODE: OwnCode = optional("own-code", ValueType::Choice(OwnCode::NAMES), r#""prefer""#);
}

crate::choice! {
    /// What `select` does with revisions that copy their task's reference.
    pub enum OwnCode {
        /// A task's own-code edits first, copies only where none passed.
        Prefer = "prefer",
        /// Copies dropped.
        Require = "require",
        /// Copies like any other revision.
        Ignore = "ignore",
    }
}

crate::choice! {
    /// Which of a task's verdicts come first.
    pub enum Prefer {
        First = "first",
        HighestLogprob = "highest-logprob",
        MinEditDistance = "min-edit-distance",
    }
}

/// What `select` chose, with the own-code figures it publishes.
pub struct Selection {
    pub chosen: Vec<Verdict>,
    /// Copies of the reference among the verdicts the status filter kept.
    pub copies: usize,
    /// Of the chosen, the revisions judged (their task has a reference) and the own-code edits.
    pub judged: usize,
    pub own_edits: usize,
}

/// Filters and ranks verdicts; pure, so it is tested without a run. Whether a revision is an
/// own-code edit costs two edit distances, so it is judged once per verdict.
pub fn select(
    verdicts: Vec<Verdict>,
    filter: &StatusFilter,
    own_code: OwnCode,
    per_task: usize,
    prefer: Prefer,
) -> Selection {
    let mut order: Vec<String> = vec![];
    let mut by_task: BTreeMap<String, Vec<(Verdict, Option<bool>)>> = BTreeMap::new();
    let mut copies = 0;
    for verdict in verdicts.into_iter().filter(|v| filter.accepts(v.status)) {
        let own = verdict.sample.own_edit();
        if own == Some(false) {
            copies += 1;
            if own_code == OwnCode::Require {
                continue;
            }
        }
        let task = verdict.sample.task_id.clone();
        if !by_task.contains_key(&task) {
            order.push(task.clone());
        }
        by_task.entry(task).or_default().push((verdict, own));
    }
    let mut selection = Selection { chosen: vec![], copies, judged: 0, own_edits: 0 };
    for task in order {
        let mut candidates = by_task.remove(&task).unwrap_or_default();
        // Stable sorts: ties keep their order.
        match prefer {
            Prefer::First => {}
            Prefer::HighestLogprob => {
                candidates.sort_by(|(a, _), (b, _)| {
                    let score = |v: &Verdict| v.sample.logprob.unwrap_or(f64::NEG_INFINITY);
                    score(b).total_cmp(&score(a))
                });
            }
            Prefer::MinEditDistance => {
                candidates.sort_by_cached_key(|(v, _)| {
                    v.sample.parent.as_ref().map_or(0, |p| strsim::levenshtein(&p.code, &v.sample.code))
                });
            }
        }
        if own_code == OwnCode::Prefer {
            candidates.sort_by_key(|(_, own)| *own == Some(false));
        }
        if per_task > 0 {
            candidates.truncate(per_task);
        }
        for (verdict, own) in candidates {
            selection.judged += usize::from(own.is_some());
            selection.own_edits += usize::from(own == Some(true));
            selection.chosen.push(verdict);
        }
    }
    selection
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let verdicts: Vec<Verdict> = ctx.read(&FROM)?;
    let filter = ctx.get(&STATUS)?;
    let prefer = ctx.get(&PREFER)?;
    let per_task = ctx.get(&PER_TASK)? as usize;
    let own_code = ctx.get(&OWN_CODE)?;
    let Selection { chosen, copies, judged, own_edits } = select(verdicts, &filter, own_code, per_task, prefer);
    let tasks = chosen.iter().map(|v| v.sample.task_id.as_str()).collect::<std::collections::BTreeSet<_>>().len();
    let (mut writer, _) = ctx.records()?;
    writer.append(&chosen)?;
    writer.finish()?;
    let mut metrics: crate::store::meta::Metrics = [
        ("count".to_string(), chosen.len() as f64),
        ("tasks".to_string(), tasks as f64),
        ("copies".to_string(), copies as f64),
    ]
    .into();
    if judged > 0 {
        metrics.insert("own-edit-share".into(), own_edits as f64 / judged as f64);
    }
    Ok(Outcome { metrics, gate_failure: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Parent, Sample, Status};

    fn verdict(task: &str, id: &str, status: Status, logprob: f64, code: &str, parent: Option<&str>) -> Verdict {
        Verdict {
            sample: Sample {
                task_id: task.into(),
                task: crate::data::Task::example(task),
                sample_id: id.into(),
                code: code.into(),
                logprob: Some(logprob),
                tokens: None,
                answer: None,
                parent: parent.map(|p| Parent { sample_id: "p".into(), code: p.into() }),
            },
            status,
            feedback: String::new(),
            failed_test: None,
            duration_ms: 0.0,
        }
    }

    fn ids(selection: &Selection) -> Vec<&str> {
        selection.chosen.iter().map(|v| v.sample.sample_id.as_str()).collect()
    }

    #[test]
    fn filters_by_status_and_keeps_task_order() {
        let all = vec![
            verdict("b", "b/0", Status::Failed, -1.0, "", None),
            verdict("a", "a/0", Status::Passed, -1.0, "", None),
            verdict("a", "a/1", Status::Error, -0.5, "", None),
            verdict("b", "b/1", Status::Timeout, -0.1, "", None),
        ];
        let not_passed = StatusFilter { negated: true, statuses: vec![Status::Passed] };
        assert_eq!(ids(&select(all.clone(), &not_passed, OwnCode::Prefer, 0, Prefer::First)), ["b/0", "b/1", "a/1"]);
        let failed_or_error = StatusFilter { negated: false, statuses: vec![Status::Failed, Status::Error] };
        assert_eq!(ids(&select(all.clone(), &failed_or_error, OwnCode::Prefer, 1, Prefer::First)), ["b/0", "a/1"]);
        assert_eq!(ids(&select(all, &not_passed, OwnCode::Prefer, 1, Prefer::HighestLogprob)), ["b/1", "a/1"]);
    }

    #[test]
    fn prefers_the_smallest_fix() {
        let parent = "def f(x):\n    return x + 1\n";
        let all = vec![
            verdict("a", "a/r0", Status::Passed, -0.1, "def f(y):\n    z = y\n    return z * 2\n", Some(parent)),
            verdict("a", "a/r1", Status::Passed, -0.9, "def f(x):\n    return x + 2\n", Some(parent)),
        ];
        let passed = StatusFilter { negated: false, statuses: vec![Status::Passed] };
        assert_eq!(ids(&select(all, &passed, OwnCode::Prefer, 1, Prefer::MinEditDistance)), ["a/r1"]);
    }

    #[test]
    fn copies_of_the_reference_come_last_or_go() {
        let parent = "def f(x):\n    return x + 1\n";
        let reference = "def f(value):\n    result = value * 2\n    return result\n";
        let mut all = vec![
            // A copy of the reference (with its line ends changed), then a small fix.
            verdict("a", "a/r0", Status::Passed, -0.1, &reference.replace('\n', "\r\n"), Some(parent)),
            verdict("a", "a/r1", Status::Passed, -0.9, "def f(x):\n    return x * 2\n", Some(parent)),
            // Only a copy passed for b; c has no parent (a first attempt), so it stays.
            verdict("b", "b/r0", Status::Passed, -0.1, reference, Some(parent)),
            verdict("c", "c/0", Status::Passed, -0.1, reference, None),
        ];
        for v in &mut all {
            v.sample.task.reference = Some(reference.into());
        }
        assert_eq!(
            all.iter().map(|v| v.sample.own_edit()).collect::<Vec<_>>(),
            [Some(false), Some(true), Some(false), None]
        );
        let passed = StatusFilter { negated: false, statuses: vec![Status::Passed] };
        assert_eq!(ids(&select(all.clone(), &passed, OwnCode::Require, 1, Prefer::First)), ["a/r1", "c/0"]);
        // Preferred: b keeps its copy, as nothing else of b passed.
        assert_eq!(ids(&select(all.clone(), &passed, OwnCode::Prefer, 1, Prefer::First)), ["a/r1", "b/r0", "c/0"]);
        assert_eq!(ids(&select(all, &passed, OwnCode::Ignore, 1, Prefer::First)), ["a/r0", "b/r0", "c/0"]);
    }
}
