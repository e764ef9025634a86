//! The reasons a step runs again.
//!
//! A step's key hashes its kind, parameters, the hashes of its inputs' outputs, the content of
//! the files it reads, the models it uses and the workflow seed. `meta.json`
//! ([`crate::store::meta`]) keeps the parts, so `--dry-run` can say which one changed.

use serde_json::Value as Json;

use crate::store::meta::{KeyParts, Meta, StepStatus};

/// What to do with a step, given what its directory holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The output is there and its key matches.
    Cached,
    /// An unfinished run with the same key left records to keep.
    Finish,
    /// Run from scratch, for these reasons.
    Run(Vec<String>),
}

/// Compares the step's current key parts with what its directory holds.
pub fn decide(
    previous: Option<&Meta>,
    parts: &KeyParts,
    current_output_hash: Option<&str>,
    has_partial: bool,
) -> Decision {
    let Some(previous) = previous else {
        return Decision::Run(vec!["not run before".into()]);
    };
    let mut reasons = vec![];
    if previous.parts.kind != parts.kind {
        reasons.push(format!("its kind changed from `{}` to `{}`", previous.parts.kind, parts.kind));
    }
    let names = previous.parts.params.keys().chain(parts.params.keys()).collect::<std::collections::BTreeSet<_>>();
    for name in names {
        changes(name, previous.parts.params.get(name), parts.params.get(name), &mut reasons);
    }
    for (name, hash) in &parts.inputs {
        if previous.parts.inputs.get(name) != Some(hash) {
            reasons.push(format!("input `{name}` changed"));
        }
    }
    for (name, identity) in &parts.files {
        if previous.parts.files.get(name) != Some(identity) {
            reasons.push(format!("file of `{name}` changed"));
        }
    }
    if previous.parts.seed != parts.seed {
        reasons.push(format!("workflow seed changed: {} -> {}", previous.parts.seed, parts.seed));
    }
    if !reasons.is_empty() {
        return Decision::Run(reasons);
    }
    match previous.status {
        StepStatus::Done if previous.output_hash.as_deref() == current_output_hash && current_output_hash.is_some() => {
            Decision::Cached
        }
        StepStatus::Done => Decision::Run(vec!["its output files were changed or removed".into()]),
        StepStatus::Running | StepStatus::Interrupted if has_partial => Decision::Finish,
        StepStatus::Failed => Decision::Run(vec!["it failed last time".into()]),
        StepStatus::Running | StepStatus::Interrupted => Decision::Run(vec!["it did not finish last time".into()]),
    }
}

/// What changed in a parameter: in one with parts (a model's settings), each part that changed,
/// named by its path (`model.settings.context`), rather than the whole value twice.
fn changes(name: &str, old: Option<&Json>, new: Option<&Json>, reasons: &mut Vec<String>) {
    match (old, new) {
        (Some(Json::Object(old)), Some(Json::Object(new))) => {
            let parts = old.keys().chain(new.keys()).collect::<std::collections::BTreeSet<_>>();
            for part in parts {
                changes(&format!("{name}.{part}"), old.get(part), new.get(part), reasons);
            }
        }
        // A run from before a model's setting left the key recorded it.
        (Some(_), None) if left_the_key(name) => {}
        _ if old != new => {
            let show = |v: Option<&Json>| v.map_or("unset".to_string(), |v| v.to_string());
            reasons.push(format!("parameter `{name}` changed: {} -> {}", show(old), show(new)));
        }
        _ => {}
    }
}

/// Whether a parameter's part is a model setting that cannot change outputs (`threads`), which
/// keys once held.
fn left_the_key(name: &str) -> bool {
    name.rsplit_once(".settings.").is_some_and(|(_, setting)| crate::nodes::model::SPEC.unkeyed.contains(&setting))
}

#[cfg(test)]
pub(in crate::engine) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::meta::Metrics;

    fn parts(samples: i64) -> KeyParts {
        KeyParts {
            kind: "generate".into(),
            params: [("samples".to_string(), Json::from(samples))].into(),
            inputs: [("tasks".to_string(), "abc".to_string())].into(),
            files: BTreeMap::new(),
            seed: 1,
        }
    }

    pub(in crate::engine) fn meta(parts: KeyParts, status: StepStatus) -> Meta {
        Meta {
            key: parts.key(),
            parts,
            status,
            metrics: Metrics::new(),
            output_hash: Some("out".into()),
            gate_failure: None,
            error: None,
            started_at: String::new(),
            finished_at: None,
            seconds: 0.0,
        }
    }

    #[test]
    fn says_why_a_step_runs() {
        assert_eq!(decide(None, &parts(5), None, false), Decision::Run(vec!["not run before".into()]));
        let done = meta(parts(5), StepStatus::Done);
        assert_eq!(decide(Some(&done), &parts(5), Some("out"), false), Decision::Cached);
        assert_eq!(
            decide(Some(&done), &parts(10), Some("out"), false),
            Decision::Run(vec!["parameter `samples` changed: 5 -> 10".into()])
        );
        assert_eq!(
            decide(Some(&done), &parts(5), Some("edited"), false),
            Decision::Run(vec!["its output files were changed or removed".into()])
        );
        let mut other_input = parts(5);
        other_input.inputs.insert("tasks".into(), "def".into());
        assert_eq!(
            decide(Some(&done), &other_input, Some("out"), false),
            Decision::Run(vec!["input `tasks` changed".into()])
        );
        let running = meta(parts(5), StepStatus::Running);
        assert_eq!(decide(Some(&running), &parts(5), None, true), Decision::Finish);
        assert_eq!(
            decide(Some(&running), &parts(5), None, false),
            Decision::Run(vec!["it did not finish last time".into()])
        );
    }

    #[test]
    fn keys_follow_every_part() {
        let base = parts(5);
        let mut seeded = base.clone();
        seeded.seed = 2;
        assert_ne!(base.key(), seeded.key());
        assert_ne!(base.key(), parts(6).key());
        assert_eq!(base.key(), parts(5).key());
    }
}
