//! Every invalid fixture under `tests/fixtures/invalid/` is checked, and what users read — the
//! rendered diagnostics with their spans — is pinned as a snapshot. A fixture's leading
//! `// --set …` comments are passed as overrides.

use std::collections::BTreeSet;
use std::path::Path;

use seedflow::dsl::Code;
use seedflow::dsl::diagnostics::render_plain;

fn fixtures() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir("tests/fixtures/invalid")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kdl"))
        .collect();
    files.sort();
    files
}

fn overrides(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("// --set ").map(str::to_string))
        .collect()
}

#[test]
fn invalid_workflows_render_their_diagnostics() {
    let mut codes = BTreeSet::new();
    for path in fixtures() {
        let problems =
            seedflow::load_plan(&path, &overrides(&path)).expect_err(&format!("{} should be invalid", path.display()));
        codes.extend(problems.iter().map(|p| p.code.as_str()));
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        insta::assert_snapshot!(name, render_plain(&problems, 100));
    }
    // Every code a workflow file can produce has a fixture (run directories are the CLI's).
    let missing: Vec<_> = Code::ALL
        .iter()
        .filter(|c| **c != Code::RunDirectory && !codes.contains(c.as_str()))
        .map(|c| c.as_str())
        .collect();
    assert!(missing.is_empty(), "no fixture produces {missing:?}");
}

#[test]
fn a_missing_workflow_file_is_a_diagnostic() {
    let problems = seedflow::load_plan(Path::new("tests/fixtures/no-such.kdl"), &[]).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].code, Code::MissingFile);
}

#[test]
fn nesting_too_deep_for_the_parser_and_text_that_is_not_utf8_are_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    // Deep enough to overflow the KDL parser's stack, were it reached.
    let deep = dir.path().join("deep.kdl");
    std::fs::write(&deep, format!("workflow \"w\" {}{}", "{ a ".repeat(100_000), "}".repeat(100_000))).unwrap();
    let problems = seedflow::load_plan(&deep, &[]).unwrap_err();
    assert_eq!(problems[0].code, Code::Syntax);
    assert!(problems[0].message.contains("more than 64 levels deep"), "{}", problems[0].message);
    // Braces in strings and comments do not count.
    let quoted = dir.path().join("quoted.kdl");
    let braces = "{".repeat(100);
    let text = format!("// {braces}\n/* {braces} /* */ */\nworkflow \"{braces}\" note=#\"{braces}\"\"#\nbad");
    std::fs::write(&quoted, text).unwrap();
    let problems = seedflow::load_plan(&quoted, &[]).unwrap_err();
    assert!(problems.iter().all(|p| p.code != Code::Syntax), "{problems:?}");
    // Block comments nest, and the parser recurses into them too.
    let comments = dir.path().join("comments.kdl");
    std::fs::write(&comments, format!("{}{}", "/*".repeat(5_000), "*/".repeat(5_000))).unwrap();
    let problems = seedflow::load_plan(&comments, &[]).unwrap_err();
    assert!(problems[0].message.contains("more than 64 levels deep"), "{}", problems[0].message);

    let latin1 = dir.path().join("latin1.kdl");
    std::fs::write(&latin1, b"workflow \"caf\xe9\"\n").unwrap();
    let problems = seedflow::load_plan(&latin1, &[]).unwrap_err();
    assert_eq!(problems[0].code, Code::Syntax);
    assert!(problems[0].message.contains("not UTF-8 text (byte 13"), "{}", problems[0].message);
}

/// A device or a FIFO would be read forever, or block; a path that comes back to a file already
/// being imported is a cycle however it is spelt.
/// miette cannot draw a label past column 65,535 (it panics): such a problem says where it is.
#[test]
fn a_file_that_is_not_kdl_gives_a_few_syntax_errors_and_an_empty_one_says_it_has_no_steps() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"), dir.path().join("notes.kdl")).unwrap();
    let workflow = dir.path().join("flow.kdl");
    std::fs::write(&workflow, "import \"notes.kdl\"\n").unwrap();
    let problems = seedflow::load_plan(&workflow, &[]).unwrap_err();
    assert_eq!(problems.len(), 6, "{problems:?}");
    assert!(problems.iter().all(|p| p.code == Code::Syntax));
    let rest = &problems[5].message;
    assert!(rest.contains(" more KDL syntax errors in `") && rest.ends_with("notes.kdl`"), "{rest}");

    let empty = dir.path().join("empty.kdl");
    std::fs::write(&empty, "// nothing yet\n").unwrap();
    let problems = seedflow::load_plan(&empty, &[]).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].message.ends_with("empty.kdl` has no steps"), "{}", problems[0].message);
}

#[test]
fn a_file_imported_twice_joins_once_and_a_cycle_through_another_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("models.kdl", "model \"coder\" path=\"default\"\n");
    write("part.kdl", "import \"models.kdl\"\ngenerate \"a\" model=\"coder\" tasks=\"t\"\n");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/house-api.jsonl");
    write(
        "flow.kdl",
        &format!("import \"models.kdl\"\nimport \"part.kdl\"\ndataset \"t\" format=\"jsonl\" path=\"{data}\"\n"),
    );
    let plan = seedflow::load_plan(&dir.path().join("flow.kdl"), &[]).unwrap();
    assert_eq!(plan.models.len(), 1);

    write("a.kdl", "import \"b.kdl\"\n");
    write("b.kdl", "import \"a.kdl\"\n");
    let problems = seedflow::load_plan(&dir.path().join("a.kdl"), &[]).unwrap_err();
    assert_eq!(problems[0].code, Code::ImportCycle);
    assert_eq!(problems[0].message, "`a.kdl` imports this file, directly or through others: the imports form a cycle");
}

#[test]
fn spaces_around_a_choice_are_trimmed_as_around_a_list_item() {
    let dir = tempfile::tempdir().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/house-api.jsonl");
    let flow = dir.path().join("flow.kdl");
    std::fs::write(&flow, format!("dataset \"t\" format=\" jsonl \" path=\"{data}\"\nexecute \"e\" code=\"t\"\n"))
        .unwrap();
    let plan = seedflow::load_plan(&flow, &[]).unwrap();
    let (_, dataset) = plan.all_steps()[0];
    assert_eq!(dataset.declaration.props.get("format"), Some(&seedflow::dsl::schema::Value::Choice("jsonl".into())));
}

/// llama.cpp built without CUDA would run every layer on the CPU, silently; a server at a URL
/// does its own offloading, and `spawn` hands `gpu-layers` to llama-server.
#[test]
#[cfg(not(feature = "cuda"))]
fn gpu_layers_without_gpu_support_are_refused_unless_a_server_offloads() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("flow.kdl");
    let check = |model: &str| {
        std::fs::write(&flow, format!("{model}\ndataset \"t\" format=\"jsonl\" path=\"t.jsonl\"\n")).unwrap();
        std::fs::write(dir.path().join("t.jsonl"), r#"{"task_id": "a", "prompt": "p", "tests": ["assert True"]}"#)
            .unwrap();
        seedflow::load_plan(&flow, &[]).err().map(|problems| render_plain(&problems, 100))
    };
    let refused = check("model \"m\" path=\"default\" gpu-layers=-1").expect("refused");
    assert!(refused.contains("built without GPU support") && refused.contains("--features cuda"), "{refused}");
    assert_eq!(check("model \"m\" path=\"default\" gpu-layers=0"), None);
    assert_eq!(check("model \"m\" path=\"default\" gpu-layers=-1 server=\"spawn\""), None);
}

#[test]
fn a_problem_far_along_a_line_is_placed_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.kdl");
    let text = format!("dataset \"d\" format=\"jsonl\" path=\"{}.jsonl\" limit=\"x\"\n", "x".repeat(70_000));
    std::fs::write(&long, text).unwrap();
    let problems = seedflow::load_plan(&long, &[]).unwrap_err();
    let shown = render_plain(&problems, 100);
    assert!(shown.contains("(line 1, column 700"), "{shown}");
}

#[test]
#[cfg(unix)]
fn devices_and_cycles_by_another_path_are_diagnostics() {
    let problems = seedflow::load_plan(Path::new("/dev/zero"), &[]).unwrap_err();
    assert!(problems[0].message.contains("is not a regular file"), "{}", problems[0].message);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let flow = dir.path().join("flow.kdl");
    std::fs::write(&flow, "import \"/dev/zero\"\nimport \"sub/../flow.kdl\"\n").unwrap();
    let problems = seedflow::load_plan(&flow, &[]).unwrap_err();
    let codes: Vec<Code> = problems.iter().map(|p| p.code).collect();
    assert_eq!(codes, [Code::MissingFile, Code::ImportCycle], "{problems:?}");
    assert!(problems[0].message.contains("is not a regular file"), "{}", problems[0].message);
}
