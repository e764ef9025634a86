//! Step cache keys and the reasons a step runs again.
//!
//! A step's key hashes its kind, parameters, the hashes of its inputs' outputs, the content of
//! the files it reads, the models it uses and the workflow seed. `meta.json` keeps the parts, so
//! `--dry-run` can say which one changed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::files::{hash_file, sha256_hex};

pub type Metrics = BTreeMap<String, f64>;

/// Everything that decides a step's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    pub kind: String,
    pub params: BTreeMap<String, Json>,
    /// Output hash of each input, by property; `none` for `prev.` in the first iteration.
    pub inputs: BTreeMap<String, String>,
    /// Identity of each file read, by property.
    pub files: BTreeMap<String, String>,
    pub seed: u64,
}

impl KeyParts {
    pub fn key(&self) -> String {
        // Serializing maps of strings and JSON values cannot fail.
        sha256_hex(&serde_json::to_vec(self).unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Running,
    Done,
    Failed,
    Interrupted,
}

/// A step's `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    #[serde(flatten)]
    pub parts: KeyParts,
    pub status: StepStatus,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub seconds: f64,
}

impl Meta {
    pub fn read(dir: &Path) -> Option<Meta> {
        let text = std::fs::read_to_string(dir.join(super::files::META)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Large files (models) are identified by size and modification time; hashing half a gigabyte
/// on every run would cost seconds. Small files (datasets, templates) by content.
pub fn file_identity(path: &Path) -> std::io::Result<String> {
    if let Some(text) = crate::stdlib::read(path) {
        return Ok(sha256_hex(text.as_bytes()));
    }
    let metadata = std::fs::metadata(path)?;
    if metadata.len() > 64 << 20 {
        let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return Ok(format!("size {} modified {}", metadata.len(), modified.as_secs()));
    }
    hash_file(path)
}

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
        let (old, new) = (previous.parts.params.get(name), parts.params.get(name));
        if old != new {
            let show = |v: Option<&Json>| v.map_or("unset".to_string(), |v| v.to_string());
            reasons.push(format!("parameter `{name}` changed: {} -> {}", show(old), show(new)));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(samples: i64) -> KeyParts {
        KeyParts {
            kind: "generate".into(),
            params: [("samples".to_string(), Json::from(samples))].into(),
            inputs: [("tasks".to_string(), "abc".to_string())].into(),
            files: BTreeMap::new(),
            seed: 1,
        }
    }

    fn meta(parts: KeyParts, status: StepStatus) -> Meta {
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
