use crate::data::{Sample, Status, Task, Verdict};
use std::path::{Path, PathBuf};

use crate::dsl::schema::{
    AdapterSource, Artifact, Input, KindSpec, ModelName, Param, Props, Role, Value, ValueType, params,
};
use crate::llm;
use crate::nodes::context::{Context, Outcome, StepError};
use crate::train::{self, Base, Config, Example, Lora, Precision, StepRecord, Target};

/// Most epochs: a bound that catches a mistyped value before a training run that would not end.
const MOST_EPOCHS: i64 = 10_000;

pub static SPEC: KindSpec = KindSpec {
    name: "finetune-lora",
    role: Role::Step(Artifact::Adapter),
    doc: "Trains a LoRA adapter on (requirement -> code) pairs: passing samples or verdicts, or a \
          dataset's reference solutions. The base model is the model's own weights (its GGUF \
          file, or its Hugging Face directory), frozen; only the LoRA matrices train, with the \
          loss on the completion tokens only. The adapter is written in llama.cpp's GGUF LoRA format (for `adapter=`) and as a PEFT directory. \
          `init` continues training an earlier adapter (keeping its rank, alpha and targets). \
          Training text is the prompt `generate` sends for the task (same template) followed by \
          the code in a fenced block, tokenized by the model's own tokenizer (a Hugging Face \
          directory's prompt is its Jinja chat template, as the server of that directory renders \
          it). The step directory holds `adapter.gguf`, `peft/` (`adapter_config.json`, `adapter_model.safetensors`) and \
          the loss curve (one record per optimizer step: `step`, `epoch`, `loss`, \
          `learning_rate`, `tokens`, `seconds`), and `training-pairs.jsonl`, every (task, code) \
          pair it trained on, which a later step's `history` reads. Verdicts that did not pass \
          are skipped. The pairs are cleaned before training: a task's pairs in this step's data \
          replace its pairs in the history (one revision of a problem across iterations, the \
          newest), top-level `assert` statements (tests \
          a model wrote into its answer) removed from the code, and pairs of different tasks \
          whose code is near-identical (similarity ≥ 0.95) named in a message and counted in \
          `near-duplicates`. While it trains, `checkpoint.safetensors` (written every minute and on \
          interruption) lets `--resume` continue where an interrupted training stopped.",
    properties: &[
        MODEL.spec,
        DATA.spec,
        INIT.spec,
        HISTORY.spec,
        RANK.spec,
        ALPHA.spec,
        DROPOUT.spec,
        TARGETS.spec,
        EPOCHS.spec,
        LEARNING_RATE.spec,
        WARMUP.spec,
        BATCH.spec,
        MAX_LENGTH.spec,
        TEMPLATE.spec,
        PRECISION.spec,
    ],
    metrics: &["loss", "first-loss", "steps", "examples", "history", "tokens", "near-duplicates"],
    at_least_one: &[],
    requires: &[],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: Some(check_values),
    unkeyed: &[],
    example: r#"model "coder" path="default"
dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=50
finetune-lora "tune" model="coder" data="train" rank=8 alpha=16 epochs=2 learning-rate=0.0002
"#,
};

/// Values with which nothing would train, and a `rank` larger than the model's projections, found
/// before the steps ahead of training run. With `init` the earlier adapter's rank, alpha and
/// targets are used (its check is the adapter's).
fn check_values(props: &Props, model: Option<&Path>) -> Result<(), (&'static str, String)> {
    if props.param(&LEARNING_RATE) == Some(0.0) {
        return Err((LEARNING_RATE.name(), "at `learning-rate=0` nothing trains: give a positive rate".into()));
    }
    let fresh = props.get(INIT.name()).is_none();
    if fresh && props.param(&ALPHA) == Some(0.0) {
        return Err((ALPHA.name(), "`alpha=0` scales the adapter's update to nothing: give a positive alpha".into()));
    }
    let Some(model) = model.filter(|_| fresh) else { return Ok(()) };
    let (Some(rank), Some(targets)) = (props.param(&RANK), props.param(&TARGETS)) else { return Ok(()) };
    Lora::check_rank(model, rank as usize, &targets).map_err(|why| (RANK.name(), why))
}

params! {
    /// The base `model`.
    MODEL: ModelName = required("model", ValueType::Model);
    /// Training pairs: passing verdicts or samples, or tasks' reference solutions.
    DATA: Input = required("data", ValueType::Input(&[Artifact::Verdicts, Artifact::Samples, Artifact::Tasks]));
    /// An adapter to continue training: a `finetune-lora` step (for example `prev.tune`), a GGUF LoRA file
    /// (`….gguf`) or a PEFT directory (a path with a `/`). It keeps its own rank, alpha and targets.
    INIT: Option<AdapterSource> = unset("init", ValueType::Adapter);
    /// Also train on every pair that adapter's step trained on (for example `prev.tune`). Without `init`, each
    /// loop iteration then trains afresh from the base model on all data so far; with it, it continues the
    /// adapter on all data so far.
    HISTORY: Option<Input> = unset("history", ValueType::Input(&[Artifact::Adapter]));
    /// LoRA rank; a projection with both sides smaller than it is an error.
    RANK: i64 = optional("rank", ValueType::at_least(1), "8");
    /// LoRA alpha; the update is scaled by alpha / rank.
    ALPHA: f64 = optional("alpha", ValueType::Number { min: 0.0, max: f64::INFINITY }, "16");
    /// Dropout on the LoRA input: the share of its values zeroed at each step (at 1 nothing would train).
    DROPOUT: f64 = optional("dropout", ValueType::Number { min: 0.0, max: 0.9 }, "0.0");
    /// Projections that get LoRA matrices.
    TARGETS: Vec<Target> = optional("targets", ValueType::Choices(Target::NAMES), r#""q,k,v,o,gate,up,down""#);
    /// Passes over the data.
    EPOCHS: i64 = optional("epochs", ValueType::Integer { min: 1, max: MOST_EPOCHS }, "2");
    /// Peak AdamW learning rate.
    LEARNING_RATE: f64 = optional("learning-rate", ValueType::Number { min: 0.0, max: 1.0 }, "0.0002");
    /// Fraction of steps spent warming up.
    WARMUP: f64 = optional("warmup", ValueType::Number { min: 0.0, max: 1.0 }, "0.1");
    /// Examples per optimizer step (by gradient accumulation).
    BATCH: i64 = optional("batch", ValueType::at_least(1), "1");
    /// Longest training sequence in tokens; longer ones are cut.
    MAX_LENGTH: i64 = optional("max-length", ValueType::at_least(16), "512");
    /// The prompt template, as `generate`'s `template` (the built-in one by default).
    TEMPLATE: Option<PathBuf> = unset("template", ValueType::Template(crate::llm::prompt::SOLVE_VALUES));
    /// How the frozen weights multiply: `f32`, or `bf16` (weights and activations rounded to bfloat16, sums in f32)
    /// on the AMX tile units of Intel Xeons since Sapphire Rapids, about 3× the f32 rate there; `auto` is bf16 where
    /// the CPU has AMX and f32 elsewhere. The LoRA matrices, their gradients and the optimizer are f32 in every case.
    PRECISION: Precision = optional("precision", ValueType::Choice(Precision::NAMES), r#""auto""#);
}

/// The adapter file a `finetune-lora` step writes in its directory (what `adapter=` reads).
pub const ADAPTER_FILE: &str = "adapter.gguf";

/// Where a step writes the PEFT export of its adapter, beside its [`ADAPTER_FILE`].
pub const PEFT_DIR: &str = "peft";

/// The GGUF file an adapter property names: a GGUF LoRA file as given, a PEFT directory
/// converted into the step's directory, or the [`ADAPTER_FILE`] of the `finetune-lora` step it
/// names. `None` when unset, or when that step is `prev.` and this is a loop's first iteration.
pub(super) fn adapter_file(ctx: &Context, param: &Param<Option<AdapterSource>>) -> Result<Option<PathBuf>, StepError> {
    Ok(match ctx.get(param)? {
        None => None,
        Some(AdapterSource::File(path)) if path.is_dir() => Some(from_peft(ctx, &path)?),
        Some(AdapterSource::File(path)) => Some(path),
        Some(AdapterSource::Step) => ctx.inputs.get(param.name()).map(|step| step.dir.join(ADAPTER_FILE)),
    })
}

/// A PEFT adapter directory as llama.cpp reads adapters: in GGUF, written to `from-peft/` in the
/// step's directory with a PEFT export beside it (what a vLLM server is given), as a
/// `finetune-lora` step writes its own.
fn from_peft(ctx: &Context, dir: &Path) -> Result<PathBuf, StepError> {
    let (_, props) = ctx.model.as_ref().ok_or_else(|| StepError::Failed("the step names no model".into()))?;
    let model = super::model::settings(props, &|m| ctx.message(m)).map_err(StepError::Failed)?;
    let failed =
        |e: candle_core::Error| StepError::Failed(format!("cannot use the PEFT adapter `{}`: {e}", dir.display()));
    let config = Config::read(&model.path).map_err(failed)?;
    let lora = Lora::load_peft(dir, &config).map_err(failed)?;
    let converted = ctx.dir.join("from-peft");
    std::fs::create_dir_all(&converted).map_err(StepError::from)?;
    let file = converted.join(ADAPTER_FILE);
    lora.save_gguf(&file, config.architecture).map_err(failed)?;
    lora.save_peft(&converted.join(PEFT_DIR), &config).map_err(failed)?;
    Ok(file)
}

/// What an interrupted training resumes from (see `train::train`); removed once it is done.
const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Every (task, code) pair a step trained on, in its directory, for later steps' `history`.
const PAIRS_FILE: &str = "training-pairs.jsonl";

#[derive(serde::Serialize, serde::Deserialize)]
struct Pair {
    task: Task,
    code: String,
}

/// The pairs the `history` input's step trained on.
fn history_pairs(ctx: &Context) -> Result<Vec<(Task, String)>, StepError> {
    let Some(history) = ctx.optional_input(&HISTORY) else {
        return Ok(vec![]);
    };
    let path = history.dir.join(PAIRS_FILE);
    let pairs: Vec<Pair> = crate::store::read_records(&path)
        .map_err(|e| StepError::Failed(format!("cannot read the history `{}`: {e}", path.display())))?;
    Ok(pairs.into_iter().map(|p| (p.task, p.code)).collect())
}

/// (task, code) pairs to train on, from the `data` input.
fn training_pairs(ctx: &Context) -> Result<Vec<(Task, String)>, StepError> {
    let data = ctx.input(&DATA)?;
    Ok(match data.artifact {
        Artifact::Verdicts => ctx
            .read::<Verdict>(&DATA)?
            .into_iter()
            .filter(|v| v.status == Status::Passed)
            .map(|v| (v.sample.task, v.sample.code))
            .collect(),
        Artifact::Samples => ctx.read::<Sample>(&DATA)?.into_iter().map(|s| (s.task, s.code)).collect(),
        _ => ctx.read::<Task>(&DATA)?.into_iter().filter_map(|t| t.reference.clone().map(|code| (t, code))).collect(),
    })
}

/// Pairs of different tasks whose code is this alike are named as near-duplicates.
const NEAR_DUPLICATE: f64 = 0.95;

/// The pairs to train on, cleaned: the `history` pairs of a task this step has data for are
/// replaced by that data (the newest revision of a problem, not every one since the first
/// iteration), and no code keeps a top-level `assert`. Each pair is marked as from history or not.
fn clean(history: Vec<(Task, String)>, data: Vec<(Task, String)>) -> Vec<(Task, String, bool)> {
    let fresh: std::collections::BTreeSet<String> = data.iter().map(|(task, _)| task.task_id.clone()).collect();
    let kept = history.into_iter().filter(|(task, _)| !fresh.contains(&task.task_id)).map(|pair| (pair, true));
    kept.chain(data.into_iter().map(|pair| (pair, false)))
        .map(|((task, code), from_history)| (task, without_asserts(&code), from_history))
        .collect()
}

/// `code` without its top-level `assert` statements (and their continuation lines): tests the
/// model appended to its answer, which training would teach it to write again.
fn without_asserts(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut in_assert = false;
    for line in code.lines() {
        let top_level = !line.starts_with([' ', '\t']) && !line.trim().is_empty();
        if top_level {
            in_assert = line.starts_with("assert ") || line.starts_with("assert(");
        }
        if !in_assert {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.trim_end().to_string() + "\n"
}

/// Pairs of different tasks with near-identical code, as (task, task, similarity).
fn near_duplicates(pairs: &[(Task, String, bool)]) -> Vec<(String, String, f64)> {
    let mut found = vec![];
    for (i, (a, code_a, _)) in pairs.iter().enumerate() {
        for (b, code_b, _) in &pairs[i + 1..] {
            // Lengths this far apart cannot reach the threshold: skip the edit distance.
            let (short, long) = (code_a.len().min(code_b.len()), code_a.len().max(code_b.len()));
            if (short as f64) < long as f64 * NEAR_DUPLICATE {
                continue;
            }
            let alike = crate::data::similarity(code_a, code_b);
            if alike >= NEAR_DUPLICATE {
                found.push((a.task_id.clone(), b.task_id.clone(), alike));
            }
        }
    }
    found
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let (_, props) = ctx.model.as_ref().ok_or_else(|| StepError::Failed("the step names no model".into()))?;
    let model = super::model::settings(props, &|m| ctx.message(m)).map_err(StepError::Failed)?;
    let failed = |e: candle_core::Error| {
        if ctx.check_cancelled().is_err() { StepError::Cancelled } else { StepError::Failed(e.to_string()) }
    };
    let training = clean(history_pairs(ctx)?, training_pairs(ctx)?);
    // In SEED an iteration where no revision passed has nothing to learn: the run goes on with an
    // adapter that changes nothing, and says so.
    if training.is_empty() {
        let data = ctx.input(&DATA)?;
        let what = match data.artifact {
            Artifact::Verdicts => "no passing verdict",
            Artifact::Samples => "no sample",
            _ => "no task with a reference solution",
        };
        let from = match ctx.props.get(DATA.name()) {
            Some(Value::Reference(step)) => step.as_str(),
            _ => DATA.name(),
        };
        ctx.message(&format!("nothing to train on ({what} in `{from}`): the adapter is untrained and changes nothing"));
    }
    let duplicates = near_duplicates(&training);
    if !duplicates.is_empty() {
        let named: Vec<String> = duplicates.iter().map(|(a, b, alike)| format!("{a} ~ {b} ({alike:.2})")).collect();
        ctx.message(&format!("near-duplicate training pairs (different tasks, alike code): {}", named.join(", ")));
    }
    let messages = super::generate::solve_messages(ctx, &TEMPLATE, training.iter().map(|(task, _, _)| task))?;
    let pairs: Vec<(String, String)> = messages
        .into_iter()
        .zip(&training)
        .map(|(message, (_, code, _))| (message, format!("```python\n{}\n```", code.trim_end())))
        .collect();
    let max_length = ctx.get(&MAX_LENGTH)? as usize;
    // Examples whose prompt fills max-length are skipped; the rest are cut to it. The pairs kept
    // are what a later step's `history` takes over.
    let (mut examples, mut kept_pairs, mut history_kept) = (vec![], String::new(), 0);
    let tokenized = llm::training_tokens(&model, &pairs).map_err(|e| StepError::Failed(e.to_string()))?;
    for ((mut tokens, completion_start), (task, code, from_history)) in tokenized.into_iter().zip(training) {
        if completion_start >= max_length {
            continue;
        }
        tokens.truncate(max_length);
        examples.push(Example { tokens, completion_start });
        history_kept += usize::from(from_history);
        let pair = serde_json::to_string(&Pair { task, code }).map_err(|e| StepError::Failed(e.to_string()))?;
        kept_pairs.push_str(&pair);
        kept_pairs.push('\n');
    }
    crate::store::write_atomic(&ctx.dir.join(PAIRS_FILE), kept_pairs.as_bytes())?;
    if examples.len() < pairs.len() {
        ctx.message(&format!(
            "{} of {} examples have prompts longer than max-length={max_length} and are skipped",
            pairs.len() - examples.len(),
            pairs.len()
        ));
    }

    ctx.message("reading the base model for training");
    let bf16 = ctx.get(&PRECISION)?.bf16().map_err(StepError::Failed)?;
    if bf16 {
        ctx.message("the frozen weights multiply in bf16 on this CPU's AMX units (precision)");
    }
    let base = Base::load(&model.path, bf16).map_err(failed)?;
    let lora = match adapter_file(ctx, &INIT)? {
        Some(path) => {
            let lora = Lora::load_gguf(&path, &base).map_err(failed)?;
            // Continued, an adapter keeps its own shape: say so where the step asks for another.
            let (rank, alpha) = (ctx.get(&RANK)? as usize, ctx.get(&ALPHA)? as f32);
            if (lora.rank, lora.alpha) != (rank, alpha) {
                ctx.message(&format!(
                    "`init`'s adapter keeps its own rank {} and alpha {} (this step's rank={rank} alpha={alpha} are not used)",
                    lora.rank, lora.alpha
                ));
            }
            lora
        }
        None => {
            let targets = ctx.get(&TARGETS)?;
            let rank = ctx.get(&RANK)? as usize;
            let alpha = ctx.get(&ALPHA)? as f32;
            Lora::new(&base, rank, alpha, &targets, ctx.seed).map_err(failed)?
        }
    };
    let settings = train::Settings {
        epochs: ctx.get(&EPOCHS)? as usize,
        learning_rate: ctx.get(&LEARNING_RATE)?,
        warmup: ctx.get(&WARMUP)?,
        batch: ctx.get(&BATCH)? as usize,
        dropout: ctx.get(&DROPOUT)? as f32,
        seed: ctx.seed,
    };
    // The loss curve is written afresh: a resumed training replays the steps its checkpoint holds.
    let checkpoint = ctx.dir.join(CHECKPOINT_FILE);
    if checkpoint.exists() {
        ctx.message("resuming the training from its checkpoint");
    }
    let mut writer = ctx.fresh_records()?;
    let mut write_failure = None;
    let mut on_step = |record: &StepRecord, total: usize| {
        if let Err(e) = writer.append(std::slice::from_ref(record)) {
            write_failure.get_or_insert(e);
        }
        ctx.progress_with(record.step as u64, total as u64, Some(format!("loss {:.4}", record.loss)));
    };
    let cancelled = || ctx.check_cancelled().is_err();
    let records = train::train(&base, &lora, &examples, &settings, Some(&checkpoint), &cancelled, &mut on_step)
        .map_err(failed)?;
    if let Some(e) = write_failure {
        return Err(e.into());
    }
    lora.save_gguf(&ctx.dir.join(ADAPTER_FILE), base.config.architecture).map_err(failed)?;
    lora.save_peft(&ctx.dir.join(PEFT_DIR), &base.config).map_err(failed)?;
    writer.finish()?;
    // Not part of the output: the step's output hash covers every file in its directory.
    if checkpoint.exists() {
        std::fs::remove_file(&checkpoint)?;
    }

    let last_epoch: Vec<f64> = records.iter().filter(|r| r.epoch == settings.epochs).map(|r| r.loss).collect();
    let mut metrics: crate::store::meta::Metrics = [
        ("steps".to_string(), records.len() as f64),
        ("examples".to_string(), examples.len() as f64),
        ("history".to_string(), history_kept as f64),
        // Summed as integers: a sum of no floats is -0.
        ("tokens".to_string(), records.iter().map(|r| r.tokens).sum::<usize>() as f64),
        ("near-duplicates".to_string(), duplicates.len() as f64),
    ]
    .into();
    if let Some(first) = records.first() {
        metrics.insert("first-loss".into(), first.loss);
        metrics.insert("loss".into(), last_epoch.iter().sum::<f64>() / last_epoch.len().max(1) as f64);
    }
    Ok(Outcome { metrics, gate_failure: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(task: &str, code: &str) -> (Task, String) {
        (Task::example(task), code.to_string())
    }

    #[test]
    fn the_newest_pairs_of_a_task_replace_its_history() {
        let history = vec![pair("a", "def f():\n    return 1\n"), pair("b", "def g():\n    return 2\n")];
        let data = vec![pair("a", "def f():\n    return 3\n"), pair("c", "x = 1\n"), pair("c", "x = 2\n")];
        let cleaned = clean(history, data);
        let kept: Vec<(&str, &str, bool)> =
            cleaned.iter().map(|(t, code, history)| (t.task_id.as_str(), code.as_str(), *history)).collect();
        assert_eq!(
            kept,
            [
                ("b", "def g():\n    return 2\n", true),
                ("a", "def f():\n    return 3\n", false),
                ("c", "x = 1\n", false),
                ("c", "x = 2\n", false)
            ]
        );
    }

    #[test]
    fn test_asserts_are_not_trained_on() {
        let code =
            "def f(x):\n    assert x > 0\n    return x\n\nassert f(1) == 1\nassert f(\n    2) == 2\nprint(f(3))\n";
        assert_eq!(without_asserts(code), "def f(x):\n    assert x > 0\n    return x\n\nprint(f(3))\n");
    }

    #[test]
    fn near_duplicates_are_named() {
        let long = "def total(values):\n    result = 0\n    for value in values:\n        result += value\n    return result\n";
        let pairs =
            clean(vec![], vec![pair("a", long), pair("b", &long.replace("total", "totals")), pair("c", "x = 1\n")]);
        let found = near_duplicates(&pairs);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0.as_str(), found[0].1.as_str()), ("a", "b"));
        assert!(found[0].2 > 0.95 && found[0].2 < 1.0);
    }
}
