use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::data::paired::{self, Paired};
use crate::data::{Status, Verdict, pass_at_k};
use crate::dsl::schema::{Artifact, Input, KindSpec, Role, ValueType, params};
use crate::nodes::context::{Context, Outcome, StepError};
use crate::store::write_atomic;

pub static SPEC: KindSpec = KindSpec {
    name: "report",
    role: Role::Step(Artifact::Report),
    doc: "Summarises verdicts: pass@k for each k in `k`, the count of each status, and the \
          failing tasks. pass@k is the unbiased estimator of Chen et al. (2021) over each task's \
          samples; a k larger than some task's sample count is left out. With `baseline` (for \
          example the base model's verdicts on the same tasks), the report leads with the \
          comparison, task by task on the tasks both evaluated: pass@1 before -> after, the tasks \
          gained and lost, the exact McNemar p-value of those flips and a 95% bootstrap \
          confidence interval of the difference (published as `compared` (the tasks both \
          evaluated), `baseline-pass@1`, `gained`, `lost`, `p-value`, `gain-low`, `gain-high`). Writes `report.json`, `report.md` and \
          `junit.xml` (one test case per sample) as chosen by `formats`.",
    properties: &[FROM.spec, BASELINE.spec, K.spec, FORMATS.spec, TITLE.spec],
    metrics: &[
        "count",
        "samples",
        "pass-rate",
        "pass@k",
        "compared",
        "baseline-pass@1",
        "gained",
        "lost",
        "p-value",
        "gain-low",
        "gain-high",
    ],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[("baseline", "from")],
    metrics_needing: &[
        ("compared", "baseline"),
        ("baseline-pass@1", "baseline"),
        ("gained", "baseline"),
        ("lost", "baseline"),
        ("p-value", "baseline"),
        ("gain-low", "baseline"),
        ("gain-high", "baseline"),
    ],
    check_values: None,
    unkeyed: &[],
    example: r#"dataset "test" format="mbpp" path="examples/data/mbpp/test.jsonl" limit=20
execute "references" code="test"
report "summary" from="references" k="1" formats="json,markdown,junit" title="MBPP references"
"#,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub title: String,
    pub tasks: usize,
    pub samples: usize,
    pub statuses: BTreeMap<&'static str, usize>,
    pub pass_at_k: BTreeMap<String, f64>,
    pub failing_tasks: Vec<String>,
    /// Against the `baseline` verdicts, when the step names them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Paired>,
}

pub fn summarise(title: &str, verdicts: &[Verdict], ks: &[usize]) -> Report {
    let mut statuses = BTreeMap::new();
    let mut passing: BTreeMap<&str, bool> = BTreeMap::new();
    for v in verdicts {
        *statuses.entry(v.status.as_str()).or_insert(0) += 1;
        *passing.entry(&v.sample.task_id).or_insert(false) |= v.status == Status::Passed;
    }
    Report {
        title: title.to_string(),
        tasks: passing.len(),
        samples: verdicts.len(),
        statuses,
        pass_at_k: pass_at_k::over_tasks(verdicts, ks).into_iter().map(|(k, v)| (format!("pass@{k}"), v)).collect(),
        failing_tasks: passing.into_iter().filter(|(_, passed)| !passed).map(|(t, _)| t.to_string()).collect(),
        baseline: None,
    }
}

/// `text` on one line, its runs of spaces and line ends one space each: for a Markdown heading
/// or table cell.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn markdown(report: &Report) -> String {
    // A heading is one line: a title's other lines would start blocks of their own.
    let mut out = format!("# {}\n\n", one_line(&report.title));
    if let Some(paired) = &report.baseline {
        let _ = writeln!(out, "Against the baseline: {paired}.\n");
    }
    let _ = write!(out, "{} tasks, {} samples.\n\n| metric | value |\n|---|---|\n", report.tasks, report.samples);
    for (name, value) in &report.pass_at_k {
        let _ = writeln!(out, "| {name} | {value:.4} |");
    }
    out.push_str("\n| status | samples |\n|---|---|\n");
    for (status, count) in &report.statuses {
        let _ = writeln!(out, "| {status} | {count} |");
    }
    if !report.failing_tasks.is_empty() {
        let _ = writeln!(
            out,
            "\nTasks with no passing sample ({}): {}",
            report.failing_tasks.len(),
            report.failing_tasks.join(", ")
        );
    }
    out
}

pub fn junit(report: &Report, verdicts: &[Verdict]) -> Result<String, String> {
    use quick_junit::{NonSuccessKind, Report as Junit, TestCase, TestCaseStatus, TestSuite};
    let mut suite = TestSuite::new(report.title.clone());
    for v in verdicts {
        let status = if v.status == Status::Passed {
            TestCaseStatus::success()
        } else {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            status.set_type(v.status.as_str());
            status.set_description(v.feedback.clone());
            if let Some(test) = &v.failed_test {
                status.set_message(test.clone());
            }
            status
        };
        let mut case = TestCase::new(v.sample.sample_id.clone(), status);
        case.set_classname(v.sample.task_id.clone());
        case.set_time(std::time::Duration::from_secs_f64(v.duration_ms.max(0.0) / 1000.0));
        suite.add_test_case(case);
    }
    let mut junit = Junit::new("seedflow");
    junit.add_test_suite(suite);
    junit.to_string().map_err(|e| e.to_string())
}

params! {
    /// The verdicts to report on.
    FROM: Input = required("from", ValueType::Input(&[Artifact::Verdicts]));
    /// Verdicts to compare with, task by task (the model before adaptation).
    BASELINE: Option<Input> = unset("baseline", ValueType::Input(&[Artifact::Verdicts]));
    /// The k of each pass@k, as a list: "1,10".
    K: Vec<i64> = optional("k", ValueType::Integers, r#""1""#);
    /// Files to write.
    FORMATS: Vec<ReportFormat> = optional("formats", ValueType::Choices(ReportFormat::NAMES), r#""json,markdown,junit""#);
    /// Heading of the report.
    TITLE: String = optional("title", ValueType::Text, r#""seedflow report""#);
}

crate::choice! {
    /// A file a report step writes.
    pub enum ReportFormat {
        Json = "json",
        Markdown = "markdown",
        Junit = "junit",
    }
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let verdicts: Vec<Verdict> = ctx.read(&FROM)?;
    let ks: Vec<usize> = ctx.get(&K)?.into_iter().map(|k| k as usize).collect();
    let mut report = summarise(&ctx.get(&TITLE)?, &verdicts, &ks);
    if let Some(baseline) = ctx.optional_input(&BASELINE) {
        let baseline: Vec<Verdict> = baseline.read()?;
        report.baseline = paired::compare(&paired::pass_rates(&baseline), &paired::pass_rates(&verdicts));
        if report.baseline.is_none() {
            ctx.message("the baseline evaluated none of these tasks: no comparison");
        }
    }
    for format in ctx.get(&FORMATS)? {
        match format {
            ReportFormat::Json => {
                let json = serde_json::to_vec_pretty(&report).map_err(|e| StepError::Failed(e.to_string()))?;
                write_atomic(&ctx.dir.join("report.json"), &json)?;
            }
            ReportFormat::Markdown => write_atomic(&ctx.dir.join("report.md"), markdown(&report).as_bytes())?,
            ReportFormat::Junit => write_atomic(
                &ctx.dir.join("junit.xml"),
                junit(&report, &verdicts).map_err(StepError::Failed)?.as_bytes(),
            )?,
        }
    }
    let mut metrics: BTreeMap<String, f64> = report.pass_at_k.clone();
    metrics.insert("count".into(), report.tasks as f64);
    metrics.insert("samples".into(), report.samples as f64);
    let passed = report.statuses.get("passed").copied().unwrap_or(0);
    metrics.insert("pass-rate".into(), if report.samples == 0 { 0.0 } else { passed as f64 / report.samples as f64 });
    if let Some(p) = &report.baseline {
        for (name, value) in [
            ("compared", p.tasks as f64),
            ("baseline-pass@1", p.before),
            ("gained", p.gained as f64),
            ("lost", p.lost as f64),
            ("p-value", p.p_value),
            ("gain-low", p.ci_low),
            ("gain-high", p.ci_high),
        ] {
            metrics.insert(name.into(), value);
        }
    }
    Ok(Outcome { metrics, gate_failure: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    fn verdict(task: &str, index: usize, status: Status) -> Verdict {
        Verdict {
            sample: Sample {
                task_id: task.into(),
                task: crate::data::Task::example(task),
                sample_id: format!("{task}/{index}"),
                code: String::new(),
                logprob: None,
                tokens: None,
                answer: None,
                parent: None,
            },
            status,
            feedback: "AssertionError: assert f(1) == 2".into(),
            failed_test: Some("assert f(1) == 2".into()),
            duration_ms: 3.0,
        }
    }

    #[test]
    fn summarises_pass_at_k_and_statuses() {
        let verdicts = vec![
            verdict("a", 0, Status::Passed),
            verdict("a", 1, Status::Failed),
            verdict("b", 0, Status::Error),
            verdict("b", 1, Status::Failed),
        ];
        let report = summarise("t", &verdicts, &[1, 2, 5]);
        // Task a: pass@1 = 1/2, pass@2 = 1; task b: 0. pass@5 is undefined with 2 samples.
        assert_eq!(report.pass_at_k, [("pass@1".to_string(), 0.25), ("pass@2".to_string(), 0.5)].into());
        assert_eq!(report.failing_tasks, ["b"]);
        assert_eq!(report.statuses.get("failed"), Some(&2));
        let xml = junit(&report, &verdicts).unwrap();
        assert!(xml.contains(r#"tests="4""#) && xml.contains(r#"failures="3""#), "{xml}");
        assert!(markdown(&report).contains("| pass@1 | 0.2500 |"));
    }

    #[test]
    fn leads_with_the_comparison_to_a_baseline() {
        let before =
            vec![verdict("a", 0, Status::Failed), verdict("b", 0, Status::Failed), verdict("c", 0, Status::Passed)];
        let after =
            vec![verdict("a", 0, Status::Passed), verdict("b", 0, Status::Passed), verdict("c", 0, Status::Passed)];
        let mut report = summarise("t", &after, &[1]);
        report.baseline = paired::compare(&paired::pass_rates(&before), &paired::pass_rates(&after));
        let text = markdown(&report);
        assert!(
            text.starts_with("# t\n\nAgainst the baseline: pass@1 0.333 -> 1.000 on 3 tasks (+66.7 points, 95% CI"),
            "{text}"
        );
        assert!(text.contains("; 2 gained, 0 lost, McNemar p = 0.500."), "{text}");
    }
}
