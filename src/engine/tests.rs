//! Executor tests over the test-only step kinds of `nodes::testing`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::events::{Collect, Event};
use super::{RunOptions, RunOutcome, dry_run, run};
use crate::nodes::testing;

const DATA: &str = r#"{"task_id": "a", "prompt": "p", "tests": ["assert True"]}
{"task_id": "b", "prompt": "q", "tests": ["assert True"]}
"#;

/// Writes `workflow` and a small dataset into a fresh directory and plans it.
fn plan(dir: &Path, workflow: &str, overrides: &[&str]) -> Arc<crate::plan::Plan> {
    std::fs::write(dir.join("data.jsonl"), DATA).unwrap();
    std::fs::write(dir.join("flow.kdl"), workflow).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match load(&dir.join("flow.kdl"), &overrides) {
        Ok(plan) => Arc::new(plan),
        Err(problems) => panic!("{}", crate::dsl::diagnostics::render_plain(&problems, 100)),
    }
}

/// Plans a workflow file with the test-only step kinds.
fn load(file: &Path, overrides: &[String]) -> Result<crate::plan::Plan, Vec<crate::dsl::Problem>> {
    crate::load_plan_with(file, overrides, &crate::nodes::vocabulary_of(&testing::KINDS))
}

fn options(run_dir: &Path, resume: bool) -> RunOptions {
    RunOptions { run_dir: run_dir.to_path_buf(), resume, workers: 2, kinds: &testing::KINDS }
}

async fn run_to_end(plan: Arc<crate::plan::Plan>, run_dir: &Path, resume: bool) -> (RunOutcome, Vec<Event>) {
    let events = Arc::new(Collect::default());
    let outcome = run(plan, options(run_dir, resume), events.clone(), CancellationToken::new()).await;
    (outcome, events.events())
}

/// Every step's records, by path relative to the run directory.
fn outputs(run_dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = vec![];
    let mut stack = vec![run_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "output.jsonl") {
                out.push((path.strip_prefix(run_dir).unwrap().to_path_buf(), std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

const CHAIN: &str = r#"
workflow "chain" seed=5
dataset "tasks" format="jsonl" path="data.jsonl"
test-batches "first" from="tasks" records=12
test-batches "second" from="first" records=6
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_steps_run_at_the_same_time() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = r#"
test-barrier "left" group="meet-1"
test-barrier "right" group="meet-1"
"#;
    let (outcome, events) = run_to_end(plan(dir.path(), workflow, &[]), &dir.path().join("run"), false).await;
    assert_eq!(outcome, RunOutcome::Ok, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_to_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), CHAIN, &[]);

    let whole = dir.path().join("whole");
    assert_eq!(run_to_end(plan.clone(), &whole, false).await.0, RunOutcome::Ok);

    // Kill the second run while `first` is half written: its future is dropped mid-step, as a
    // killed process would leave it (meta.json says running, a partial record file).
    let killed = dir.path().join("killed");
    let stalled_dir = killed.join("first");
    testing::STALL.lock().unwrap().insert(stalled_dir.clone(), 3);
    let events = Arc::new(Collect::default());
    let running = tokio::spawn(run(plan.clone(), options(&killed, false), events, CancellationToken::new()));
    tokio::task::spawn_blocking({
        let stalled_dir = stalled_dir.clone();
        move || testing::wait_stalled(&stalled_dir)
    })
    .await
    .unwrap();
    running.abort();
    let _ = running.await;
    testing::STALL.lock().unwrap().remove(&stalled_dir);
    testing::release_stalled(&stalled_dir);
    let partial = std::fs::read_to_string(stalled_dir.join("output.jsonl.partial")).unwrap();
    assert_eq!(partial.lines().count(), 6, "three batches of two were written before the kill");

    // The dry run says what resuming will do, and why.
    let lines = dry_run(plan.clone(), &killed, true).await;
    let summary: Vec<_> = lines.iter().map(|l| (l.step.as_str(), l.action)).collect();
    assert_eq!(summary, [("tasks", "cached"), ("first", "finish"), ("second", "run")]);
    assert_eq!(lines[1].reason, "an unfinished run left 6 records, which are kept");
    assert_eq!(lines[2].reason, "`first` will run first");

    let (outcome, events) = run_to_end(plan.clone(), &killed, true).await;
    assert_eq!(outcome, RunOutcome::Ok);
    assert!(events.iter().any(|e| matches!(e, Event::StepCached { step, .. } if step == "tasks")));
    assert!(events.iter().any(|e| matches!(e, Event::StepStarted { step, reason, .. } if step == "first" && reason == "finishing an unfinished run")));
    assert_eq!(outputs(&whole), outputs(&killed));
    assert_eq!(outputs(&whole).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_names_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    assert_eq!(run_to_end(plan(dir.path(), CHAIN, &[]), &run_dir, false).await.0, RunOutcome::Ok);

    let unchanged = dry_run(plan(dir.path(), CHAIN, &[]), &run_dir, true).await;
    assert!(unchanged.iter().all(|l| l.action == "cached"), "{unchanged:#?}");

    let changed = dry_run(plan(dir.path(), CHAIN, &["second.records=8"]), &run_dir, true).await;
    assert_eq!(changed[2].reason, "parameter `records` changed: 6 -> 8");

    let reseeded = dry_run(plan(dir.path(), CHAIN, &["workflow.seed=6"]), &run_dir, true).await;
    assert_eq!((reseeded[0].action, reseeded[0].reason.as_str()), ("run", "workflow seed changed: 5 -> 6"));

    // A changed input file is named, and what reads it waits for it.
    std::fs::write(dir.path().join("flow.kdl"), CHAIN).unwrap();
    let mut data = DATA.to_string();
    data.push_str("{\"task_id\": \"c\", \"prompt\": \"r\", \"tests\": [\"assert 1\"]}\n");
    std::fs::write(dir.path().join("data.jsonl"), &data).unwrap();
    let plan = Arc::new(load(&dir.path().join("flow.kdl"), &[]).unwrap());
    let lines = dry_run(plan, &run_dir, true).await;
    assert_eq!((lines[0].action, lines[0].reason.as_str()), ("run", "file of `path` changed"));
    assert_eq!(lines[1].reason, "`tasks` will run first");

    // Editing an output by hand makes the step run again.
    std::fs::write(run_dir.join("second/output.jsonl"), "{}\n").unwrap();
    let lines = dry_run(plan_of(dir.path()), &run_dir, true).await;
    assert!(lines.iter().all(|l| l.action == "run"));

    // A damaged meta.json is named as the reason, not taken for a step never run.
    std::fs::write(run_dir.join("tasks/meta.json"), "{\"key\": ").unwrap();
    let lines = dry_run(plan_of(dir.path()), &run_dir, true).await;
    assert_eq!(lines[0].reason, "its meta.json cannot be read", "{lines:#?}");
}

/// A checkout moved elsewhere, run directory and all, stays cached: the dataset's path enters
/// the key relative to the workflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_checkout_stays_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (here, there) = (dir.path().join("here"), dir.path().join("there"));
    std::fs::create_dir_all(&here).unwrap();
    assert_eq!(run_to_end(plan(&here, CHAIN, &[]), &here.join("run"), false).await.0, RunOutcome::Ok);
    std::fs::rename(&here, &there).unwrap();
    let lines = dry_run(plan_of(&there), &there.join("run"), true).await;
    assert!(lines.iter().all(|l| l.action == "cached"), "{lines:#?}");
}

fn plan_of(dir: &Path) -> Arc<crate::plan::Plan> {
    Arc::new(load(&dir.join("flow.kdl"), &[]).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_cleanly_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(dir.path(), CHAIN, &[]);
    let run_dir = dir.path().join("run");
    let stalled_dir = run_dir.join("first");
    testing::STALL.lock().unwrap().insert(stalled_dir.clone(), 1);
    let cancel = CancellationToken::new();
    let running =
        tokio::spawn(run(plan.clone(), options(&run_dir, false), Arc::new(Collect::default()), cancel.clone()));
    let wait_dir = stalled_dir.clone();
    tokio::task::spawn_blocking(move || testing::wait_stalled(&wait_dir)).await.unwrap();
    cancel.cancel();
    testing::STALL.lock().unwrap().remove(&stalled_dir);
    testing::release_stalled(&stalled_dir);
    assert_eq!(running.await.unwrap(), RunOutcome::Interrupted);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "interrupted");
    assert_eq!(summary["steps"]["first"]["status"], "interrupted");
    assert!(!run_dir.join("second").exists(), "nothing after the interrupted step started");

    let (outcome, _) = run_to_end(plan, &run_dir, true).await;
    assert_eq!(outcome, RunOutcome::Ok);
    assert_eq!(std::fs::read_to_string(run_dir.join("first/output.jsonl")).unwrap().lines().count(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_carry_outputs_and_stop_on_until() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = r#"
dataset "tasks" format="jsonl" path="data.jsonl"
loop-until "grow" max-iterations=5 until="iteration >= 3" {
    test-batches "step" from="prev.step" records=4
    gate "small" metric="step.count" at-most=3
}
test-batches "after" from="grow.step" records=2
gate "enough" metric="grow.step.count" at-least=5
"#;
    let run_dir = dir.path().join("run");
    let (outcome, events) = run_to_end(plan(dir.path(), workflow, &[]), &run_dir, false).await;
    // A gate in a loop fails in each iteration, and each failure says which.
    let mut expected: Vec<String> =
        (1..=3).map(|i| format!("small (iteration {i}): step.count = 4 is above 3")).collect();
    expected.push("enough: grow.step.count = 4 is below 5".into());
    assert_eq!(outcome, RunOutcome::GateFailed(expected));
    assert_eq!(outcome.exit_code(), 3);
    let iterations: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::IterationFinished { iteration, stop, .. } => Some((*iteration, *stop)),
            _ => None,
        })
        .collect();
    assert_eq!(iterations, [(1, false), (2, false), (3, true)]);
    // Iteration 1 reads no previous output; later ones read the one before.
    let input_of = |i: u32| -> serde_json::Value {
        let text = std::fs::read_to_string(run_dir.join(format!("grow/iteration-{i}/step/output.jsonl"))).unwrap();
        serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).unwrap()["input"].clone()
    };
    assert_eq!(input_of(1), "none");
    assert_ne!(input_of(2), "none");
    assert_ne!(input_of(3), input_of(2));

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "gate-failed");
    assert_eq!(summary["steps"]["grow"]["iterations"].as_array().unwrap().len(), 3);
    assert_eq!(summary["steps"]["grow"]["last"]["step"]["metrics"]["count"], 4.0);
    assert_eq!(summary["steps"]["enough"]["metrics"]["passed"], 0.0);

    // Resuming reuses all three iterations.
    let (_, events) = run_to_end(plan(dir.path(), workflow, &[]), &run_dir, true).await;
    let cached = events.iter().filter(|e| matches!(e, Event::StepCached { .. })).count();
    assert_eq!(cached, 9, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metric_left_out_leaves_until_undecided_and_fails_a_gate() {
    let dir = tempfile::tempdir().unwrap();
    // `step` writes no records, so it publishes no `mean-index`, as training on no examples
    // publishes no loss.
    let workflow = r#"
loop-until "again" max-iterations=3 until="step.mean-index > 1 || step.count > 5" {
    test-batches "step" records=0
}
loop-until "decided" max-iterations=3 until="other.mean-index > 1 || iteration >= 2" {
    test-batches "other" records=0
}
gate "low" metric="again.step.mean-index" at-most=5
gate "as-many" metric="again.step.count" baseline="decided.other.mean-index"
"#;
    let run_dir = dir.path().join("run");
    let (outcome, events) = run_to_end(plan(dir.path(), workflow, &[]), &run_dir, false).await;
    // The run goes on: each gate fails, and says why.
    let unpublished =
        |gate: &str, step: &str| format!("{gate}: `{step}` published no `mean-index`, so the gate cannot pass");
    let mut expected = vec![unpublished("as-many", "decided.other"), unpublished("low", "again.step")];
    expected.sort();
    let RunOutcome::GateFailed(mut failures) = outcome else { panic!("{outcome:?}") };
    failures.sort();
    assert_eq!(failures, expected);
    let iterations = |of: &str| -> Vec<(u32, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::IterationFinished { step, iteration, stop } if step == of => Some((*iteration, *stop)),
                _ => None,
            })
            .collect()
    };
    // Undecided is not `true`: the loop goes on to its last iteration; what is decided without
    // the metric stays decided.
    assert_eq!(iterations("again"), [(1, false), (2, false), (3, false)]);
    assert_eq!(iterations("decided"), [(1, false), (2, true)]);
    let notes: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepMessage { step, message, .. } if step == "again" => Some(message.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert_eq!(
        notes[0],
        "`until` is undecided after iteration 1, so it does not hold: `step` published no `mean-index`"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"]["low"]["metrics"], serde_json::json!({ "passed": 0.0 }), "{summary}");
}

/// Plans `workflow` with `bad.jsonl` holding tasks, then breaks the file (a dataset the checker
/// would refuse), so that its step fails when it runs.
fn broken_after_planning(dir: &Path, workflow: &str) -> Arc<crate::plan::Plan> {
    std::fs::write(dir.join("bad.jsonl"), DATA).unwrap();
    let plan = plan(dir, workflow, &[]);
    std::fs::write(dir.join("bad.jsonl"), "{\"task_id\": 1}\n").unwrap();
    plan
}

/// A failure stops the run at once: the steps running beside it stop (resumable), and no other
/// step or loop iteration starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_stops_the_other_branches() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = r#"
dataset "bad" format="jsonl" path="bad.jsonl"
loop-until "again" max-iterations=3 {
    test-barrier "alone" group="stopped-by-a-failure" parties=2
}
"#;
    let run_dir = dir.path().join("run");
    let started = std::time::Instant::now();
    let (outcome, events) = run_to_end(broken_after_planning(dir.path(), workflow), &run_dir, false).await;
    // Not the barrier's 20 s, alone.
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    let RunOutcome::Failed(message) = outcome else { panic!("{outcome:?}") };
    assert!(message.starts_with("step `bad` failed:"), "{message}");
    let iterations: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepStarted { step, iteration, .. } if step == "alone" => *iteration,
            _ => None,
        })
        .collect();
    assert!(iterations.len() <= 1, "{iterations:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "failed", "{summary}");
    assert_ne!(summary["steps"]["again"]["status"], "done", "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_the_run_and_skips_what_depends_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = r#"
dataset "tasks" format="jsonl" path="bad.jsonl"
test-batches "after" from="tasks"
"#;
    let run_dir = dir.path().join("run");
    let (outcome, _) = run_to_end(broken_after_planning(dir.path(), workflow), &run_dir, false).await;
    let RunOutcome::Failed(message) = outcome else { panic!("{outcome:?}") };
    assert!(message.starts_with("step `tasks` failed:") && message.contains("bad.jsonl:1"), "{message}");
    assert!(!run_dir.join("after").exists());
    let meta = crate::store::meta::Meta::read(&run_dir.join("tasks")).unwrap();
    assert_eq!(meta.status, crate::store::meta::StepStatus::Failed);

    // A loop whose iteration failed says so too (its summary said `running`).
    let in_loop =
        "loop-until \"again\" max-iterations=2 {\n    dataset \"tasks\" format=\"jsonl\" path=\"bad.jsonl\"\n}\n";
    let run_dir = dir.path().join("loop-run");
    let (outcome, _) = run_to_end(broken_after_planning(dir.path(), in_loop), &run_dir, false).await;
    assert!(matches!(outcome, RunOutcome::Failed(_)), "{outcome:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"]["again"]["status"], "failed", "{summary}");
    assert!(
        summary["steps"]["again"]["error"].as_str().unwrap().starts_with("iteration 1: step `tasks` failed"),
        "{summary}"
    );
}

/// A model's threads cannot change what a step makes: changing them reruns nothing. Changing
/// its context does, and the reason names that setting alone.
#[test]
fn model_settings_that_cannot_change_outputs_leave_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.gguf"), b"GGUF").unwrap();
    let parts = |settings: &str| {
        let workflow = format!(
            "model \"m\" path=\"m.gguf\" {settings}\ndataset \"tasks\" format=\"jsonl\" path=\"data.jsonl\"\ngenerate \"g\" model=\"m\" tasks=\"tasks\"\n"
        );
        let plan = plan(dir.path(), &workflow, &[]);
        let (_, generate) = plan.all_steps().into_iter().find(|(_, s)| s.name() == "g").unwrap();
        super::key_parts(&plan, generate, Default::default()).unwrap()
    };
    let before = parts("threads=2");
    assert_eq!(parts("threads=4").key(), before.key());
    let meta = super::cache::tests::meta(before, crate::store::meta::StepStatus::Done);
    assert_eq!(
        super::cache::decide(Some(&meta), &parts("threads=4 context=4096"), Some("out"), false),
        super::cache::Decision::Run(vec!["parameter `model.settings.context` changed: 0 -> 4096".into()])
    );
    // A run from before `threads` left the key recorded it: still cached.
    let mut recorded = meta.clone();
    recorded.parts.params.get_mut("model").unwrap()["settings"]["threads"] = serde_json::json!(2);
    assert_eq!(
        super::cache::decide(Some(&recorded), &parts("threads=4"), Some("out"), false),
        super::cache::Decision::Cached
    );
}

/// Failures side by side are all named; a step stopped because another failed is no
/// interruption of the run's, and a failure outranks one.
#[test]
fn stops_join_and_a_failure_outranks_an_interruption() {
    use super::{Stop, add_stop};
    let failed = |m: &str| Stop::Failed(m.to_string());
    let mut stop = None;
    add_stop(&mut stop, Stop::Interrupted);
    add_stop(&mut stop, failed("a"));
    add_stop(&mut stop, Stop::Interrupted);
    add_stop(&mut stop, failed("b"));
    assert!(matches!(&stop, Some(Stop::Failed(m)) if m == "a; b"), "{stop:?}");
}
