//! Run reports: what `seedflow run` writes beside its summary and what `seedflow report` makes of
//! one run or several, checked as data and, for the HTML page, as a browser renders it.

use std::path::Path;
use std::process::{Command, Output};

fn seedflow(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seedflow")).args(args).current_dir(dir).env_remove("CI").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A run over the house-api example tasks' reference solutions: a loop of two iterations (with a
/// gate that holds), an evaluation, and gates that fail (so the run exits 3 and the report says
/// why): one against a threshold, one against a baseline metric.
fn run_once() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("examples/data/house-api.jsonl"), dir.path().join("tasks.jsonl")).unwrap();
    let workflow = r#"
workflow "references" seed=3
dataset "tasks" format="jsonl" path="tasks.jsonl"
loop-until "again" max-iterations=2 {
    execute "checked" code="tasks"
    select "kept" from="checked" status="passed"
    gate "all-pass" metric="checked.pass@1" at-least=1.0
}
execute "scores" code="tasks"
report "summary" from="scores" baseline="again.checked" title="References"
gate "half" metric="scores.pass@1" at-most=0.5
dataset "two" format="jsonl" path="tasks.jsonl" limit=2
gate "as-many" metric="two.count" baseline="tasks.count" margin=0.5
"#;
    std::fs::write(dir.path().join("flow.kdl"), workflow).unwrap();
    let out = seedflow(&["run", "flow.kdl", "--run-dir", "run"], dir.path());
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("report: `run/report.html`"), "{}", text(&out.stderr));
    // The run ends by saying how the evaluation compares with its baseline.
    assert!(
        text(&out.stderr).contains(
            "References (summary): baseline -> evaluated: pass@1 1.000 -> 1.000 on 3 tasks (+0.0 points, 95% CI +0.0 to +0.0); 0 gained, 0 lost, McNemar p = 1.000"
        ),
        "{}",
        text(&out.stderr)
    );
    dir
}

#[test]
fn a_run_reports_its_iterations_evaluations_and_gates() {
    let dir = run_once();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/report.json")).unwrap()).unwrap();
    let run = &report[0];
    assert_eq!(run["workflow"], "references");
    assert_eq!(run["status"], "gate-failed");
    let iterations = run["loops"][0]["iterations"].as_array().unwrap();
    assert_eq!(iterations.len(), 2);
    for iteration in iterations {
        let checked = iteration["steps"].as_array().unwrap().iter().find(|s| s["step"] == "checked").unwrap();
        assert_eq!(checked["kind"], "execute");
        assert_eq!(checked["metrics"]["pass@1"], 1.0);
    }
    assert_eq!(run["evaluations"][0]["step"], "scores");
    assert_eq!(run["evaluations"][0]["scores"]["pass@1"], 1.0);
    let gates = run["gates"].as_array().unwrap();
    let gate = |step: &str| gates.iter().find(|g| g["step"] == step).unwrap_or_else(|| panic!("{step}: {gates:?}"));
    for step in ["again.all-pass #1", "again.all-pass #2"] {
        assert_eq!(gate(step)["passed"], true);
    }
    assert_eq!(gate("as-many")["passed"], false);
    assert_eq!(gate("as-many")["failure"], "two.count = 2 is below the baseline tasks.count = 3 by more than 0.5");
    assert_eq!(gate("half")["passed"], false);
    assert_eq!(gate("half")["failure"], "scores.pass@1 = 1 is above 0.5");
    assert_eq!(gate("half")["checked"], true);
    let markdown = std::fs::read_to_string(dir.path().join("run/report.md")).unwrap();
    assert!(markdown.contains("- gate `half`: **failed: scores.pass@1 = 1 is above 0.5**"), "{markdown}");
    assert!(markdown.contains("| iteration | checked pass@1 | kept count |"), "{markdown}");
    // The report step's comparison with its baseline leads the run's report.
    assert!(
        markdown.contains("| references: References (summary): baseline -> evaluated | 3 | 1.000 | 1.000 | +0.0 | +0.0 to +0.0 | 0 | 0 | 1.000 |"),
        "{markdown}"
    );
    assert_eq!(run["comparisons"][0]["p_value"], 1.0);

    // The same run twice is refused; two runs side by side go to stdout as Markdown.
    let out = seedflow(&["report", "run", "./run/"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`./run/` is given twice"), "{}", text(&out.stderr));
    copy_run(dir.path());
    let out = seedflow(&["report", "run", "rerun"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let markdown = text(&out.stdout);
    assert!(
        markdown.contains(
            "| run | status | training samples | scores pass@1 | scores pass@1 vs references (run) | wall time |"
        ),
        "{markdown}"
    );
    assert!(markdown.contains("| references (run) | gate-failed | 0 | 1.000 | +0.0% |"), "{markdown}");

    // A run whose summary says `running` while no process holds it ended without a word (killed);
    // a failed one says which step failed, and why.
    let summary = dir.path().join("rerun/summary.json");
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    value["status"] = "running".into();
    std::fs::write(&summary, value.to_string()).unwrap();
    let out = seedflow(&["report", "rerun"], dir.path());
    assert!(text(&out.stdout).contains("| references | stopped |"), "{}", text(&out.stdout));
    value["status"] = "failed".into();
    value["steps"]["scores"]["error"] = "the sandbox could not start".into();
    std::fs::write(&summary, value.to_string()).unwrap();
    let out = seedflow(&["report", "rerun"], dir.path());
    assert!(
        text(&out.stdout).contains("- step `scores` **failed**: the sandbox could not start"),
        "{}",
        text(&out.stdout)
    );
    // Task by task against the first run, on the evaluation both have.
    assert!(
        markdown.contains("| scores: references (run) -> references (rerun) | 3 | 1.000 | 1.000 | +0.0 |"),
        "{markdown}"
    );

    let out = seedflow(&["report", "run", "nowhere"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`nowhere` does not exist"), "{}", text(&out.stderr));
    let out = seedflow(&["report", "run/scores"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`run/scores` is not a run directory"), "{}", text(&out.stderr));

    // A step whose meta.json is damaged is left out of the figures and named as left out.
    std::fs::write(dir.path().join("run/scores/meta.json"), "{\"key\": ").unwrap();
    let out = seedflow(&["report", "run"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let markdown = text(&out.stdout);
    assert!(markdown.contains("- step `scores`: **left out**, its `meta.json` cannot be read"), "{markdown}");
    assert!(!markdown.contains("scores pass@1"), "{markdown}");

    // A file where the report's directory should go.
    std::fs::write(dir.path().join("taken"), "").unwrap();
    let out = seedflow(&["report", "run", "--out", "taken"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`taken` is a file, and `--out` names a directory"), "{}", text(&out.stderr));
}

/// A second run to compare with the first: a copy of its directory, `rerun`.
fn copy_run(dir: &Path) {
    let status = Command::new("cp").args(["-a", "run", "rerun"]).current_dir(dir).status().unwrap();
    assert!(status.success());
}

/// Opens the page in headless Chromium with a script appended that measures what was drawn, and
/// returns the script's findings.
fn measure_in_browser(html: &Path) -> serde_json::Value {
    let page = html.with_file_name("measured.html");
    let script = r#"<script>
const svgs = [...document.querySelectorAll('svg')].map(svg => {
  const box = svg.getBoundingClientRect();
  const lines = [...svg.querySelectorAll('polyline')].map(line => {
    const b = line.getBBox();
    const inside = b.x >= 0 && b.y >= 0 && b.x + b.width <= box.width + 0.5 && b.y + b.height <= box.height + 0.5;
    return { points: line.points.numberOfItems, extent: b.width + b.height, inside };
  });
  return { id: svg.id, width: box.width, height: box.height, lines };
});
const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
document.body.setAttribute('data-measured', JSON.stringify({ svgs, tables, title: document.title }));
</script></body>"#;
    std::fs::write(&page, std::fs::read_to_string(html).unwrap().replace("</body>", script)).unwrap();
    let browser = std::env::var("SEEDFLOW_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let out = Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!("this test needs Chromium (`apt-get install chromium`; .ci/run installs it): {browser}: {e}")
        });
    let dom = text(&out.stdout);
    let start = dom
        .find("data-measured=\"")
        .unwrap_or_else(|| panic!("the page's script did not run:\n{dom}\n{}", text(&out.stderr)));
    let value = &dom[start + "data-measured=\"".len()..];
    let value = &value[..value.find('"').unwrap()];
    serde_json::from_str(&value.replace("&quot;", "\"").replace("&amp;", "&")).unwrap()
}

#[test]
fn the_html_report_renders_in_a_browser() {
    let dir = run_once();
    copy_run(dir.path());
    let out = seedflow(&["report", "run", "rerun", "--out", "compared"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let measured = measure_in_browser(&dir.path().join("compared/report.html"));
    assert_eq!(measured["title"], "seedflow report: references, references");
    let chart = measured["svgs"].as_array().unwrap().iter().find(|s| s["id"] == "pass-at-1").expect("a pass@1 chart");
    assert!(chart["width"].as_f64().unwrap() > 100.0 && chart["height"].as_f64().unwrap() > 100.0, "{chart}");
    // Per run: the loop's `checked` by iteration (2 points) and the evaluation level (2 points).
    let lines = chart["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 4, "{chart}");
    for line in lines {
        assert_eq!(line["points"], 2, "{chart}");
        assert!(line["extent"].as_f64().unwrap() > 10.0 && line["inside"] == true, "{chart}");
    }
    // The task-by-task comparisons (header + each run's own + the second against the first), the
    // runs side by side (header + 2 runs) and each run's iteration table (header + 2 iterations).
    assert_eq!(measured["tables"], serde_json::json!([4, 3, 3, 3]));
}
