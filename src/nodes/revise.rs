use crate::data::{Parent, Sample, Verdict, sample_seed};
use std::path::{Path, PathBuf};

use crate::dsl::schema::{Artifact, Input, KindSpec, Props, Role, ValueType, params};
use crate::llm::prompt::ReferenceMode;
use crate::llm::{Request, prompt};
use crate::nodes::context::{Context, Outcome, StepError};
use crate::nodes::generate::{
    ADAPTER, ADAPTER_SCALE, MAX_TOKENS, MODEL, MOST_SAMPLES, STOP, STOP_AFTER_CODE, TEMPERATURE, TOP_K, TOP_P,
};
use crate::store;

pub static SPEC: KindSpec = KindSpec {
    name: "revise",
    role: Role::Step(Artifact::Samples),
    doc: "Self-Revise: for each failed verdict, asks the model to fix its own code. The prompt \
          holds the requirement, the tests, the failing code, the execution feedback, the line \
          the error was raised at, and the dataset's reference solution as `reference` says: \
          `hint` shows it for orientation with the instruction to keep the model's own code, \
          `off` leaves it out, `show` presents it as the solution (a small model then mostly \
          copies it, and SEED becomes fine-tuning on references). With `examples`, a JSON-lines \
          file (`requirement`, `tests`, `code`, `feedback`, `revision`), the prompt first shows \
          worked revisions; `std/prompts/revise-examples.jsonl` holds three minimal fixes made \
          from MBPP's prompt split. None are shown by default: with them a small model's \
          revisions follow their terse lead onto the reference, and on the README's scenario \
          and five quickstart seeds it learnt as well or better without them. The worked \
          revisions are the same in every prompt: they are decoded once and copied into each \
          prompt's cache, and `prompt-tokens` counts them once. Samples `samples` revisions per \
          error, each linked to the sample it revises (`parent`), which `select`'s \
          `own-code` uses to keep edits of the model's own code. `unchanged` counts the \
          revisions that are their error code again (but for blank lines and trailing \
          whitespace): a model that did not act on the feedback, which the run also says when \
          it is most of them. `prompt-tokens`, `tokens-per-second` and `decode-share` are as \
          in `generate`.",
    properties: &[
        MODEL.spec,
        ERRORS.spec,
        ADAPTER.spec,
        ADAPTER_SCALE.spec,
        SAMPLES.spec,
        TEMPERATURE.spec,
        TOP_P.spec,
        TOP_K.spec,
        MAX_TOKENS.spec,
        STOP.spec,
        STOP_AFTER_CODE.spec,
        REFERENCE.spec,
        EXAMPLES.spec,
        TEMPLATE.spec,
    ],
    metrics: &["count", "tokens", "prompt-tokens", "tokens-per-second", "decode-share", "unchanged"],
    at_least_one: &[],
    requires: &[("adapter-scale", "adapter")],
    ordered: &[],
    distinct: &[],
    metrics_needing: &[],
    check_values: Some(check_values),
    unkeyed: &[],
    example: r#"model "coder" path="default"
dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=10
generate "attempts" model="coder" tasks="train" samples=4
execute "verdicts" code="attempts"
select "errors" from="verdicts" status="!passed" per-task=1 prefer="highest-logprob"
revise "revisions" model="coder" errors="errors" samples=4 reference="off" examples="std/prompts/revise-examples.jsonl"
"#,
};

/// A template that does not show the model the failing code it revises. (One without the
/// feedback is an ablation; an unreadable template is the template check's to report.)
fn check_values(props: &Props, _model: Option<&Path>) -> Result<(), (&'static str, String)> {
    let Some(path) = props.param(&TEMPLATE).flatten() else { return Ok(()) };
    let Ok(template) = crate::stdlib::read_to_string(&path) else { return Ok(()) };
    if prompt::uses(&template, "code") {
        return Ok(());
    }
    Err((TEMPLATE.name(), "the template has no `{{code}}`: a revision revises the failing code it is shown".into()))
}

params! {
    /// Verdicts of the programs to revise.
    ERRORS: Input = required("errors", ValueType::Input(&[Artifact::Verdicts]));
    /// Revisions per error.
    SAMPLES: i64 = optional("samples", ValueType::Integer { min: 1, max: MOST_SAMPLES }, "4");
    /// How the prompt shows the dataset's reference solution.
    REFERENCE: ReferenceMode = optional("reference", ValueType::Choice(ReferenceMode::NAMES), r#""hint""#);
    /// Worked revisions shown first (few-shot), as JSON lines.
    EXAMPLES: Option<PathBuf> = unset("examples", ValueType::RevisionExamples);
    /// A prompt template replacing the built-in one.
    TEMPLATE: Option<PathBuf> = unset("template", ValueType::Template(prompt::REVISE_VALUES));
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let errors: Vec<Verdict> = ctx.read(&ERRORS)?;
    let samples = ctx.get(&SAMPLES)? as usize;
    let reference = ctx.get(&REFERENCE)?;
    let default = crate::stdlib::file(prompt::REVISE_TEMPLATE).map_or("", |(_, t)| t);
    let template = super::generate::template(ctx, &TEMPLATE, default, prompt::REVISE_VALUES)?;
    let examples = examples(ctx, &template)?;
    let requests: Vec<Request> = errors
        .iter()
        .map(|verdict| Request {
            examples: examples.clone(),
            message: prompt::revise(&template, verdict, reference),
            seeds: (0..samples).map(|i| sample_seed(ctx.seed, &ctx.step, &verdict.sample.sample_id, i)).collect(),
        })
        .collect();
    let sample_id = |r: usize, i: usize| format!("{}/r{i}", errors[r].sample.sample_id);
    let mut outcome = super::generate::sample_all(ctx, &requests, &sample_id, &|r, id, g| {
        let parent = &errors[r].sample;
        let mut revision = super::generate::sample(&parent.task, id, g);
        revision.parent = Some(Parent { sample_id: parent.sample_id.clone(), code: parent.code.clone() });
        revision
    })?;
    // Read back rather than counted as they come, so a resumed step counts the kept ones too.
    let revisions: Vec<Sample> = store::read_records(&ctx.dir.join(store::RECORDS))
        .map_err(|e| StepError::Failed(format!("cannot read the revisions back: {e}")))?;
    let unchanged = revisions.iter().filter(|r| r.unchanged() == Some(true)).count();
    outcome.metrics.insert("unchanged".to_string(), unchanged as f64);
    if unchanged * 2 > revisions.len() {
        ctx.message(&format!(
            "{unchanged} of {} revisions are the failing code unchanged: the model did not act on the feedback",
            revisions.len()
        ));
    }
    Ok(outcome)
}

/// The turns of the step's `examples` file (none without one).
fn examples(ctx: &Context, template: &str) -> Result<Vec<(String, String)>, StepError> {
    let Some(path) = ctx.get(&EXAMPLES)? else {
        return Ok(vec![]);
    };
    let text = crate::stdlib::read_to_string(&path)
        .map_err(|e| StepError::Failed(format!("cannot read `{}`: {e}", path.display())))?;
    let examples = prompt::revision_examples(&text)
        .map_err(|e| StepError::Failed(format!("`{}` cannot be used: {e}", path.display())))?;
    Ok(examples.iter().map(|example| prompt::revise_example(template, example)).collect())
}
