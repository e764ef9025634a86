//! Self-Revise end to end with the real default model, on two tasks of the result-envelope
//! scenario (examples/data/result-envelope): the base model fails them (it does not know the
//! house convention), `revise` writes revisions of its own failing code, and `select` tells the
//! model's own edits from copies of the reference, as its metrics say.

use std::path::Path;
use std::process::Command;

use seedflow::data::{Status, Verdict};

const WORKFLOW: &str = r#"
workflow "revise" seed=5
model "coder" path="default" context=4096
dataset "train" format="jsonl" path="train.jsonl" limit=2
generate "attempts" model="coder" tasks="train" temperature=0 max-tokens=256
execute "verdicts" code="attempts"
select "errors" from="verdicts" status="!passed" per-task=1 prefer="highest-logprob"
revise "revisions" model="coder" errors="errors" samples=3 max-tokens=256
execute "checked" code="revisions"
select "all-passing" from="checked" status="passed" per-task=0 own-code="ignore"
select "own-only" from="checked" status="passed" per-task=0 own-code="require"
select "revised" from="checked" status="passed" per-task=1 prefer="min-edit-distance"
"#;

fn records<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn revisions_edit_the_models_own_failing_code_and_copies_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("examples/data/result-envelope/train.jsonl"), dir.path().join("train.jsonl")).unwrap();
    std::fs::write(dir.path().join("flow.kdl"), WORKFLOW).unwrap();
    let seedflow = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_seedflow"))
            .args(["run", "flow.kdl", "--run-dir", "run"])
            .args(extra)
            .current_dir(dir.path())
            .env_remove("CI")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap()).unwrap();
        summary
    };
    let summary = seedflow(&[]);
    let run = dir.path().join("run");

    // The prompt is the requirement alone: the base model never meets the convention.
    let errors: Vec<Verdict> = records(&run.join("errors/output.jsonl"));
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors.iter().all(|e| !e.sample.code.contains("ok(")), "{errors:#?}");

    // Each error gets its revisions, each linked to the code it revises.
    let checked: Vec<Verdict> = records(&run.join("checked/output.jsonl"));
    assert_eq!(checked.len(), 6);
    for revision in &checked {
        let parent = revision.sample.parent.as_ref().expect("a revision names its parent");
        let error = errors.iter().find(|e| e.sample.sample_id == parent.sample_id).expect("the parent is an error");
        assert_eq!(parent.code, error.sample.code);
        assert!(revision.sample.own_edit().is_some());
    }
    // `revise` counts the revisions that left their error code as it was.
    let unchanged = checked.iter().filter(|v| v.sample.unchanged() == Some(true)).count();
    assert_eq!(summary["steps"]["revisions"]["metrics"]["unchanged"].as_f64(), Some(unchanged as f64));

    // `select`'s own-code choices agree with the revisions' own measure.
    let passing: Vec<&Verdict> = checked.iter().filter(|v| v.status == Status::Passed).collect();
    let own: Vec<&&Verdict> = passing.iter().filter(|v| v.sample.own_edit() == Some(true)).collect();
    let ids = |step: &str| -> Vec<String> {
        records::<Verdict>(&run.join(step).join("output.jsonl")).into_iter().map(|v| v.sample.sample_id).collect()
    };
    assert_eq!(ids("all-passing").len(), passing.len());
    assert_eq!(ids("own-only"), own.iter().map(|v| v.sample.sample_id.clone()).collect::<Vec<_>>());
    let metrics = &summary["steps"]["all-passing"]["metrics"];
    assert_eq!(metrics["copies"].as_f64(), Some((passing.len() - own.len()) as f64));
    let revised = ids("revised");
    let tasks_passing = passing.iter().map(|v| &v.sample.task_id).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(revised.len(), tasks_passing.len());
    // One per task, an own edit wherever a task has one (`own-code="prefer"`, the default).
    if !passing.is_empty() {
        let tasks_own = own.iter().map(|v| &v.sample.task_id).collect::<std::collections::BTreeSet<_>>();
        let share = summary["steps"]["revised"]["metrics"]["own-edit-share"].as_f64().unwrap();
        assert_eq!(share, tasks_own.len() as f64 / tasks_passing.len() as f64);
    }

    // No worked revisions by default; the shipped ones are one property away and reach the
    // prompt (a token of each revision is enough to see them decoded).
    let prompt_tokens =
        |summary: &serde_json::Value| summary["steps"]["revisions"]["metrics"]["prompt-tokens"].as_f64();
    let plain = prompt_tokens(&summary).unwrap();
    let examples = "revisions.examples=std/prompts/revise-examples.jsonl";
    let shown =
        seedflow(&["--resume", "--set", examples, "--set", "revisions.samples=1", "--set", "revisions.max-tokens=1"]);
    let shown = prompt_tokens(&shown).unwrap();
    assert!(shown > plain + 300.0, "{plain} prompt tokens without the worked revisions, {shown} with them");
}
