use std::path::PathBuf;

use crate::data::{Sample, Task, TaskStyle, sample_seed};
use crate::dsl::schema::{AdapterSource, Artifact, Input, KindSpec, ModelName, Param, Role, ValueType, params};
use crate::llm::{self, Generated, Generation, Request, Sampling, extract, prompt};
use crate::nodes::context::{Context, Outcome, StepError};
use crate::store::meta::Metrics;

/// Most samples per task (or revisions per error): all of a task's are held in memory together,
/// and a pass@k estimate needs a few hundred at most.
pub const MOST_SAMPLES: i64 = 10_000;

// Properties `revise` shares with `generate`.
params! {
    /// The `model` to sample from.
    pub MODEL: ModelName = required("model", ValueType::Model);
    /// A LoRA adapter to attach: a `finetune-lora` step (for example `prev.tune`), a GGUF LoRA file (`….gguf`)
    /// such as one a CI run kept, or a PEFT directory (a path with a `/`, such as `./my-adapter`) trained
    /// elsewhere; `seedflow check` reads the file headers and checks that the adapter fits the step's model.
    pub ADAPTER: Option<AdapterSource> = unset("adapter", ValueType::Adapter);
    /// Scale of the adapter's contribution.
    pub ADAPTER_SCALE: f64 = optional("adapter-scale", ValueType::Number { min: 0.0, max: 10.0 }, "1.0");
    /// Sampling temperature; 0 is greedy.
    pub TEMPERATURE: f64 = optional("temperature", ValueType::Number { min: 0.0, max: 5.0 }, "0.8");
    /// Nucleus sampling threshold.
    pub TOP_P: f64 = optional("top-p", ValueType::Number { min: 0.0, max: 1.0 }, "0.95");
    /// Keep the k most likely tokens; 0 keeps all.
    pub TOP_K: i64 = optional("top-k", ValueType::Integer { min: 0, max: i32::MAX as i64 }, "40");
    /// Most tokens generated per sample.
    pub MAX_TOKENS: i64 = optional("max-tokens", ValueType::Integer { min: 1, max: llm::MOST_TOKENS as i64 }, "512");
    /// An extra string that ends a sample where it first appears (the string itself is left out).
    pub STOP: Option<String> = unset("stop", ValueType::Text);
    /// End a sample when its first fenced code block closes (what follows is prose).
    pub STOP_AFTER_CODE: bool = optional("stop-after-code", ValueType::Bool, "#true");
    /// The tasks to solve.
    TASKS: Input = required("tasks", ValueType::Input(&[Artifact::Tasks]));
    /// Programs per task.
    SAMPLES: i64 = optional("samples", ValueType::Integer { min: 1, max: MOST_SAMPLES }, "1");
    /// A prompt template replacing the built-in one (`std/prompts/…` or a file).
    pub TEMPLATE: Option<PathBuf> = unset("template", ValueType::Template(crate::llm::prompt::SOLVE_VALUES));
}

pub static SPEC: KindSpec = KindSpec {
    name: "generate",
    role: Role::Step(Artifact::Samples),
    doc: "Samples `samples` programs for each task with a model (and optionally a LoRA adapter). \
          The samples of a task are parallel sequences of one llama.cpp batch starting from the \
          prompt, decoded once; several tasks share a batch, and a sample starts as soon as a \
          sequence is free (the model's `parallel`), so a task need not wait for sequences for \
          all its samples. Every sample is seeded from (workflow seed, step, task, \
          index), so reruns are identical; temperature 0 is greedy. Each sample records its mean \
          token log-probability and token count. `prompt-tokens` counts the prompt tokens decoded \
          (each task's prompt once, less the opening it shares with the prompt before it, whose \
          cache it keeps), `tokens-per-second` is the step's generation speed (generated \
          tokens over the time spent generating them, prompt decoding left out), and \
          `decode-share` the part of that time spent waiting for llama.cpp to decode (the rest is \
          seedflow's own work per token: sampling, log-probabilities, stop checks). Instruct models \
          get the chat template stored in the GGUF; the prompt template can be replaced with \
          `template`.",
    properties: &[
        MODEL.spec,
        TASKS.spec,
        ADAPTER.spec,
        ADAPTER_SCALE.spec,
        SAMPLES.spec,
        TEMPERATURE.spec,
        TOP_P.spec,
        TOP_K.spec,
        MAX_TOKENS.spec,
        STOP.spec,
        STOP_AFTER_CODE.spec,
        TEMPLATE.spec,
    ],
    metrics: &["count", "tokens", "prompt-tokens", "tokens-per-second", "decode-share"],
    at_least_one: &[],
    requires: &[("adapter-scale", "adapter")],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: r#"model "coder" path="default"
dataset "test" format="mbpp" path="examples/data/mbpp/test.jsonl" limit=10
generate "answers" model="coder" tasks="test" samples=5 temperature=0.8 top-p=0.95 max-tokens=384
"#,
};

/// The sampling settings of a `generate` or `revise` step.
pub(super) fn sampling(ctx: &Context) -> Result<Sampling, StepError> {
    Ok(Sampling {
        temperature: ctx.get(&TEMPERATURE)? as f32,
        top_p: ctx.get(&TOP_P)? as f32,
        top_k: ctx.get(&TOP_K)? as i32,
        max_tokens: ctx.get(&MAX_TOKENS)? as u32,
        stop: ctx.get(&STOP)?.into_iter().collect(),
        stop_after_code: ctx.get(&STOP_AFTER_CODE)?,
    })
}

/// The step's adapter file and scale, if it has an adapter this iteration.
pub(super) fn adapter(ctx: &Context) -> Result<Option<(PathBuf, f32)>, StepError> {
    let Some(path) = super::finetune_lora::adapter_file(ctx, &ADAPTER)? else { return Ok(None) };
    Ok(Some((path, ctx.get(&ADAPTER_SCALE)? as f32)))
}

/// The step's template (its `param`), checked against the `values` the step fills, or `default`.
pub(super) fn template(
    ctx: &Context,
    param: &Param<Option<PathBuf>>,
    default: &str,
    values: &[&str],
) -> Result<String, StepError> {
    let Some(path) = ctx.get(param)? else { return Ok(default.to_string()) };
    let text = crate::stdlib::read_to_string(&path)
        .map_err(|e| StepError::Failed(format!("cannot read `{}`: {e}", path.display())))?;
    prompt::check(&text, values)
        .map_err(|e| StepError::Failed(format!("template `{}` cannot be used: {e}", path.display())))?;
    Ok(text)
}

/// Samples `requests` with the step's model, writing the samples `make` builds from each answer
/// (request, the answer's `sample_id`, the answer) as each group of requests finishes; skips the
/// requests an unfinished earlier run completed.
pub(super) fn sample_all(
    ctx: &Context,
    requests: &[Request],
    sample_id: &dyn Fn(usize, usize) -> String,
    make: &dyn Fn(usize, String, Generated) -> Sample,
) -> Result<Outcome, StepError> {
    let (model, props) = ctx.model.as_ref().ok_or_else(|| StepError::Failed("the step names no model".into()))?;
    let settings = super::model::settings(props, &|m| ctx.message(m)).map_err(StepError::Failed)?;
    let (mut writer, kept) = ctx.records()?;
    let mut kept_samples: Vec<Sample> = kept.iter().map_while(|l| serde_json::from_str(l).ok()).collect();
    // Whole requests only (each group is appended at once), and only while the kept samples are,
    // in order, the requests' own: a file edited or written twice is not counted by its length.
    let mut done = 0;
    let mut covered = 0;
    while done < requests.len()
        && (0..requests[done].seeds.len())
            .all(|i| kept_samples.get(covered + i).is_some_and(|s| s.sample_id == sample_id(done, i)))
    {
        covered += requests[done].seeds.len();
        done += 1;
    }
    kept_samples.truncate(covered);
    writer.keep_first(covered)?;
    let kept_tokens: u64 = kept_samples.iter().filter_map(|s| s.tokens).map(u64::from).sum();
    let mut tokens = kept_tokens;
    let mut count = kept_samples.len();
    let adapter = adapter(ctx)?;
    let failure = std::cell::RefCell::new(None);
    let total = requests.len();
    let mut progress = |finished: usize, group: &[Vec<Generated>]| {
        let first = done + finished - group.len();
        let samples: Vec<Sample> = group
            .iter()
            .enumerate()
            .flat_map(|(i, answers)| {
                let r = first + i;
                answers.iter().enumerate().map(move |(j, g)| make(r, sample_id(r, j), g.clone()))
            })
            .collect();
        tokens += samples.iter().filter_map(|s| s.tokens).map(u64::from).sum::<u64>();
        count += samples.len();
        if failure.borrow().is_none()
            && let Err(e) = writer.append(&samples)
        {
            *failure.borrow_mut() = Some(StepError::from(e));
        }
        ctx.progress((done + finished) as u64, total as u64);
    };
    let sampling = sampling(ctx)?;
    // A write that failed stops the sampling: what follows could not be kept in order.
    let cancelled = || failure.borrow().is_some() || ctx.check_cancelled().is_err();
    let work = Generation {
        settings: &settings,
        adapter: adapter.as_ref().map(|(p, s)| (p.as_path(), *s)),
        requests: &requests[done..],
        sampling: &sampling,
    };
    let generated = ctx.resources.inference(model, &settings).generate(&work, &cancelled, &mut progress);
    if let Some(failure) = failure.into_inner() {
        return Err(failure);
    }
    let (_, timing) = generated.map_err(|e| {
        if ctx.check_cancelled().is_err() { StepError::Cancelled } else { StepError::Failed(e.to_string()) }
    })?;
    writer.finish()?;
    let mut metrics = Metrics::from([("count".to_string(), count as f64), ("tokens".to_string(), tokens as f64)]);
    if timing.prompt_tokens > 0 {
        metrics.insert("prompt-tokens".to_string(), timing.prompt_tokens as f64);
    }
    if timing.generation_seconds > 0.0 {
        let generated = tokens - kept_tokens;
        metrics.insert("tokens-per-second".to_string(), generated as f64 / timing.generation_seconds);
        metrics.insert("decode-share".to_string(), timing.decoding_seconds / timing.generation_seconds);
    }
    Ok(Outcome { metrics, gate_failure: None })
}

/// A sample from a model's answer to `task`.
pub(super) fn sample(task: &Task, sample_id: String, generated: Generated) -> Sample {
    let signature = (task.style == TaskStyle::Humaneval).then_some(task.prompt.as_str());
    Sample {
        task_id: task.task_id.clone(),
        sample_id,
        code: extract::extract_code(&generated.text, task.entry_point.as_deref(), signature),
        task: task.clone(),
        logprob: Some(generated.mean_logprob),
        tokens: Some(generated.tokens),
        answer: Some(generated.text),
        parent: None,
    }
}

/// The user messages asking to solve `tasks`: through the step's template (its `param`), or the
/// built-in one for the task's style. `finetune-lora` trains on the same messages.
pub(super) fn solve_messages<'a>(
    ctx: &Context,
    param: &Param<Option<PathBuf>>,
    tasks: impl Iterator<Item = &'a Task>,
) -> Result<Vec<String>, StepError> {
    let custom = template(ctx, param, "", prompt::SOLVE_VALUES)?;
    Ok(tasks
        .map(|task| {
            let template = if custom.is_empty() { prompt::default_template(task.style) } else { custom.as_str() };
            prompt::solve(template, task)
        })
        .collect())
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let tasks: Vec<Task> = ctx.read(&TASKS)?;
    let samples = ctx.get(&SAMPLES)? as usize;
    let messages = solve_messages(ctx, &TEMPLATE, tasks.iter())?;
    let requests: Vec<Request> = tasks
        .iter()
        .zip(messages)
        .map(|(task, message)| Request {
            examples: vec![],
            message,
            seeds: (0..samples).map(|i| sample_seed(ctx.seed, &ctx.step, &task.task_id, i)).collect(),
        })
        .collect();
    sample_all(ctx, &requests, &|r, i| format!("{}/{i}", tasks[r].task_id), &|r, id, g| sample(&tasks[r], id, g))
}
