//! The architecture's arrows run one way: each top-level module of `src` may use only modules
//! of the layers below it (README, "Development": the map). Read from the `crate::` paths of
//! the code; unit tests (`tests.rs`, `testing.rs`, a file's `mod tests`) may reach further.

use std::collections::BTreeSet;
use std::path::Path;

/// Top to bottom. A module may use the ones in later layers, never one in its own or an
/// earlier layer.
const LAYERS: &[&[&str]] = &[
    &["main", "lib", "cli"],
    &["reference", "report"],
    &["engine"],
    &["nodes"],
    &["plan"],
    &["dsl"],
    &["llm", "sandbox", "train"],
    &["data", "store", "assets"],
    &["numeric", "stdlib", "choice"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a file's code names with `crate::…` (comments and unit tests left out).
fn uses(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut found = BTreeSet::new();
    for line in code.lines().map(str::trim_start).filter(|l| !l.starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let before = line[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue; // `seedflow_crate::`, `$crate::`
            }
            let name: String =
                line[i + "crate::".len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            found.insert(name);
        }
    }
    found
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = vec![];
    files(&src, &mut paths);
    paths.sort();
    let mut wrong = vec![];
    for path in &paths {
        let relative = path.strip_prefix(&src).unwrap();
        if relative.file_name().is_some_and(|n| n == "tests.rs" || n == "testing.rs") {
            continue;
        }
        let top = relative.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs");
        let Some(own) = layer(top) else {
            wrong.push(format!("src/{top} is in no layer of tests/layering.rs: place it"));
            continue;
        };
        for used in uses(&std::fs::read_to_string(path).unwrap()) {
            match layer(&used) {
                // Items of the crate root (`crate::load_plan`) belong to the top layer.
                None if used.chars().next().is_some_and(|c| c.is_lowercase()) && own > 0 => {
                    wrong.push(format!("{} uses `crate::{used}`, which is in the crate root", relative.display()))
                }
                Some(theirs) if theirs <= own && used != top => {
                    wrong.push(format!("{} ({top}) uses `{used}`, which is not below it", relative.display()))
                }
                _ => {}
            }
        }
    }
    assert!(wrong.is_empty(), "arrows that run the wrong way:\n{}", wrong.join("\n"));
}

#[test]
fn the_reader_finds_uses_and_skips_comments_and_unit_tests() {
    let text = "use crate::store::write_atomic;\n// crate::engine in a comment\nlet x = crate::data::Task::default();\n\
                #[cfg(test)]\nmod tests {\n    use crate::engine;\n}\n";
    assert_eq!(uses(text), BTreeSet::from(["data".to_string(), "store".to_string()]));
}
