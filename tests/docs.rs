//! The docs cannot drift: the language reference is what the code generates, and every
//! workflow, example, stdlib file and `kdl` block of the README and docs checks.

use std::path::{Path, PathBuf};

fn kdl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            kdl_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "kdl") {
            out.push(path);
        }
    }
}

fn assert_valid(path: &Path) {
    if let Err(problems) = seedflow::load_plan(path, &[]) {
        panic!("{} is invalid:\n{}", path.display(), seedflow::dsl::diagnostics::render_plain(&problems, 100));
    }
}

/// Checks `text` as if it were a workflow file at the repository's root.
fn assert_valid_text(text: &str, origin: &str) {
    let file = tempfile::Builder::new().prefix(".doc-block-").suffix(".kdl").tempfile_in(".").unwrap();
    std::fs::write(file.path(), text).unwrap();
    if let Err(problems) = seedflow::load_plan(file.path(), &[]) {
        panic!(
            "a kdl block of {origin} is invalid:\n{text}\n{}",
            seedflow::dsl::diagnostics::render_plain(&problems, 100)
        );
    }
}

fn kdl_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = vec![];
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("```kdl") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn the_language_reference_is_current() {
    let generated = seedflow::reference::language_reference();
    let written = std::fs::read_to_string("docs/language.md").unwrap_or_default();
    assert!(written == generated, "docs/language.md is stale: run `cargo run -- docs > docs/language.md`");
}

#[test]
fn every_kind_is_documented_with_a_working_example() {
    for kind in seedflow::nodes::KINDS.iter().map(|k| k.spec) {
        assert!(!kind.doc.is_empty() && !kind.example.is_empty(), "`{}` needs docs and an example", kind.name);
        assert!(kind.example.contains(kind.name), "the example of `{}` does not use it", kind.name);
        for property in kind.properties {
            assert!(!property.doc.is_empty(), "`{}.{}` has no doc", kind.name, property.name);
        }
        assert_valid_text(kind.example, &format!("the `{}` example", kind.name));
    }
}

#[test]
fn every_shipped_workflow_checks() {
    let mut files = vec![];
    kdl_files(Path::new("workflows"), &mut files);
    kdl_files(Path::new("examples"), &mut files);
    assert!(files.len() >= 6, "{files:?}");
    for file in files {
        assert_valid(&file);
    }
}

#[test]
fn every_kdl_block_of_the_docs_checks() {
    for doc in ["README.md", "docs/language.md"] {
        let text = std::fs::read_to_string(doc).unwrap();
        let blocks = kdl_blocks(&text);
        assert!(!blocks.is_empty(), "{doc} has no kdl block");
        for block in blocks {
            assert_valid_text(&block, doc);
        }
    }
}

#[test]
fn the_stdlib_table_lists_every_stdlib_file() {
    let mut on_disk = vec![];
    let mut stack = vec![PathBuf::from("stdlib")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                on_disk.push(path.to_string_lossy().replacen("stdlib/", "std/", 1));
            }
        }
    }
    on_disk.sort();
    let mut listed: Vec<String> = seedflow::stdlib::FILES.iter().map(|(name, _)| name.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    for (name, text) in seedflow::stdlib::FILES {
        assert_eq!(std::fs::read_to_string(name.replacen("std/", "stdlib/", 1)).unwrap(), *text);
    }
    // Fragments are imported by a shipped workflow, where they are checked in context.
    let quickstart = std::fs::read_to_string("workflows/quickstart.kdl").unwrap();
    assert!(quickstart.contains("import \"std/evaluate.kdl\""));
}

/// The GitHub Actions example runs a workflow that checks and uploads files that workflow writes.
#[test]
fn the_ci_example_runs_a_valid_workflow_and_uploads_its_outputs() {
    let actions = std::fs::read_to_string("examples/ci/github-actions.yml").unwrap();
    let command =
        actions.lines().find_map(|l| l.trim().strip_prefix("run: seedflow run ")).expect("a `seedflow run` step");
    let workflow = command.split_whitespace().next().unwrap();
    assert!(command.contains("--ci --run-dir run"), "{command}");
    assert_valid(Path::new(workflow));
    let plan = seedflow::load_plan(Path::new(workflow), &[]).unwrap();
    let steps: Vec<String> = plan.all_steps().iter().map(|(_, s)| s.name().to_string()).collect();
    for path in actions.lines().filter_map(|l| l.trim().strip_prefix("run/")) {
        // `run/<step>/…`, `run/<loop>/iteration-*/<step>/…`, or a file of the run itself.
        let parts: Vec<&str> = path.split('/').collect();
        let step = match parts.as_slice() {
            [_file] => continue,
            [_, iteration, step, ..] if iteration.starts_with("iteration-") => *step,
            [step, ..] => *step,
            [] => unreachable!(),
        };
        assert!(steps.iter().any(|s| s == step), "the upload names `{path}`, but the workflow has no step `{step}`");
    }
}

#[test]
fn steps_read_only_the_properties_their_kind_declares() {
    // A property is a typed constant, so a misspelt one does not compile; what the compiler
    // cannot see is a step reading a constant its kind's spec does not list (it would fail when
    // the step runs). Every constant a step file reads must be in that kind's list.
    const READERS: &[&str] = &["get(&", "input(&", "optional_input(&", "read(&", ">(&", "param(&"];
    let mut read = 0;
    for kind in seedflow::nodes::KINDS.iter().map(|k| k.spec) {
        let path = format!("src/nodes/{}.rs", kind.name.replace('-', "_"));
        let code = std::fs::read_to_string(&path).unwrap();
        let code = code.split("#[cfg(test)]\nmod tests").next().unwrap();
        let spec = &code[code.find("pub static SPEC").unwrap()..];
        let listed = &spec[spec.find("properties: &[").unwrap()..spec.find("metrics:").unwrap()];
        for reader in READERS {
            for (at, _) in code.match_indices(reader) {
                let name: String =
                    code[at + reader.len()..].chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
                if name.is_empty() {
                    continue;
                }
                let listed_name = format!("{name}.spec");
                assert!(listed.contains(&listed_name), "{path} reads `{name}`, which `{}` does not list", kind.name);
                read += 1;
            }
        }
    }
    assert!(read >= 40, "found only {read} property reads: has the code's style changed?");
}
