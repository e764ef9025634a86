use crate::dsl::schema::{Artifact, KindSpec, Role, Value, ValueType, required, unset};
use crate::engine::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "gate",
    role: Role::Step(Artifact::Check),
    doc: "Checks a metric of another step against a threshold. When the metric is below \
          `at-least` or above `at-most`, the run goes on but ends with exit code 3, and the \
          failure is in `summary.json` and the CI events; use it to stop a CI pipeline when an \
          adapted model got worse. Give `at-least`, `at-most`, or both.",
    properties: &[
        required("metric", ValueType::Metric, "The metric to check, as `step.metric` (or `loop.step.metric`)."),
        unset(
            "at-least",
            ValueType::Number { min: f64::NEG_INFINITY, max: f64::INFINITY },
            "Fail when the metric is below this.",
        ),
        unset(
            "at-most",
            ValueType::Number { min: f64::NEG_INFINITY, max: f64::INFINITY },
            "Fail when the metric is above this.",
        ),
    ],
    metrics: &["value", "passed"],
    at_least_one: &["at-least", "at-most"],
    example: r#"dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=10
execute "references" code="train"
gate "references-pass" metric="references.pass-rate" at-least=1.0
"#,
};

/// The check itself: `None` when the value is within bounds, else why not.
pub fn check(name: &str, value: f64, at_least: Option<f64>, at_most: Option<f64>) -> Option<String> {
    if let Some(low) = at_least.filter(|low| value < *low || value.is_nan()) {
        return Some(format!("{name} = {value} is below {low}"));
    }
    if let Some(high) = at_most.filter(|high| value > *high || value.is_nan()) {
        return Some(format!("{name} = {value} is above {high}"));
    }
    None
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let Some(Value::Metric { step, metric }) = ctx.props.get("metric").cloned() else {
        return Err(StepError::Failed("no metric".into()));
    };
    let value = *ctx
        .input("metric")?
        .metrics
        .get(&metric)
        .ok_or_else(|| StepError::Failed(format!("`{step}` did not publish `{metric}`")))?;
    let failure = check(&format!("{step}.{metric}"), value, ctx.props.number("at-least"), ctx.props.number("at-most"));
    let metrics = [("value".to_string(), value), ("passed".to_string(), f64::from(u8::from(failure.is_none())))].into();
    Ok(Outcome { metrics, gate_failure: failure })
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn fails_outside_bounds() {
        assert_eq!(check("s.pass@1", 0.3, Some(0.3), None), None);
        assert_eq!(check("s.pass@1", 0.29, Some(0.3), None).as_deref(), Some("s.pass@1 = 0.29 is below 0.3"));
        assert_eq!(check("s.loss", 2.5, None, Some(2.0)).as_deref(), Some("s.loss = 2.5 is above 2"));
        assert!(check("s.loss", f64::NAN, Some(0.0), None).is_some());
    }
}
