//! The standard library: prompt templates and workflow fragments built into the binary, so a
//! workflow can `import "std/…"` wherever it lives. The files are `stdlib/` of the repository;
//! a test checks that this table lists every one of them.

use std::path::Path;

/// (name as imported, content).
pub static FILES: &[(&str, &str)] = &[
    ("std/evaluate.kdl", include_str!("../stdlib/evaluate.kdl")),
    ("std/prompts/mbpp.txt", include_str!("../stdlib/prompts/mbpp.txt")),
    ("std/prompts/requirement.txt", include_str!("../stdlib/prompts/requirement.txt")),
    ("std/prompts/humaneval.txt", include_str!("../stdlib/prompts/humaneval.txt")),
    ("std/prompts/revise.txt", include_str!("../stdlib/prompts/revise.txt")),
    ("std/prompts/revise-examples.jsonl", include_str!("../stdlib/prompts/revise-examples.jsonl")),
];

pub fn file(name: &str) -> Option<(&'static str, &'static str)> {
    FILES.iter().find(|(n, _)| *n == name).copied()
}

/// The content of a stdlib file named by a path such as `std/prompts/mbpp.txt`.
pub fn read(path: &Path) -> Option<&'static str> {
    path.to_str().and_then(file).map(|(_, text)| text)
}

/// The text of a file named by a `File` property: from the stdlib for `std/…`, else from disk.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    match read(path) {
        Some(text) => Ok(text.to_string()),
        None => std::fs::read_to_string(path),
    }
}
