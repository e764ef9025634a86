//! The `seedflow` binary as users run it: exit codes, stdout and stderr.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn seedflow(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A directory holding a workflow over the house-api example tasks.
fn project(workflow: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("examples/data/house-api.jsonl"), dir.path().join("tasks.jsonl")).unwrap();
    std::fs::write(dir.path().join("flow.kdl"), workflow).unwrap();
    dir
}

const TASKS: &str = r#"
workflow "tasks-only" seed=3
dataset "tasks" format="jsonl" path="tasks.jsonl"
dataset "two" format="jsonl" path="tasks.jsonl" limit=2 show-tests=#true
"#;

#[test]
fn help_lists_the_commands() {
    let out = seedflow(&["--help"], Path::new("."));
    assert_eq!(out.status.code(), Some(0));
    insta::assert_snapshot!("help", text(&out.stdout));
}

/// The sandbox's worker command (hidden; `seedflow run` starts it) loads only what seedflow
/// compiled into its own cache.
#[test]
fn the_sandbox_worker_refuses_a_file_it_did_not_compile() {
    let parent = std::process::id().to_string();
    for key in ["nonsense", "../../../../etc/passwd", "0123456789abcdef-0123456789abcdef"] {
        let out = seedflow(&["sandbox-worker", key, "268435456", &parent], Path::new("."));
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("no compiled interpreter"), "{}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    }
    // Nor does it run for a seedflow that is not its parent.
    let out = seedflow(&["sandbox-worker", "nonsense", "268435456", "1"], Path::new("."));
    assert!(text(&out.stderr).contains("the seedflow that started it has ended"), "{}", text(&out.stderr));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // The reading end closes before seedflow has started, so its first write finds no reader
    // (`seedflow docs | head -1` in a shell).
    let mut child = Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .arg("docs")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(101), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
}

#[test]
fn check_reports_validity_with_exit_codes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = seedflow(&["check", "workflows/seed.kdl"], root);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "`seed` is valid: 16 steps, 1 model\n");

    let out = seedflow(&["check", "tests/fixtures/invalid/unknown-property.kdl"], root);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("seedflow::unknown_property") && stderr.contains("did you mean `temperature`?"),
        "{stderr}"
    );

    // In CI a refused run's one event says why, a line a problem.
    let out = seedflow(&["run", "tests/fixtures/invalid/unknown-property.kdl", "--ci"], root);
    assert_eq!(out.status.code(), Some(2));
    let event: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let first = event["problems"][0].as_str().unwrap_or_default();
    assert!(
        first.starts_with("tests/fixtures/invalid/unknown-property.kdl:")
            && first.ends_with("[seedflow::unknown_property]"),
        "{event}"
    );

    // Continuing the adapter instead of training afresh, as seed.kdl's comment suggests.
    let out = seedflow(&["check", "workflows/seed.kdl", "--set", "adapt.tune.init=prev.tune"], root);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = seedflow(&["check", "workflows/seed.kdl", "--set", "adapt.max-iterations=zero"], root);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`max-iterations` expects an integer from 1 to 10,000"));

    // A value with `=` in it is the value, not a KDL property `key=value` whose value replaced it.
    let out = seedflow(&["check", "workflows/seed.kdl", "--set", "adapt.until=revised.count>=1"], root);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let dir = project(
        "dataset \"tasks\" format=\"jsonl\" path=\"tasks.jsonl\" limit=1\nexecute \"references\" code=\"tasks\"\nreport \"summary\" from=\"references\"\n",
    );
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--set", "summary.title=x=\"y\""], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = std::fs::read_to_string(dir.path().join("out/summary/report.md")).unwrap();
    assert!(report.starts_with("# x=\"y\"\n"), "{report}");
}

#[test]
fn graph_draws_the_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dot = seedflow(&["graph", "workflows/seed.kdl"], root);
    assert_eq!(dot.status.code(), Some(0));
    insta::assert_snapshot!("graph-dot", text(&dot.stdout));
    let mermaid = seedflow(&["graph", "workflows/seed.kdl", "--format", "mermaid"], root);
    insta::assert_snapshot!("graph-mermaid", text(&mermaid.stdout));
}

#[test]
fn run_writes_outputs_and_resumes() {
    let dir = project(TASKS);
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--ci"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.first().unwrap()["event"], "run-started");
    assert_eq!(events.last().unwrap()["event"], "run-finished");
    assert_eq!(events.last().unwrap()["exit_code"], 0);
    assert!(events.iter().any(|e| e["event"] == "step-finished" && e["step"] == "two" && e["metrics"]["count"] == 2.0));

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "ok");
    assert_eq!(summary["steps"]["tasks"]["metrics"]["count"], 3.0);
    assert_eq!(std::fs::read_to_string(dir.path().join("out/two/output.jsonl")).unwrap().lines().count(), 2);
    // A jsonl task's prompt is its requirement alone unless the dataset shows its tests.
    let styles = |step: &str| -> Vec<String> {
        let records = std::fs::read_to_string(dir.path().join(format!("out/{step}/output.jsonl"))).unwrap();
        records.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["style"].to_string()).collect()
    };
    assert_eq!(styles("tasks"), [r#""requirement""#; 3]);
    assert_eq!(styles("two"), [r#""mbpp""#; 2]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/two/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["status"], "done");
    assert_eq!(meta["params"]["limit"], 2);

    // The same directory again needs --resume, so nothing is overwritten by accident.
    let again = seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path());
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("run directory `out` holds an earlier run"));
    // In CI a refused run's one event says so.
    let again = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--ci"], dir.path());
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(
        text(&again.stdout),
        "{\"event\":\"run-finished\",\"status\":\"invalid\",\"exit_code\":2,\"problems\":[\"run directory `out` holds an earlier run [seedflow::run_directory]\"]}\n"
    );

    // A dry run says what the run would: without --resume, that the directory is taken.
    let dry = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--dry-run"], dir.path());
    assert_eq!(dry.status.code(), Some(2));
    assert!(text(&dry.stderr).contains("run directory `out` holds an earlier run"));
    let dry =
        seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume", "--dry-run", "--set", "two.limit=1"], dir.path());
    assert_eq!(dry.status.code(), Some(0));
    assert_eq!(
        text(&dry.stdout),
        "would run `tasks-only` in `out`:\n  cached  tasks: inputs and parameters unchanged\n  run     two: parameter `limit` changed: 2 -> 1\n"
    );
    // In CI the same, as events.
    let dry = seedflow(
        &["run", "flow.kdl", "--run-dir", "out", "--resume", "--dry-run", "--set", "two.limit=1", "--ci"],
        dir.path(),
    );
    assert_eq!(dry.status.code(), Some(0));
    assert_eq!(
        text(&dry.stdout),
        concat!(
            r#"{"event":"step-planned","step":"tasks","action":"cached","reason":"inputs and parameters unchanged"}"#,
            "\n",
            r#"{"event":"step-planned","step":"two","action":"run","reason":"parameter `limit` changed: 2 -> 1"}"#,
            "\n",
            r#"{"event":"run-finished","status":"dry-run","exit_code":0}"#,
            "\n"
        )
    );

    let resumed = seedflow(&["run", "flow.kdl", "--resume"], dir.path());
    // Without --run-dir, --resume takes the newest run under runs/<workflow>/, and there is none.
    assert_eq!(resumed.status.code(), Some(2));
    assert!(text(&resumed.stderr).contains("no earlier run of `tasks-only`"));

    let resumed = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume"], dir.path());
    assert_eq!(resumed.status.code(), Some(0));
    let stderr = text(&resumed.stderr);
    assert!(stderr.contains("cached  tasks") && stderr.contains("cached  two"), "{stderr}");
    assert!(!stderr.contains("no earlier run"), "{stderr}");

    // A --run-dir with no run in it (a typo) to resume: said, then a run starts there.
    let fresh = seedflow(&["run", "flow.kdl", "--run-dir", "out-typo", "--resume"], dir.path());
    assert_eq!(fresh.status.code(), Some(0));
    assert!(text(&fresh.stderr).contains("no earlier run in `out-typo` to resume: starting one"));
}

#[test]
fn default_run_directory_is_per_workflow_and_resumable() {
    let dir = project(TASKS);
    assert_eq!(seedflow(&["run", "flow.kdl"], dir.path()).status.code(), Some(0));
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("runs/tasks-only")).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let resumed = seedflow(&["run", "flow.kdl", "--resume"], dir.path());
    assert_eq!(resumed.status.code(), Some(0));
    assert!(text(&resumed.stderr).contains("cached  tasks"));
}

#[test]
fn a_failed_gate_exits_3_and_ci_mode_comes_from_the_environment() {
    let dir = project(&format!("{TASKS}gate \"enough\" metric=\"tasks.count\" at-least=10\n"));
    let out = Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .args(["run", "flow.kdl", "--run-dir", "out"])
        .current_dir(dir.path())
        .env("CI", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(r#"{"event":"gate-failed","step":"enough","message":"tasks.count = 3 is below 10"}"#),
        "{stdout}"
    );
    assert!(stdout.lines().last().unwrap().contains(r#""status":"gate-failed","exit_code":3"#));
}

/// A run directory is not reused for another workflow's run, nor is a file taken for one.
#[test]
fn resume_refuses_another_workflow_s_run_and_a_file() {
    let dir = project(TASKS);
    assert_eq!(seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path()).status.code(), Some(0));
    std::fs::write(dir.path().join("other.kdl"), TASKS.replace("tasks-only", "other")).unwrap();
    let out = seedflow(&["run", "other.kdl", "--run-dir", "out", "--resume"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("`out` holds a run of workflow `tasks-only` from `flow.kdl`, not of `other.kdl`"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(dir.path().join("afile"), "").unwrap();
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "afile"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("run directory `afile` is a file"), "{}", text(&out.stderr));
}

#[test]
fn a_failing_step_exits_1_with_the_reason() {
    // Data in another format than the one named is refused before anything runs, where each
    // step reads it.
    let dir = project(
        "dataset \"tasks\" format=\"mbpp\" path=\"tasks.jsonl\"\ndataset \"more\" format=\"mbpp\" path=\"tasks.jsonl\"\n",
    );
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("tasks.jsonl:1: missing field `text`").count(), 2, "{stderr}");
    // A step that fails when it runs: its reason, and how to continue.
    std::fs::write(
        dir.path().join("bare.jsonl"),
        "{\"task_id\": \"a\", \"prompt\": \"p\", \"tests\": [\"assert True\"]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("flow.kdl"),
        "dataset \"tasks\" format=\"jsonl\" path=\"bare.jsonl\"\nexecute \"references\" code=\"tasks\"\n",
    )
    .unwrap();
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(error.contains("step `references` failed: none of the 1 tasks has a reference solution"), "{stderr}");
    assert!(stderr.contains("continue with `seedflow run flow.kdl --resume --run-dir out`"), "{stderr}");
}

/// A run writes a folder per step, replacing folders of the same names: it never takes a
/// folder of the user's, and `--resume` looks only at runs.
#[test]
fn a_run_keeps_out_of_folders_that_are_not_runs() {
    let dir = project(TASKS);
    std::fs::create_dir_all(dir.path().join("mine/tasks")).unwrap();
    std::fs::write(dir.path().join("mine/tasks/notes.txt"), "keep").unwrap();
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "mine"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`mine` is not empty and holds no seedflow run"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("mine/tasks/notes.txt")).unwrap(), "keep");

    assert_eq!(seedflow(&["run", "flow.kdl"], dir.path()).status.code(), Some(0));
    // A newer folder beside the run, and one that sorts after its timestamp: not runs.
    std::fs::create_dir_all(dir.path().join("runs/tasks-only/zzz/tasks")).unwrap();
    std::fs::write(dir.path().join("runs/tasks-only/zzz/tasks/notes.txt"), "keep").unwrap();
    let resumed = seedflow(&["run", "flow.kdl", "--resume"], dir.path());
    assert_eq!(resumed.status.code(), Some(0));
    assert!(text(&resumed.stderr).contains("cached  tasks"), "{}", text(&resumed.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("runs/tasks-only/zzz/tasks/notes.txt")).unwrap(), "keep");

    // `workflow`'s properties can be set where the file has no `workflow` node.
    std::fs::write(dir.path().join("bare.kdl"), "dataset \"tasks\" format=\"jsonl\" path=\"tasks.jsonl\"\n").unwrap();
    let out = seedflow(&["check", "bare.kdl", "--set", "workflow.seed=1"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Two copies of a workflow share its name: `--resume` takes only the runs of its own file.
#[test]
fn resume_takes_only_runs_of_the_same_workflow_file() {
    let dir = project(TASKS);
    std::fs::create_dir(dir.path().join("copy")).unwrap();
    std::fs::copy(dir.path().join("tasks.jsonl"), dir.path().join("copy/tasks.jsonl")).unwrap();
    std::fs::copy(dir.path().join("flow.kdl"), dir.path().join("copy/flow.kdl")).unwrap();
    assert_eq!(seedflow(&["run", "flow.kdl", "--run-dir", "runs/tasks-only/mine"], dir.path()).status.code(), Some(0));
    let other = seedflow(&["run", "copy/flow.kdl", "--resume"], dir.path());
    assert_eq!(other.status.code(), Some(2), "{}", text(&other.stderr));
    assert!(text(&other.stderr).contains("no earlier run of `tasks-only`"), "{}", text(&other.stderr));
    let named = seedflow(&["run", "copy/flow.kdl", "--resume", "--run-dir", "runs/tasks-only/mine"], dir.path());
    assert_eq!(named.status.code(), Some(2));
    assert!(text(&named.stderr).contains("holds a run of workflow `tasks-only` from"), "{}", text(&named.stderr));
    // The run is found again after the project moves as a whole.
    let moved = dir.path().join("moved");
    std::fs::create_dir(&moved).unwrap();
    for name in ["flow.kdl", "tasks.jsonl", "runs"] {
        std::fs::rename(dir.path().join(name), moved.join(name)).unwrap();
    }
    let resumed = seedflow(&["run", "flow.kdl", "--resume"], &moved);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    assert!(text(&resumed.stderr).contains("cached  tasks"), "{}", text(&resumed.stderr));
}

/// A workflow in a folder named `std` reads its own files, not the stdlib's of the same name.
#[test]
fn a_local_std_folder_is_not_the_stdlib() {
    let dir = project("");
    std::fs::create_dir_all(dir.path().join("std/prompts")).unwrap();
    std::fs::copy(dir.path().join("tasks.jsonl"), dir.path().join("std/prompts/revise-examples.jsonl")).unwrap();
    let flow = "dataset \"tasks\" format=\"jsonl\" path=\"prompts/revise-examples.jsonl\"\n";
    std::fs::write(dir.path().join("std/flow.kdl"), flow).unwrap();
    let out = seedflow(&["run", "std/flow.kdl", "--run-dir", "out"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("count=3"), "{}", text(&out.stderr));
}

/// A gzipped dataset (HumanEval ships as `HumanEval.jsonl.gz`) is read decompressed. Running its
/// references says which tasks have none.
#[test]
fn a_gzipped_dataset_is_read() {
    use std::io::Write;
    let dir =
        project("dataset \"tasks\" format=\"jsonl\" path=\"tasks.jsonl.gz\"\nexecute \"references\" code=\"tasks\"\n");
    let without = r#"{"task_id": "bare", "prompt": "Return 1.", "tests": ["assert f() == 1"]}"#;
    let tasks = std::fs::read_to_string(dir.path().join("tasks.jsonl")).unwrap() + without + "\n";
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(tasks.as_bytes()).unwrap();
    std::fs::write(dir.path().join("tasks.jsonl.gz"), gzip.finish().unwrap()).unwrap();
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("count=3 pass-rate=1"), "{}", text(&out.stderr));
    let said = "1 of 4 tasks have no reference solution and are not run: `bare`";
    assert!(text(&out.stderr).contains(said), "{}", text(&out.stderr));
}

/// Past 50 problems a file is not a workflow with mistakes: the first 50 are shown.
#[test]
fn many_problems_are_cut_short() {
    let properties: String = (0..60).map(|i| format!(" unknown-{i}=1")).collect();
    let dir = project(&format!("dataset \"tasks\" format=\"jsonl\" path=\"tasks.jsonl\"{properties}\n"));
    let out = seedflow(&["check", "flow.kdl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("60 problems found; the first 50 are shown"), "{stderr}");
    assert_eq!(stderr.matches("has no property").count(), 50, "{stderr}");
}

/// A partial record file is trusted only as far as its records are, in order, the step's own:
/// a duplicated or foreign line (a file edited, or two writers) is dropped and the rest rerun.
#[test]
fn resume_keeps_only_partial_records_that_match() {
    let dir =
        project("dataset \"tasks\" format=\"jsonl\" path=\"tasks.jsonl\"\nexecute \"references\" code=\"tasks\"\n");
    assert_eq!(seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path()).status.code(), Some(0));
    let step = dir.path().join("out/references");
    let first = std::fs::read_to_string(step.join("output.jsonl")).unwrap().lines().next().unwrap().to_string();
    let foreign = first.replace("ledger-1", "foreign-1");
    interrupt(&step, &format!("{first}\n{first}\n{foreign}\n"));
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("finishing an unfinished run"), "{}", text(&out.stderr));
    assert_eq!(sample_ids(&step), ["ledger-1/reference", "ledger-2/reference", "ledger-3/reference"]);
}

/// Makes a finished step look interrupted, with `partial` as the records it had written.
fn interrupt(step: &Path, partial: &str) {
    std::fs::write(step.join("output.jsonl.partial"), partial).unwrap();
    std::fs::remove_file(step.join("output.jsonl")).unwrap();
    let meta = step.join("meta.json");
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    value["status"] = "interrupted".into();
    std::fs::write(&meta, value.to_string()).unwrap();
}

/// Each record's `sample_id` in a step's finished output.
fn sample_ids(step: &Path) -> Vec<String> {
    std::fs::read_to_string(step.join("output.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["sample_id"].as_str().unwrap().to_string())
        .collect()
}

/// Two runs in one run directory would interleave their records: the second is refused.
#[test]
#[cfg(unix)]
fn a_run_directory_in_use_is_refused() {
    let (dir, mut child, _stderr, _) = running_one_program("while True:\n    pass\n", "1h");
    let second = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume"], dir.path());
    // A dry run says what the run would: that it is refused.
    let dry = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume", "--dry-run"], dir.path());
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    for refused in [second, dry] {
        assert_eq!(refused.status.code(), Some(2));
        assert!(text(&refused.stderr).contains("`out` is in use by another seedflow run"), "{}", text(&refused.stderr));
    }
}

/// A run whose output's reader went away (`seedflow run --ci | head -2`) stops as Ctrl-C stops
/// one, at its next write, and its summary says how it ended (not `running`, as when SIGPIPE
/// ended seedflow there).
#[test]
#[cfg(unix)]
fn a_run_whose_reader_went_away_ends_with_its_summary() {
    use std::io::BufRead;
    let dir = project(
        "workflow \"one\"\ndataset \"tasks\" format=\"jsonl\" path=\"one.jsonl\"\nexecute \"references\" code=\"tasks\"\n",
    );
    let task = serde_json::json!({"task_id": "one", "prompt": "Return 1.", "solution": "import time\ntime.sleep(1)\ndef f():\n    return 1\n", "tests": ["assert f() == 1"]});
    std::fs::write(dir.path().join("one.jsonl"), format!("{task}\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .args(["run", "flow.kdl", "--run-dir", "out", "--ci"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("\"step\":\"references\"") {
        assert_ne!(stdout.read_line(&mut seen).unwrap(), 0, "seedflow ended first: {seen}");
    }
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    assert!(matches!(out.status.code(), Some(0 | 130)), "{:?}: {}", out.status, text(&out.stderr));
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/summary.json")).unwrap()).unwrap();
    assert_ne!(summary["status"], "running", "{summary}");
}

/// A run of one program's reference solution, `solution`, with `timeout`: returned once the
/// sandbox step has started, with what seedflow printed so far.
#[cfg(unix)]
fn running_one_program(
    solution: &str,
    timeout: &str,
) -> (tempfile::TempDir, std::process::Child, std::io::BufReader<std::process::ChildStderr>, String) {
    use std::io::BufRead;
    let dir = project(&format!(
        "workflow \"one\"\ndataset \"tasks\" format=\"jsonl\" path=\"one.jsonl\"\nexecute \"references\" code=\"tasks\" timeout=\"{timeout}\"\n"
    ));
    let task = serde_json::json!({"task_id": "one", "prompt": "Return 1.", "solution": solution, "tests": ["assert f() == 1"]});
    std::fs::write(dir.path().join("one.jsonl"), format!("{task}\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_seedflow"))
        .args(["run", "flow.kdl", "--run-dir", "out"])
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .env_remove("CI")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("start   references") {
        assert_ne!(stderr.read_line(&mut seen).unwrap(), 0, "seedflow ended first: {seen}");
    }
    (dir, child, stderr, seen)
}

/// A stop does not wait for programs to reach their `timeout`: one that would loop for an hour
/// is dropped at once.
#[test]
#[cfg(unix)]
fn a_stop_ends_the_programs_still_running() {
    let (_dir, mut child, _stderr, _) = running_one_program("while True:\n    pass\n", "1h");
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    // Generous: what is measured is that it stops, not how fast.
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(130));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("the run went on for a minute after Ctrl-C");
}

/// SIGTERM (what CI runners and `kill` send) stops a run as Ctrl-C does: exit 130, the run
/// marked interrupted, and `--resume` finishes it.
#[test]
#[cfg(unix)]
fn a_terminated_run_stops_cleanly_and_resumes() {
    let (dir, mut child, mut stderr, mut seen) =
        running_one_program("import time\ntime.sleep(3)\ndef f():\n    return 1\n", "30s");
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("interrupted; continue with `seedflow run flow.kdl --resume --run-dir out`"), "{seen}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "interrupted");

    let resumed = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume"], dir.path());
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    // Run again, or taken from the interrupted run if it finished before the stop reached it.
    assert!(text(&resumed.stderr).contains("count=1 pass-rate=1"), "{}", text(&resumed.stderr));
}

#[test]
fn an_adapter_file_is_checked_against_the_model_and_used() {
    let model = seedflow::assets::ensure(&seedflow::assets::DEFAULT_MODEL, &|m| eprintln!("{m}")).unwrap();
    let dir = project(
        r#"
model "coder" path="default"
dataset "one" format="jsonl" path="tasks.jsonl" limit=1
generate "plain" model="coder" tasks="one" temperature=0 max-tokens=24
generate "adapted" model="coder" tasks="one" temperature=0 max-tokens=24 adapter="fits.gguf"
generate "from-peft" model="coder" tasks="one" temperature=0 max-tokens=24 adapter="./fits-peft"
finetune-lora "more" model="coder" data="one" init="fits.gguf" epochs=1
"#,
    );
    // The same adapters as PEFT directories too.
    let config = seedflow::train::Config::read(&model).unwrap();
    let fits = common::random_adapter(&dir.path().join("fits.gguf"), 896);
    fits.save_peft(&dir.path().join("fits-peft"), &config).unwrap();
    let other = common::random_adapter(&dir.path().join("other.gguf"), 64);
    other.save_peft(&dir.path().join("other-peft"), &config).unwrap();
    fits.save_peft(&dir.path().join("dora-peft"), &config).unwrap();
    let dora = dir.path().join("dora-peft/adapter_config.json");
    let config_text = std::fs::read_to_string(&dora).unwrap();
    std::fs::write(&dora, config_text.replace(r#""use_dora": false"#, r#""use_dora": true"#)).unwrap();
    let check = |adapter: &str| {
        let out = seedflow(&["check", "flow.kdl", "--set", &format!("adapted.adapter={adapter}")], dir.path());
        (out.status.code(), text(&out.stderr))
    };
    assert_eq!(check("fits.gguf").0, Some(0));
    assert_eq!(check("./fits-peft").0, Some(0));
    // A server's URL given on the command line, as the README says to (its `//` is not a KDL
    // comment there), and several, with or without spaces after the commas.
    for servers in ["http://gpu-box:8000", "http://10.0.0.1:8000, http://10.0.0.2:8000/v1"] {
        let out = seedflow(&["check", "flow.kdl", "--set", &format!("coder.server={servers}")], dir.path());
        assert_eq!(out.status.code(), Some(0), "{servers}: {}", text(&out.stderr));
    }
    for (adapter, says) in [
        ("other.gguf", "does not fit"),
        ("./other-peft", "does not fit"),
        ("./dora-peft", "DoRA"),
        ("./missing-peft", "cannot find `./missing-peft`"),
        (model.to_str().unwrap(), "not a LoRA adapter"),
        ("missing.gguf", "cannot find `missing.gguf`"),
    ] {
        let (code, stderr) = check(adapter);
        assert_eq!(code, Some(2), "{adapter}: {stderr}");
        assert!(stderr.contains(says), "{adapter}: {stderr}");
    }
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The log-probability of the answer shows the adapter at work even where the greedy text
    // happens to stay the same.
    let answer = |step: &str| {
        let records = std::fs::read_to_string(dir.path().join("out").join(step).join("output.jsonl")).unwrap();
        let record: serde_json::Value = serde_json::from_str(records.lines().next().unwrap()).unwrap();
        (record["answer"].clone(), record["logprob"].clone())
    };
    assert_ne!(answer("plain"), answer("adapted"), "the adapter file changes the model's output");
    assert_eq!(answer("from-peft"), answer("adapted"), "the PEFT directory is the same adapter");
    // A resumed `generate` keeps a partial sample only if it is its own: a foreign one is sampled again.
    let plain = dir.path().join("out/plain");
    let record = std::fs::read_to_string(plain.join("output.jsonl")).unwrap();
    interrupt(&plain, &record.replace("\"ledger-1/0\"", "\"foreign/0\""));
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "out", "--resume"], dir.path());
    assert!(text(&out.stderr).contains("finishing an unfinished run"), "{}", text(&out.stderr));
    assert_eq!(sample_ids(&plain), ["ledger-1/0"]);
    assert_eq!(std::fs::read_to_string(plain.join("output.jsonl")).unwrap(), record);
    // Training continued the file's adapter: its rank and its query projections alone.
    let mut trained = std::fs::File::open(dir.path().join("out/more/adapter.gguf")).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut trained).unwrap();
    let matrices: Vec<&String> = content.tensor_infos.keys().collect();
    assert_eq!(matrices.len(), 48, "{matrices:?}");
    assert!(matrices.iter().all(|name| name.contains("attn_q")), "{matrices:?}");
    assert!(content.tensor_infos.values().any(|info| info.shape.dims() == [4, 896]));
}
