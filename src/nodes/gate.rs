use crate::dsl::schema::{Artifact, KindSpec, MetricRef, Role, ValueType, params};
use crate::nodes::context::{Context, Outcome, StepError};

pub static SPEC: KindSpec = KindSpec {
    name: "gate",
    role: Role::Step(Artifact::Check),
    doc: "Checks a metric of another step against a threshold or a baseline. When the metric is \
          below `at-least`, above `at-most`, or below the `baseline` metric by more than \
          `margin`, the run goes on but ends with exit code 3, and the failure is in \
          `summary.json`, the report and the CI events; use it to stop a CI pipeline when an \
          adapted model got worse. A metric its step did not publish (training on no examples \
          has no loss) fails the gate, and the gate publishes no `value`.",
    properties: &[METRIC.spec, AT_LEAST.spec, AT_MOST.spec, BASELINE.spec, MARGIN.spec],
    metrics: &["value", "passed"],
    at_least_one: &["at-least", "at-most", "baseline"],
    requires: &[("margin", "baseline")],
    ordered: &[("at-least", "at-most")],
    distinct: &[("baseline", "metric")],
    metrics_needing: &[],
    check_values: None,
    unkeyed: &[],
    example: r#"dataset "train" format="mbpp" path="examples/data/mbpp/train.jsonl" limit=10
dataset "test" format="mbpp" path="examples/data/mbpp/test.jsonl" limit=10
execute "references" code="train"
execute "held-out" code="test"
gate "references-pass" metric="references.pass-rate" at-least=1.0
gate "as-good" metric="held-out.pass-rate" baseline="references.pass-rate" margin=0.05
"#,
};

params! {
    /// The metric to check, as `step.metric` (or `loop.step.metric`).
    METRIC: MetricRef = required("metric", ValueType::Metric);
    /// Fail when the metric is below this.
    AT_LEAST: Option<f64> = unset("at-least", ValueType::Number { min: f64::NEG_INFINITY, max: f64::INFINITY });
    /// Fail when the metric is above this.
    AT_MOST: Option<f64> = unset("at-most", ValueType::Number { min: f64::NEG_INFINITY, max: f64::INFINITY });
    /// Fail when the metric is below this other metric (for example the base model's pass@1).
    BASELINE: Option<MetricRef> = unset("baseline", ValueType::Metric);
    /// How far below `baseline` the metric may fall before the gate fails.
    MARGIN: f64 = optional("margin", ValueType::Number { min: 0.0, max: f64::INFINITY }, "0.0");
}

/// The bounds a metric must keep.
#[derive(Debug, Default)]
pub struct Bounds {
    pub at_least: Option<f64>,
    pub at_most: Option<f64>,
    /// The baseline metric's name and value, and the margin allowed below it.
    pub baseline: Option<(String, f64, f64)>,
}

/// The check itself: `None` when the value is within bounds, else why not.
pub fn check(name: &str, value: f64, bounds: &Bounds) -> Option<String> {
    if let Some(low) = bounds.at_least.filter(|low| value < *low || value.is_nan()) {
        return Some(format!("{name} = {value} is below {low}"));
    }
    if let Some(high) = bounds.at_most.filter(|high| value > *high || value.is_nan()) {
        return Some(format!("{name} = {value} is above {high}"));
    }
    // A small tolerance, so that a drop of exactly `margin` (0.8 -> 0.7 by 0.1) is within it.
    if let Some((base_name, base, margin)) = &bounds.baseline
        && (base - value > margin + 1e-9 || value.is_nan() || base.is_nan())
    {
        let allowed = if *margin > 0.0 { format!(" by more than {margin}") } else { String::new() };
        return Some(format!("{name} = {value} is below the baseline {base_name} = {base}{allowed}"));
    }
    None
}

/// The metric a property names and its value (the step that publishes it is the property's
/// input), or why it has none: a step can leave a metric out (training on no examples has no loss).
fn metric(
    ctx: &Context,
    property: &str,
    MetricRef { step, metric }: MetricRef,
) -> Result<(String, Result<f64, String>), StepError> {
    let published =
        &ctx.inputs.get(property).ok_or_else(|| StepError::Failed(format!("input `{property}` is missing")))?.metrics;
    let value = published
        .get(&metric)
        .copied()
        .ok_or_else(|| format!("`{step}` published no `{metric}`, so the gate cannot pass"));
    Ok((format!("{step}.{metric}"), value))
}

pub fn run(ctx: &mut Context) -> Result<Outcome, StepError> {
    let (name, value) = metric(ctx, METRIC.name(), ctx.get(&METRIC)?)?;
    let margin = ctx.get(&MARGIN)?;
    let baseline = match ctx.get(&BASELINE)? {
        Some(reference) => Some(metric(ctx, BASELINE.name(), reference)?),
        None => None,
    };
    let (at_least, at_most) = (ctx.get(&AT_LEAST)?, ctx.get(&AT_MOST)?);
    let published = value.as_ref().ok().copied();
    let failure = match (value, baseline) {
        (Err(unpublished), _) | (_, Some((_, Err(unpublished)))) => Some(unpublished),
        (Ok(value), baseline) => {
            let baseline = baseline.map(|(base_name, base)| (base_name, base.unwrap_or(f64::NAN), margin));
            check(&name, value, &Bounds { at_least, at_most, baseline })
        }
    };
    let mut metrics: crate::store::meta::Metrics =
        [("passed".to_string(), f64::from(u8::from(failure.is_none())))].into();
    if let Some(value) = published {
        metrics.insert("value".to_string(), value);
    }
    Ok(Outcome { metrics, gate_failure: failure })
}

#[cfg(test)]
mod tests {
    use super::{Bounds, check};

    #[test]
    fn fails_outside_bounds() {
        let at_least = Bounds { at_least: Some(0.3), ..Bounds::default() };
        assert_eq!(check("s.pass@1", 0.3, &at_least), None);
        assert_eq!(check("s.pass@1", 0.29, &at_least).as_deref(), Some("s.pass@1 = 0.29 is below 0.3"));
        let at_most = Bounds { at_most: Some(2.0), ..Bounds::default() };
        assert_eq!(check("s.loss", 2.5, &at_most).as_deref(), Some("s.loss = 2.5 is above 2"));
        assert!(check("s.loss", f64::NAN, &at_least).is_some());
    }

    #[test]
    fn fails_below_the_baseline_by_more_than_the_margin() {
        let baseline = |margin| Bounds { baseline: Some(("b.pass@1".into(), 0.4, margin)), ..Bounds::default() };
        assert_eq!(check("s.pass@1", 0.4, &baseline(0.0)), None);
        assert_eq!(
            check("s.pass@1", 0.38, &baseline(0.0)).as_deref(),
            Some("s.pass@1 = 0.38 is below the baseline b.pass@1 = 0.4")
        );
        assert_eq!(check("s.pass@1", 0.38, &baseline(0.05)), None);
        let exactly = Bounds { baseline: Some(("b.pass@1".into(), 0.8, 0.1)), ..Bounds::default() };
        assert_eq!(check("s.pass@1", 0.7, &exactly), None);
        assert_eq!(
            check("s.pass@1", 0.3, &baseline(0.05)).as_deref(),
            Some("s.pass@1 = 0.3 is below the baseline b.pass@1 = 0.4 by more than 0.05")
        );
    }
}
