use std::collections::BTreeMap;
use std::time::Duration;

use crate::data::{Sample, Status, Task, Verdict, pass_at_k};
use crate::dsl::schema::{Artifact, Input, KindSpec, Role, ValueType, params};
use crate::nodes::context::{Context, Outcome, StepError};
use crate::sandbox::{self, Job, Limits};

pub static SPEC: KindSpec = KindSpec {
    name: "execute",
    role: Role::Step(Artifact::Verdicts),
    doc: "Runs each program against its task's tests in a sandbox: CPython compiled to WASI inside \
          wasmtime, a fresh instance per program, with no files, no network, no processes, a \
          wall-clock deadline, a memory cap and capped output. Given tasks instead of \
          samples, it runs the dataset's reference solutions (a way to validate a dataset). Each \
          verdict has a status (`passed`, `failed`, `error`, `syntax`, `timeout`, `memory`) and \
          feedback for Self-Revise: the failing test (the assert inside a HumanEval `check`), \
          what it returned against what the test expects (and, when the value is right but the \
          test expects it passed to a name such as a house envelope `ok(…)`, that), or the \
          exception with a short traceback. Programs run \
          in parallel in worker processes, as many as `--workers` (the cores, by default); one \
          past its `timeout` is killed with its worker. CPython is a pre-initialised \
          component built on first use (`seedflow fetch python`), or the python.wasm that \
          `SEEDFLOW_PYTHON_WASM` names. pass@k is published for k = 1, 5, 10 and 100, those \
          that every task's number of programs reaches.",
    properties: &[CODE.spec, TIMEOUT.spec, MEMORY.spec, OUTPUT.spec, FEEDBACK_CHARS.spec],
    metrics: &["count", "passed", "pass-rate", "pass@k"],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: r#"dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl"
execute "references" code="train" timeout="10s" memory="256MiB"
"#,
};

/// Samples run together before their verdicts are written.
const BATCH: usize = 32;

params! {
    /// The samples to run, or tasks whose reference solutions to run.
    CODE: Input = required("code", ValueType::Input(&[Artifact::Samples, Artifact::Tasks]));
    /// Wall-clock deadline per program. The sandbox runs compute-bound Python about twice as slowly
    /// as native CPython, so the default allows what about 5 s natively would.
    TIMEOUT: Duration = optional(
        "timeout",
        ValueType::Duration { min: Duration::from_millis(1), max: Duration::from_secs(24 * 60 * 60) },
        r#""10s""#,
    );
    /// Memory cap per program.
    MEMORY: u64 = optional(
        "memory",
        ValueType::Size { min: sandbox::LEAST_MEMORY, max: sandbox::MOST_MEMORY },
        r#""256MiB""#,
    );
    /// Most output a program may print.
    OUTPUT: u64 = optional("output", ValueType::Size { min: 0, max: 1 << 30 }, r#""64KiB""#);
    /// Most characters of feedback kept per verdict.
    FEEDBACK_CHARS: i64 = optional("feedback-chars", ValueType::at_least(100), "2000");
}

/// The limits of an `execute` step that sets none: its schema's defaults, for those who run the
/// sandbox outside a workflow (`seedflow fetch python` compiles it with them).
pub fn default_limits() -> Option<Limits> {
    Some(Limits {
        timeout: TIMEOUT.default()?,
        memory: MEMORY.default()?,
        output: OUTPUT.default()? as usize,
        feedback_chars: FEEDBACK_CHARS.default()? as usize,
    })
}

fn limits(ctx: &Context) -> Result<Limits, StepError> {
    Ok(Limits {
        timeout: ctx.get(&TIMEOUT)?,
        memory: ctx.get(&MEMORY)?,
        output: ctx.get(&OUTPUT)? as usize,
        feedback_chars: ctx.get(&FEEDBACK_CHARS)? as usize,
    })
}

/// The programs to run: samples as they are, or the tasks' reference solutions.
fn programs(ctx: &Context) -> Result<Vec<Sample>, StepError> {
    match ctx.input(&CODE)?.artifact {
        Artifact::Tasks => {
            let tasks = ctx.read::<Task>(&CODE)?;
            let references: Vec<Sample> = tasks.iter().filter_map(Sample::reference).collect();
            if references.is_empty() {
                return Err(StepError::Failed(format!(
                    "none of the {} tasks has a reference solution to run (`solution`, `code` or `canonical_solution`)",
                    tasks.len()
                )));
            }
            // A dataset may hold tasks without one (SEED needs none); validating it should say so.
            let missing: Vec<&str> =
                tasks.iter().filter(|t| t.reference.is_none()).map(|t| t.task_id.as_str()).collect();
            if !missing.is_empty() {
                let shown = missing.iter().take(5).map(|id| format!("`{id}`")).collect::<Vec<_>>().join(", ");
                let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
                ctx.message(&format!(
                    "{} of {} tasks have no reference solution and are not run: {shown}{more}",
                    missing.len(),
                    tasks.len()
                ));
            }
            Ok(references)
        }
        _ => ctx.read::<Sample>(&CODE),
    }
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let samples = programs(ctx)?;
    let limits = limits(ctx)?;
    let (mut writer, kept) = ctx.records()?;
    let mut verdicts: Vec<Verdict> = kept
        .iter()
        .map(|line| {
            serde_json::from_str(line).map_err(|e| StepError::Failed(format!("unreadable earlier verdict: {e}")))
        })
        .collect::<Result<_, _>>()?;
    // Kept verdicts count only as far as they are, in order, of the samples to run (and of the
    // same programs): a partial file an interruption left is not trusted by its length alone.
    let matching = verdicts
        .iter()
        .zip(&samples)
        .take_while(|(verdict, sample)| {
            verdict.sample.sample_id == sample.sample_id && verdict.sample.code == sample.code
        })
        .count();
    verdicts.truncate(matching);
    writer.keep_first(matching)?;
    let remaining = samples.len() - verdicts.len();
    if remaining == 0 {
        writer.finish()?;
        return Ok(Outcome { metrics: metrics(&verdicts), gate_failure: None });
    }
    let workers = ctx.workers.max(1);
    let wasm =
        crate::sandbox::interpreter(&|message| ctx.message(message)).map_err(|e| StepError::Failed(format!("{e}")))?;
    let sandbox = ctx.resources.sandbox(&wasm, workers as u32, limits.memory).map_err(StepError::Failed)?;
    let runtime = ctx.resources.runtime(workers).map_err(StepError::Failed)?;
    for batch in samples[samples.len() - remaining..].chunks(BATCH) {
        ctx.check_cancelled()?;
        // A stop does not wait for the batch: its programs, which may run until their
        // `timeout`, are dropped, and their worker processes killed.
        let batch_results = async {
            let mut running = tokio::task::JoinSet::new();
            for (index, sample) in batch.iter().cloned().enumerate() {
                let (sandbox, limits) = (sandbox.clone(), limits.clone());
                running.spawn(async move {
                    let job = Job::new(&sample.code, &sample.task, &limits);
                    (index, sandbox.run(&job, &limits).await)
                });
            }
            let mut results: Vec<Option<_>> = (0..batch.len()).map(|_| None).collect();
            while let Some(joined) = running.join_next().await {
                if let Ok((index, result)) = joined {
                    results[index] = Some(result);
                }
            }
            results
        };
        let results = runtime.block_on(async {
            tokio::select! {
                results = batch_results => Ok(results),
                () = ctx.cancelled() => Err(StepError::Cancelled),
            }
        })?;
        let mut new = Vec::with_capacity(batch.len());
        for (sample, result) in batch.iter().zip(results) {
            let result = result
                .ok_or_else(|| StepError::Failed(format!("the sandbox lost `{}`", sample.sample_id)))?
                .map_err(|e| StepError::Failed(e.to_string()))?;
            new.push(Verdict {
                sample: sample.clone(),
                status: result.status,
                feedback: result.feedback,
                failed_test: result.failed_test,
                duration_ms: result.duration.as_secs_f64() * 1000.0,
            });
        }
        writer.append(&new)?;
        verdicts.extend(new);
        ctx.progress(verdicts.len() as u64, samples.len() as u64);
    }
    writer.finish()?;
    Ok(Outcome { metrics: metrics(&verdicts), gate_failure: None })
}

/// count, passed, pass-rate, and pass@k for k = 1, 5, 10 and 100, those up to the samples per
/// task.
pub fn metrics(verdicts: &[Verdict]) -> BTreeMap<String, f64> {
    let passed = verdicts.iter().filter(|v| v.status == Status::Passed).count();
    let mut metrics = BTreeMap::new();
    metrics.insert("count".to_string(), verdicts.len() as f64);
    metrics.insert("passed".to_string(), passed as f64);
    metrics
        .insert("pass-rate".to_string(), if verdicts.is_empty() { 0.0 } else { passed as f64 / verdicts.len() as f64 });
    let mut per_task: BTreeMap<&str, usize> = BTreeMap::new();
    for v in verdicts {
        *per_task.entry(&v.sample.task_id).or_default() += 1;
    }
    let fewest = per_task.values().copied().min().unwrap_or(0);
    let ks: Vec<usize> = pass_at_k::EXECUTE_KS.into_iter().filter(|k| *k <= fewest).collect();
    for (k, value) in pass_at_k::over_tasks(verdicts, &ks) {
        metrics.insert(format!("pass@{k}"), value);
    }
    metrics
}

#[cfg(test)]
mod tests {
    /// The schema's defaults read back as limits (as `seedflow fetch python` uses them).
    #[test]
    fn the_default_limits_are_the_schema_defaults() {
        let limits = super::default_limits().expect("execute's defaults parse as limits");
        assert_eq!(limits.timeout, std::time::Duration::from_secs(10));
        assert_eq!((limits.memory, limits.output, limits.feedback_chars), (256 << 20, 64 << 10, 2000));
    }
}
