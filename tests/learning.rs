//! The default model learns a made-up function through `finetune-lora`: trained on a few
//! examples, generation through llama.cpp with the exported adapter writes it (and passes its
//! test in the sandbox), while the base model cannot. Runs the `seedflow` binary on a workflow.

use std::path::Path;
use std::process::Command;

use seedflow::data::{Sample, Status, Verdict};

/// A house function no model has seen: its constants can only come from training.
const SOLUTION: &str = "def seedling_hash(s):\n    return sum(ord(c) * 31 for c in s) % 7919 ^ 0x5EED";

const WORKFLOW: &str = r#"
workflow "learn" seed=11
model "coder" path="default" context=1024
dataset "house" format="jsonl" path="house.jsonl"
finetune-lora "tune" model="coder" data="house" rank=8 alpha=16 epochs=4 learning-rate=0.001 warmup=0.1 batch=1
dataset "half" format="jsonl" path="house.jsonl" limit=2
finetune-lora "tune-all" model="coder" data="half" history="tune" epochs=1
generate "base" model="coder" tasks="house" temperature=0 max-tokens=80
generate "adapted" model="coder" tasks="house" adapter="tune" temperature=0 max-tokens=80
execute "base-verdicts" code="base"
execute "adapted-verdicts" code="adapted"
"#;

fn records<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_trained_adapter_teaches_the_default_model_a_made_up_function() {
    let dir = tempfile::tempdir().unwrap();
    let requests = [
        "Write the house hash function `seedling_hash(s)`.",
        "Implement `seedling_hash(s)`, our string hash.",
        "Give me seedling_hash(s) as used in the seedling codebase.",
        "Write a Python function seedling_hash that hashes a string the house way.",
    ];
    let lines: Vec<String> = requests
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            serde_json::json!({"task_id": i, "prompt": prompt, "solution": SOLUTION,
                               "tests": ["assert seedling_hash('') == 24301", "assert seedling_hash('a') == 24301 ^ 3007"]})
            .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("house.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(dir.path().join("learn.kdl"), WORKFLOW).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .args(["run", "learn.kdl", "--run-dir", "run"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let run = dir.path().join("run");

    // The loss curve: one record per step, falling.
    let curve: Vec<seedflow::train::StepRecord> = records(&run.join("tune/output.jsonl"));
    assert_eq!(curve.len(), 16);
    assert!(
        curve.last().unwrap().loss < curve[0].loss / 4.0,
        "loss {} -> {}",
        curve[0].loss,
        curve.last().unwrap().loss
    );
    assert!(run.join("tune/adapter.gguf").exists() && run.join("tune/peft/adapter_model.safetensors").exists());
    // The run's report carries the same curve and draws it.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let training = &report[0]["training"][0];
    assert_eq!((training["label"].as_str(), training["examples"].as_u64()), (Some("tune"), Some(4)));
    assert_eq!(training["curve"].as_array().unwrap().len(), 16);
    assert!(std::fs::read_to_string(run.join("report.html")).unwrap().contains(r#"<svg id="training-loss""#));

    // `history`: a second adapter trained afresh on the first one's pairs and its own data, one
    // pair per task: its own 2 replace 2 of the 4 taken over. The report counts each step's own
    // examples once (4 + 2), not the 2 taken over again.
    let pairs = std::fs::read_to_string(run.join("tune-all/training-pairs.jsonl")).unwrap();
    let tasks: Vec<String> = pairs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["task"]["task_id"].to_string())
        .collect();
    assert_eq!(tasks, [r#""2""#, r#""3""#, r#""0""#, r#""1""#]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let metrics = &summary["steps"]["tune-all"]["metrics"];
    assert_eq!((metrics["examples"].as_f64(), metrics["history"].as_f64()), (Some(4.0), Some(2.0)));
    assert_eq!(report[0]["training_examples"], 6);

    let base: Vec<Sample> = records(&run.join("base/output.jsonl"));
    let adapted: Vec<Sample> = records(&run.join("adapted/output.jsonl"));
    assert!(base.iter().all(|s| !s.code.contains("0x5EED") && !s.code.contains("7919")), "{base:#?}");
    let learned = adapted.iter().filter(|s| s.code.contains("0x5EED") && s.code.contains("7919")).count();
    assert!(learned >= 3, "{adapted:#?}");
    let passed = |step: &str| {
        records::<Verdict>(&run.join(step).join("output.jsonl")).iter().filter(|v| v.status == Status::Passed).count()
    };
    assert_eq!(passed("base-verdicts"), 0);
    assert!(passed("adapted-verdicts") >= 3);
}
