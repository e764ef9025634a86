//! A step's `meta.json`: what decided its output (the parts of its cache key), its status and
//! its metrics.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{META, hash_file, sha256_hex};

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
        let text = std::fs::read_to_string(dir.join(META)).ok()?;
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
    if metadata.is_dir() {
        // A directory (a PEFT adapter): its files' identities, by name.
        let mut names: Vec<_> = std::fs::read_dir(path)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        let mut identities = String::new();
        for file in names.iter().filter(|p| p.is_file()) {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            identities += &format!("{name} {}\n", file_identity(file)?);
        }
        return Ok(sha256_hex(identities.as_bytes()));
    }
    if metadata.len() > 64 << 20 {
        let modified = metadata.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return Ok(format!("size {} modified {}", metadata.len(), modified.as_secs()));
    }
    hash_file(path)
}
