//! KDL text -> [`Node`]s: parsing, imports and `--set` overrides.

use std::path::{Path, PathBuf};

use kdl::{KdlDocument, KdlNode, KdlValue};
use miette::SourceSpan;

use super::ast::{FileId, Literal, Node, Property, Sources, Span, Spanned};
use super::diagnostics::{Code, Problem, Problems};
use crate::stdlib;

/// Where an import or a path property points: a file on disk or a file of the built-in stdlib.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Stdlib(&'static str),
}

/// Resolves `reference` as written in the file `from`: `std/…` names the built-in stdlib,
/// anything else is relative to the directory of the file it is written in.
pub fn resolve(sources: &Sources, from: FileId, reference: &str) -> Option<Location> {
    if reference.starts_with("std/") {
        return stdlib::file(reference).map(|(name, _)| Location::Stdlib(name));
    }
    let base = sources.get(from).path.as_deref().and_then(Path::parent).unwrap_or(Path::new("."));
    let path = base.join(reference);
    // A relative path that starts with a folder `std` would read as a stdlib file's name.
    let path = if path.is_relative() && path.starts_with("std") { Path::new(".").join(path) } else { path };
    path.exists().then_some(Location::File(path))
}

/// Reads the workflow at `path` with its imports.
pub fn load_file(path: &Path, sources: &mut Sources, problems: &mut Problems) -> Vec<Node> {
    let text = match read_text(path) {
        Ok(text) => text,
        Err((code, err)) => {
            let problem = Problem::new(code, format!("cannot read workflow `{}`: {err}", path.display()));
            problems.push(match code {
                Code::MissingFile => {
                    problem.with_help("check the path; workflows are KDL files such as `workflows/seed.kdl`")
                }
                _ => problem.with_help("KDL files are UTF-8 text; save the file in that encoding"),
            });
            return vec![];
        }
    };
    let file = sources.add(path.display().to_string(), Some(path.to_path_buf()), text);
    let mut stack = vec![Location::File(path.to_path_buf())];
    load_text(file, sources, problems, &mut stack)
}

/// A workflow file's text; a file that cannot be read is a missing file, one that is not UTF-8
/// a syntax error.
fn read_text(path: &Path) -> Result<String, (Code, String)> {
    // A directory is an error to read; a device or a FIFO could be read forever, or block.
    let metadata = std::fs::metadata(path).map_err(|err| (Code::MissingFile, err.to_string()))?;
    if !metadata.is_file() {
        return Err((Code::MissingFile, "it is not a regular file".into()));
    }
    let bytes = std::fs::read(path).map_err(|err| (Code::MissingFile, err.to_string()))?;
    String::from_utf8(bytes).map_err(|err| {
        let at = err.utf8_error().valid_up_to();
        (Code::Syntax, format!("it is not UTF-8 text (byte {at} starts no UTF-8 character)"))
    })
}

/// Syntax errors shown per file. One mistake can make the parser stumble over the text after it,
/// and a file that is not KDL at all gives hundreds.
const MOST_SYNTAX_ERRORS: usize = 5;

fn load_text(file: FileId, sources: &mut Sources, problems: &mut Problems, stack: &mut Vec<Location>) -> Vec<Node> {
    let text = sources.get(file).text.clone();
    if let Some(offset) = too_deep(&text) {
        let span = Span { file, range: SourceSpan::new(offset.into(), 1) };
        problems
            .at(
                sources,
                Code::Syntax,
                span,
                format!("blocks or comments nest more than {MAX_NESTING} levels deep"),
                "too deep",
            )
            .help("a workflow nests a few levels: steps in a loop in the workflow, a comment in a comment");
        return vec![];
    }
    let document = match KdlDocument::parse(&text) {
        Ok(document) => document,
        Err(err) => {
            let total = err.diagnostics.len();
            let mut diagnostics = err.diagnostics.into_iter();
            for d in diagnostics.by_ref().take(MOST_SYNTAX_ERRORS) {
                let message = d.message.unwrap_or_else(|| "invalid KDL".to_string());
                let span = Span { file, range: d.span };
                let label = d.label.unwrap_or_else(|| "here".to_string());
                let written = text.get(d.span.offset()..d.span.offset() + d.span.len()).unwrap_or_default();
                let builder = problems.at(sources, Code::Syntax, span, format!("invalid KDL: {message}"), label);
                if let Some(help) = what_to_write(written).or(d.help) {
                    builder.help(help);
                }
            }
            if let Some(next) = diagnostics.next() {
                let name = sources.get(file).name.clone();
                let span = Span { file, range: next.span };
                problems
                    .at(
                        sources,
                        Code::Syntax,
                        span,
                        format!("{} more KDL syntax errors in `{name}`", total - MOST_SYNTAX_ERRORS),
                        "the next one",
                    )
                    .help(format!(
                        "a mistake often makes the parser stumble over what follows: fix the first ones and check \
                         again (is `{name}` a KDL workflow?)"
                    ));
            }
            return vec![];
        }
    };
    let mut nodes = vec![];
    for node in document.nodes() {
        let node = lower_node(file, node, sources, problems);
        if node.kind.value == "import" {
            nodes.extend(load_import(&node, sources, problems, stack));
        } else {
            nodes.push(node);
        }
    }
    nodes
}

/// What to write instead of a value the parser refused (it says only that it expected something
/// else): what KDL 1 took and KDL 2 does not, a Windows path.
fn what_to_write(written: &str) -> Option<String> {
    match written {
        "true" | "false" | "null" => Some(format!("KDL 2 writes `#{written}` (a bare `{written}` was KDL 1)")),
        raw if raw.starts_with("r\"") || raw.starts_with("r#") => {
            Some("KDL 2 writes a raw string as `#\"…\"#` (`r\"…\"` was KDL 1)".into())
        }
        // `"data\mbpp\train.jsonl"`: `\m` is no escape.
        quoted if quoted.starts_with('"') && quoted.contains('\\') => Some(super::check::WINDOWS_PATH.into()),
        _ => None,
    }
}

fn load_import(node: &Node, sources: &mut Sources, problems: &mut Problems, stack: &mut Vec<Location>) -> Vec<Node> {
    const HELP: &str = "write `import \"std/evaluate.kdl\"` or a path relative to this file";
    for property in &node.properties {
        problems
            .at(
                sources,
                Code::UnknownProperty,
                property.key.span,
                format!("`import` has no property `{}`", property.key.value),
                "unknown property",
            )
            .help("`import` takes the file alone");
    }
    if let Some(child) = node.children.first() {
        problems
            .at(sources, Code::MisplacedNode, child.kind.span, "`import` cannot hold other nodes", "unexpected child")
            .help("the imported file's nodes join this file's; write other nodes at the top level");
    }
    let (target, span) = match node.name.clone() {
        Some(Spanned { value: Literal::String(target), span }) => (target, span),
        Some(other) => {
            problems
                .at(sources, Code::WrongType, other.span, "`import` needs a file path, in quotes", "not a string")
                .help(HELP);
            return vec![];
        }
        None => {
            problems
                .at(sources, Code::MissingName, node.kind.span, "`import` needs the file to import", "import what?")
                .help(HELP);
            return vec![];
        }
    };
    let Some(location) = resolve(sources, span.file, &target) else {
        let known = stdlib::FILES.iter().map(|(n, _)| *n).filter(|n| n.ends_with(".kdl"));
        let mut builder =
            problems.at(sources, Code::MissingFile, span, format!("cannot find `{target}`"), "no such file");
        if target.starts_with("std/") {
            let list: Vec<_> = known.collect();
            builder = builder.help(format!("the stdlib has: {}", list.join(", ")));
        }
        drop(builder);
        return vec![];
    };
    // `sub/../flow.kdl` or a linked folder is the same file by another path.
    let same_file = |location: &Location| match location {
        Location::File(path) => Location::File(path.canonicalize().unwrap_or_else(|_| path.clone())),
        stdlib => stdlib.clone(),
    };
    if let Some(at) = stack.iter().position(|on_stack| same_file(on_stack) == same_file(&location)) {
        let message = if at + 1 == stack.len() {
            format!("`{target}` imports itself")
        } else {
            format!("`{target}` imports this file, directly or through others: the imports form a cycle")
        };
        problems.at(sources, Code::ImportCycle, span, message, "imported again here").help("remove one of the imports");
        return vec![];
    }
    // A file imported already (two parts that share a file of models): its nodes join once.
    let imported = |file: &super::ast::SourceFile| match &location {
        Location::File(_) => {
            file.path.as_ref().is_some_and(|path| same_file(&Location::File(path.clone())) == same_file(&location))
        }
        Location::Stdlib(name) => file.path.is_none() && file.name == *name,
    };
    if sources.iter().any(|file| file.imported_at.is_some() && imported(file)) {
        return vec![];
    }
    let file = match &location {
        Location::Stdlib(name) => {
            let text = stdlib::file(name).map(|(_, text)| text).unwrap_or_default();
            sources.add_import(*name, None, text.to_string(), span)
        }
        Location::File(path) => match read_text(path) {
            Ok(text) => sources.add_import(path.display().to_string(), Some(path.clone()), text, span),
            Err((code, err)) => {
                problems.at(sources, code, span, format!("cannot read `{target}`: {err}"), "here");
                return vec![];
            }
        },
    };
    stack.push(location);
    let nodes = load_text(file, sources, problems, stack);
    stack.pop();
    nodes
}

fn literal(value: &KdlValue) -> Literal {
    match value {
        KdlValue::String(s) => Literal::String(s.clone()),
        KdlValue::Integer(i) => Literal::Integer(*i),
        KdlValue::Float(f) => Literal::Float(*f),
        KdlValue::Bool(b) => Literal::Bool(*b),
        KdlValue::Null => Literal::Null,
    }
}

fn lower_node(file: FileId, node: &KdlNode, sources: &Sources, problems: &mut Problems) -> Node {
    let at = |range: SourceSpan| Span { file, range };
    let text = &sources.get(file).text;
    let mut name = None;
    let mut properties: Vec<Property> = vec![];
    // Each key's first property, by index (a search per key would make a long line quadratic).
    let mut first_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    // KDL lets any value or node carry a type, `(u8)5000`; a workflow's types are its kinds'.
    for annotation in node.ty().into_iter().chain(node.entries().iter().filter_map(|e| e.ty())) {
        problems
            .at(
                sources,
                Code::Syntax,
                at(annotation.span()),
                format!("a type annotation, `({})`, means nothing in a workflow", annotation.value()),
                "type annotation",
            )
            .help("remove it: each property's type is fixed by its node's kind (`seedflow docs`)");
    }
    for entry in node.entries() {
        match entry.name() {
            None if name.is_none() => name = Some(Spanned::new(literal(entry.value()), at(entry.span()))),
            None => {
                problems
                    .at(
                        sources,
                        Code::UnexpectedArgument,
                        at(entry.span()),
                        "unexpected argument",
                        "a node has one name",
                    )
                    .help("write further settings as properties: `key=value`");
            }
            Some(key) => {
                // KDL lets the last of two equal keys win; in a workflow that hides a mistake.
                if let Some(first) = first_of.get(key.value()).map(|&index| &properties[index]) {
                    problems
                        .at(
                            sources,
                            Code::DuplicateName,
                            at(key.span()),
                            format!("`{}` is set twice", key.value()),
                            "again here",
                        )
                        .also(first.key.span, "first here")
                        .help("keep one of them");
                    continue;
                }
                let value_span = value_span(text, key.span(), entry.span());
                first_of.insert(key.value().to_string(), properties.len());
                properties.push(Property {
                    key: Spanned::new(key.value().to_string(), at(key.span())),
                    value: Spanned::new(literal(entry.value()), at(value_span)),
                });
            }
        }
    }
    let children = node
        .children()
        .map(|doc| doc.nodes().iter().map(|n| lower_node(file, n, sources, problems)).collect())
        .unwrap_or_default();
    Node {
        kind: Spanned::new(node.name().value().to_string(), at(node.name().span())),
        name,
        properties,
        children,
        span: at(node.span()),
    }
}

/// How deep `{ }` blocks may nest: far beyond any workflow, and well within the stack the KDL
/// parser needs, which recurses once per level (1,500 levels overflow it).
const MAX_NESTING: usize = 64;

/// Where a `{` opens a block, or a `/*` a comment, deeper than [`MAX_NESTING`], if one does.
/// Braces in strings and comments do not count.
fn too_deep(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (0usize, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            b'}' => depth = depth.saturating_sub(1),
            b'"' => {
                // A quoted string: to the next quote not escaped.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'#' => {
                // A raw string, #"…"#, ##"…"## and so on: to the quote followed by as many `#`.
                let hashes = bytes[i..].iter().take_while(|&&b| b == b'#').count();
                if bytes.get(i + hashes) == Some(&b'"') {
                    let close = format!("\"{}", "#".repeat(hashes));
                    i = text[i + hashes + 1..]
                        .find(&close)
                        .map_or(bytes.len(), |at| i + hashes + 1 + at + close.len() - 1);
                } else {
                    i += hashes - 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = text[i..].find('\n').map_or(bytes.len(), |at| i + at);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // Block comments nest in KDL, and its parser recurses into them as into blocks.
                let mut open = 0usize;
                while i < bytes.len() {
                    if bytes[i..].starts_with(b"/*") {
                        if open == MAX_NESTING {
                            return Some(i);
                        }
                        (open, i) = (open + 1, i + 2);
                    } else if bytes[i..].starts_with(b"*/") {
                        (open, i) = (open - 1, i + 2);
                        if open == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The span of a property's value: what follows `=` within the entry.
fn value_span(text: &str, key: SourceSpan, entry: SourceSpan) -> SourceSpan {
    let entry_end = (entry.offset() + entry.len()).min(text.len());
    let mut start = (key.offset() + key.len()).min(entry_end);
    let bytes = text.as_bytes();
    while start < entry_end && (bytes[start] == b'=' || bytes[start].is_ascii_whitespace()) {
        start += 1;
    }
    // Entries may carry trailing whitespace in their span; the value ends before it.
    let mut end = entry_end;
    while end > start && bytes[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    SourceSpan::new(start.into(), end - start)
}

/// Applies `--set target.property=value` overrides. Each override is added to `sources` so a
/// problem with it can point at the argument itself.
pub fn apply_overrides(nodes: &mut Vec<Node>, overrides: &[String], sources: &mut Sources, problems: &mut Problems) {
    for text in overrides {
        let file = sources.add("--set", None, text.clone());
        let whole = Span { file, range: SourceSpan::new(0.into(), text.len()) };
        let Some((lhs, rhs)) = text.split_once('=') else {
            problems
                .at(sources, Code::BadOverride, whole, "an override needs `=`", "expected `name.property=value`")
                .help("for example `--set adapt.max-iterations=5`");
            continue;
        };
        let lhs_span = Span { file, range: SourceSpan::new(0.into(), lhs.len()) };
        // An empty value is shown by its `=`.
        let rhs_range = if rhs.is_empty() { (lhs.len(), 1) } else { (lhs.len() + 1, rhs.len()) };
        let rhs_span = Span { file, range: rhs_range.into() };
        let Some((target, key)) = lhs.rsplit_once('.') else {
            problems
                .at(
                    sources,
                    Code::BadOverride,
                    lhs_span,
                    "an override names a node and a property",
                    "expected `name.property`",
                )
                .help("for example `--set adapt.max-iterations=5`");
            continue;
        };
        // The value reads as KDL (numbers, #true, quoted strings) when it is one KDL value and
        // nothing else; anything else is a string (a URL's `//` would read as a comment).
        let line = format!("x {rhs}");
        let value = KdlDocument::parse(&line)
            .ok()
            .and_then(|d| {
                let entries = d.nodes().first()?.entries();
                // `key=value` reads as a KDL property: the whole text is then the value.
                let whole = entries.len() == 1
                    && entries[0].name().is_none()
                    && entries[0].ty().is_none()
                    && entries[0].span().offset() + entries[0].span().len() == line.len();
                whole.then(|| literal(entries[0].value()))
            })
            .unwrap_or_else(|| Literal::String(rhs.to_string()));
        // `workflow`'s properties (`seed`) can be set in a file that has no `workflow` node.
        if target == "workflow" && !nodes.iter().any(|n| n.kind.value == "workflow") {
            let kind = Spanned::new("workflow".to_string(), whole);
            nodes.push(Node { kind, name: None, properties: vec![], children: vec![], span: whole });
        }
        let Some(node) = find_node_mut(nodes, target) else {
            let names = node_names(nodes);
            let mut builder = problems.at(
                sources,
                Code::BadOverride,
                Span { file, range: SourceSpan::new(0.into(), target.len()) },
                format!("no node named `{target}` to override"),
                "unknown node",
            );
            let the_workflow = nodes.iter().any(|n| n.kind.value == "workflow" && n.name_str() == Some(target));
            // A step inside a loop is named with its loop's name: `adapt.tune`.
            let in_a_loop = names.iter().find(|name| name.rsplit_once('.').is_some_and(|(_, step)| step == target));
            if the_workflow {
                builder = builder.help(format!("the `workflow` node is set as `workflow`: `--set workflow.{key}=…`"));
            } else if let Some(full) = in_a_loop {
                builder = builder.help(format!("a step in a loop is named with its loop's: `--set {full}.{key}=…`"));
            } else if let Some(best) = super::diagnostics::did_you_mean(target, names.iter().map(String::as_str)) {
                builder = builder.help(format!("did you mean `{best}`?"));
            }
            drop(builder);
            continue;
        };
        let key_span = Span { file, range: SourceSpan::new((target.len() + 1).into(), key.len()) };
        // Two overrides of one property: the last would win unseen, as two in a file would.
        if let Some(first) =
            node.properties.iter().find(|p| p.key.value == key && sources.get(p.key.span.file).name == "--set")
        {
            problems
                .at(sources, Code::BadOverride, key_span, format!("`{lhs}` is set twice"), "again here")
                .help(format!("keep one `--set {lhs}=…` (the first gave {})", first.value.value.describe()));
            continue;
        }
        let property = Property { key: Spanned::new(key.to_string(), key_span), value: Spanned::new(value, rhs_span) };
        node.properties.retain(|p| p.key.value != key);
        node.properties.push(property);
    }
}

/// `workflow` names the workflow node; `loop.step` a step inside a loop; any other name a
/// top-level node.
fn find_node_mut<'a>(nodes: &'a mut [Node], target: &str) -> Option<&'a mut Node> {
    if target == "workflow" {
        return nodes.iter_mut().find(|n| n.kind.value == "workflow");
    }
    if let Some((outer, inner)) = target.split_once('.') {
        let parent = nodes.iter_mut().find(|n| n.name_str() == Some(outer))?;
        return parent.children.iter_mut().find(|n| n.name_str() == Some(inner));
    }
    nodes.iter_mut().find(|n| n.name_str() == Some(target) && n.kind.value != "workflow")
}

fn node_names(nodes: &[Node]) -> Vec<String> {
    let mut names = vec!["workflow".to_string()];
    // The workflow node is `workflow` to `--set`, whatever its name.
    for node in nodes.iter().filter(|n| n.kind.value != "workflow") {
        if let Some(name) = node.name_str() {
            names.push(name.to_string());
            for child in &node.children {
                if let Some(inner) = child.name_str() {
                    names.push(format!("{name}.{inner}"));
                }
            }
        }
    }
    names
}
