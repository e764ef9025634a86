//! Every reference solution shipped passes its own tests in the sandbox, through the `execute`
//! step as users run it: MBPP's 974 and the result-envelope scenario's 240 made from them.

use std::process::Command;

#[test]
fn all_shipped_reference_solutions_pass_in_the_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let mut workflow = String::from("workflow \"references\"\n");
    let splits = [
        ("prompt", "mbpp", "mbpp/prompt.jsonl"),
        ("test", "mbpp", "mbpp/test.jsonl"),
        ("validation", "mbpp", "mbpp/validation.jsonl"),
        ("train", "mbpp", "mbpp/train.jsonl"),
        ("envelope-train", "jsonl", "result-envelope/train.jsonl"),
        ("envelope-test", "jsonl", "result-envelope/test.jsonl"),
    ];
    for (split, format, file) in splits {
        let path = data.join(file);
        workflow.push_str(&format!("dataset \"{split}\" format=\"{format}\" path={:?}\n", path.display().to_string()));
        workflow.push_str(&format!("execute \"run-{split}\" code=\"{split}\" timeout=\"120s\"\n"));
        workflow.push_str(&format!("gate \"all-{split}\" metric=\"run-{split}.pass-rate\" at-least=1.0\n"));
    }
    std::fs::write(dir.path().join("flow.kdl"), workflow).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .args(["run", "flow.kdl", "--run-dir", "run", "--ci"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut failures = vec![];
    for (split, _, _) in splits {
        let path = dir.path().join(format!("run/run-{split}/output.jsonl"));
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            let verdict: serde_json::Value = serde_json::from_str(line).unwrap();
            if verdict["status"] != "passed" {
                failures.push(format!("{}: {} {}", verdict["sample_id"], verdict["status"], verdict["feedback"]));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let finished = stdout.lines().filter(|l| l.contains("\"event\":\"step-finished\"") && l.contains("run-")).count();
    assert_eq!(finished, splits.len());
}
