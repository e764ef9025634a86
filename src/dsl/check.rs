//! Nodes -> checked declarations: each node against its kind's schema, each value against its
//! property's type. Every problem is reported; checking goes on past the first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::ast::{Literal, Node, Property, Sources, Span, Spanned};
use super::diagnostics::{Code, Problem, Problems, did_you_mean};
use super::expr::Expr;
use super::lower::{Location, resolve};
use super::schema::{KindSpec, Props, Role, StatusFilter, Value, ValueType, Vocabulary};
use crate::data::Status;

/// A node that passed its schema.
#[derive(Debug, Clone)]
pub struct Declaration {
    pub spec: &'static KindSpec,
    pub name: Spanned<String>,
    pub props: Props,
    /// Where each property's value is written (defaults have none).
    pub spans: BTreeMap<String, Span>,
    /// The steps of a `loop-until`.
    pub body: Vec<Declaration>,
    pub span: Span,
}

impl Declaration {
    /// Where to point at a property: its value, or the node's name when it was defaulted.
    pub fn span_of(&self, property: &str) -> Span {
        self.spans.get(property).copied().unwrap_or(self.name.span)
    }
}

/// The checked top level of a workflow.
#[derive(Debug, Default)]
pub struct Checked {
    pub workflow: Option<Declaration>,
    pub models: Vec<Declaration>,
    pub steps: Vec<Declaration>,
    /// Names of nodes that did not pass their schema (already reported).
    pub broken: Vec<String>,
}

pub fn check(nodes: &[Node], vocabulary: &Vocabulary, sources: &Sources, problems: &mut Problems) -> Checked {
    let mut checked = Checked::default();
    for node in nodes {
        let Some(declaration) = check_node(node, vocabulary, sources, problems, false) else {
            checked.broken.extend(node.name_str().map(str::to_string));
            continue;
        };
        match declaration.spec.role {
            // It would name and seed whichever file imported it.
            Role::Workflow if sources.get(node.span.file).imported_at.is_some() => {
                problems
                    .at(
                        sources,
                        Code::MisplacedNode,
                        node.kind.span,
                        "a `workflow` node in an imported file",
                        "imported",
                    )
                    .help("the `workflow` node belongs to the file you run: move it there, or remove it");
            }
            Role::Workflow => {
                if let Some(first) = &checked.workflow {
                    problems
                        .at(sources, Code::DuplicateName, node.kind.span, "a second `workflow` node", "again here")
                        .also(first.name.span, "first here")
                        .help("a file has at most one `workflow` node");
                } else {
                    checked.workflow = Some(declaration);
                }
            }
            Role::Model => checked.models.push(declaration),
            Role::Step(_) | Role::Loop => checked.steps.push(declaration),
        }
    }
    check_duplicates(&checked, sources, problems);
    if checked.steps.is_empty() && problems.is_empty() {
        // Running it would do nothing and report success; a file of models alone is one to import.
        let help = "add the steps to run, such as `generate`, `execute` and `report`; a file meant for `import` \
                    is checked through a workflow that imports it";
        match &checked.workflow {
            Some(workflow) => {
                let message = format!("workflow `{}` has no steps", workflow.name.value);
                problems.at(sources, Code::MissingProperty, workflow.name.span, message, "no steps").help(help);
            }
            None => {
                let message = format!("`{}` has no steps", sources.get(0).name);
                problems.push(Problem::new(Code::MissingProperty, message).with_help(help));
            }
        }
    }
    checked
}

fn check_duplicates(checked: &Checked, sources: &Sources, problems: &mut Problems) {
    let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
    let all = checked.models.iter().chain(&checked.steps).flat_map(|d| std::iter::once(d).chain(&d.body));
    for declaration in all {
        let name = declaration.name.value.as_str();
        if let Some(first) = seen.get(name) {
            problems
                .at(
                    sources,
                    Code::DuplicateName,
                    declaration.name.span,
                    format!("`{name}` is defined twice"),
                    "defined again here",
                )
                .also(*first, "first defined here")
                .help("names of steps and models are unique across the workflow; rename one");
        } else {
            seen.insert(name, declaration.name.span);
        }
    }
}

fn check_node(
    node: &Node,
    vocabulary: &Vocabulary,
    sources: &Sources,
    problems: &mut Problems,
    in_loop: bool,
) -> Option<Declaration> {
    let kind = node.kind.value.as_str();
    // Imports are read at the top level only (lower.rs); one in a loop reaches here.
    if kind == "import" {
        problems
            .at(sources, Code::MisplacedNode, node.kind.span, "`import` cannot be inside a loop", "not allowed here")
            .help("put `import` at the top level of the file");
        return None;
    }
    let Some(spec) = vocabulary.kind(kind) else {
        let names = vocabulary.kinds().iter().map(|k| k.name);
        let help = match did_you_mean(kind, names.clone()) {
            Some(best) => format!("did you mean `{best}`?"),
            None => format!("node kinds are: {}", names.collect::<Vec<_>>().join(", ")),
        };
        let message = format!("unknown node kind `{kind}`");
        problems.at(sources, Code::UnknownKind, node.kind.span, message, "not a node kind").help(help);
        return None;
    };
    if in_loop && !matches!(spec.role, Role::Step(_)) {
        problems
            .at(
                sources,
                Code::MisplacedNode,
                node.kind.span,
                format!("`{kind}` cannot be inside a loop"),
                "not allowed here",
            )
            .help("a loop holds steps; declare workflows, models and other loops at the top level");
        return None;
    }
    let name = match &node.name {
        Some(Spanned { value: Literal::String(name), span }) => {
            if !is_kebab_case(name) {
                // A character that only looks like a letter (a Cyrillic `а`) is named, with its code.
                let label = match name.chars().find(|c| !c.is_ascii()) {
                    Some(c) => format!("`{c}` (U+{:04X}) is not an ASCII letter", c as u32),
                    None => "not kebab-case".to_string(),
                };
                problems
                    .at(sources, Code::BadValue, *span, format!("`{name}` is not a valid name"), label)
                    .help("names are kebab-case: words of lowercase letters and digits joined by single `-`, starting with a letter");
            } else if name.len() > MOST_NAME_LENGTH {
                problems
                    .at(sources, Code::BadValue, *span, format!("a name of {} characters", name.len()), "too long")
                    .help(format!(
                        "a name becomes a directory of the run: shorten it to {MOST_NAME_LENGTH} characters or fewer"
                    ));
            } else if name == "prev" {
                problems.at(sources, Code::BadValue, *span, "`prev` is reserved", "reserved name").help(
                    "`prev.<step>` reads a step's output from the loop's previous iteration; choose another name",
                );
            } else if name == "workflow" && spec.role != Role::Workflow {
                problems
                    .at(sources, Code::BadValue, *span, "`workflow` is reserved", "reserved name")
                    .help("`--set workflow.<property>` sets the `workflow` node's properties; choose another name");
            }
            Spanned::new(name.clone(), *span)
        }
        Some(other) => {
            problems.at(
                sources,
                Code::WrongType,
                other.span,
                "a name must be a string",
                format!("found {}", other.value.describe()),
            );
            return None;
        }
        // Named after its file by the plan, as a workflow without a `workflow` node is.
        None if spec.role == Role::Workflow => Spanned::new(String::new(), node.kind.span),
        None => {
            problems
                .at(sources, Code::MissingName, node.kind.span, format!("`{kind}` needs a name"), "unnamed")
                .help(format!("write `{kind} \"my-{kind}\" …`; other steps refer to it by that name"));
            return None;
        }
    };

    let mut props = Props::default();
    let mut spans = BTreeMap::new();
    for property in &node.properties {
        let key = property.key.value.as_str();
        let Some(property_spec) = spec.property(key) else {
            let mut builder = problems.at(
                sources,
                Code::UnknownProperty,
                property.key.span,
                format!("`{kind}` has no property `{key}`"),
                "unknown property",
            );
            builder = match did_you_mean(key, spec.properties.iter().map(|p| p.name)) {
                Some(best) => builder.help(format!("did you mean `{best}`?")),
                None if spec.properties.is_empty() => builder.help(format!("`{kind}` takes no properties")),
                None => builder.help(format!(
                    "`{kind}` takes: {}",
                    spec.properties.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
                )),
            };
            drop(builder);
            continue;
        };
        if let Some(value) = check_value(property_spec.ty, property, sources, problems) {
            props.0.insert(key.to_string(), value);
            spans.insert(key.to_string(), property.value.span);
        }
    }
    for property_spec in spec.properties {
        if props.0.contains_key(property_spec.name) || spans.contains_key(property_spec.name) {
            continue;
        }
        let written = node.properties.iter().any(|p| p.key.value == property_spec.name);
        if written {
            continue; // reported as a bad value already
        }
        if property_spec.required {
            problems
                .at(
                    sources,
                    Code::MissingProperty,
                    node.kind.span,
                    format!("`{kind}` needs `{}`", property_spec.name),
                    format!("`{}` missing", property_spec.name),
                )
                .help(format!("add `{}=…`: {}", property_spec.name, property_spec.ty.describe()));
        } else if let Some(default) = property_spec.default {
            match default_value(property_spec.ty, default) {
                Some(value) => {
                    props.0.insert(property_spec.name.to_string(), value);
                }
                None => debug_assert!(false, "default of {kind}.{} does not check", property_spec.name),
            }
        }
    }

    let given = |name: &&str| node.properties.iter().any(|p| p.key.value == *name);
    if !spec.at_least_one.is_empty() && !spec.at_least_one.iter().any(given) {
        let list = spec.at_least_one.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(" or ");
        problems
            .at(sources, Code::MissingProperty, node.kind.span, format!("`{kind}` needs {list}"), "incomplete")
            .help(format!("give at least one of {list}"));
    }
    for (property, needed) in spec.requires {
        if let Some(written) = node.properties.iter().find(|p| p.key.value == *property)
            && !given(needed)
        {
            problems
                .at(
                    sources,
                    Code::MissingProperty,
                    written.key.span,
                    format!("`{property}` needs `{needed}`"),
                    format!("no `{needed}` to apply it to"),
                )
                .help(format!("add `{needed}=…`, or remove `{property}`"));
        }
    }
    for (low, high) in spec.ordered {
        let number = |name: &str| match props.get(name) {
            Some(Value::Number(n)) => Some(*n),
            Some(Value::Integer(i)) => Some(*i as f64),
            _ => None,
        };
        if let (Some(low_value), Some(high_value), Some(low_span), Some(high_span)) =
            (number(low), number(high), spans.get(*low), spans.get(*high))
            && low_value > high_value
        {
            problems
                .at(
                    sources,
                    Code::BadValue,
                    *low_span,
                    format!("`{low}` is above `{high}`: no value is both"),
                    format!("{low_value} here"),
                )
                .also(*high_span, format!("{high_value} here"))
                .help(format!("`{low}` is the lowest value allowed and `{high}` the highest; swap them?"));
        }
    }
    for (property, other) in spec.distinct {
        if let (Some(value), Some(span), Some(other_span)) =
            (props.get(property), spans.get(*property), spans.get(*other))
            && props.get(other) == Some(value)
        {
            problems
                .at(
                    sources,
                    Code::BadValue,
                    *span,
                    format!("`{property}` is `{other}`: it would be compared with itself"),
                    "the same",
                )
                .also(*other_span, format!("`{other}` here"))
                .help(format!("name another `{property}`, or leave it out"));
        }
    }

    let mut body = vec![];
    if spec.role == Role::Loop {
        for child in &node.children {
            if let Some(step) = check_node(child, vocabulary, sources, problems, true) {
                body.push(step);
            }
        }
        if node.children.is_empty() {
            problems
                .at(
                    sources,
                    Code::MissingProperty,
                    name.span,
                    format!("loop `{}` has no steps", name.value),
                    "empty loop",
                )
                .help("put the steps to repeat inside `{ … }`");
        }
    } else if let Some(child) = node.children.first() {
        problems
            .at(
                sources,
                Code::MisplacedNode,
                child.kind.span,
                format!("`{kind}` cannot hold other nodes"),
                "unexpected child",
            )
            .help("only `loop-until` has a body; move this node to the top level");
    }
    Some(Declaration { spec, name, props, spans, body, span: node.span })
}

/// The longest name: a step's name is a directory's, and a file system's limit is 255 bytes.
pub const MOST_NAME_LENGTH: usize = 100;

fn is_kebab_case(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// A default written in a spec, checked like user input (a spec with a bad default is a bug
/// that the language-reference test catches).
pub fn default_value(ty: ValueType, default: &str) -> Option<Value> {
    let document = kdl::KdlDocument::parse(&format!("x {default}")).ok()?;
    let entry = document.nodes().first()?.entries().first()?;
    let literal = match entry.value() {
        kdl::KdlValue::String(s) => Literal::String(s.clone()),
        kdl::KdlValue::Integer(i) => Literal::Integer(*i),
        kdl::KdlValue::Float(f) => Literal::Float(*f),
        kdl::KdlValue::Bool(b) => Literal::Bool(*b),
        kdl::KdlValue::Null => Literal::Null,
    };
    convert(ty, &literal, None).ok()
}

/// Where a string value's characters start in its source, with its length; `None` when they do
/// not stand there as written (then the whole value is shown).
fn string_start(sources: &Sources, span: Span, value: &Literal) -> Option<(usize, usize)> {
    let Literal::String(value) = value else { return None };
    Some((sources.string_start(span)?, value.len()))
}

fn check_value(ty: ValueType, property: &Property, sources: &Sources, problems: &mut Problems) -> Option<Value> {
    let span = property.value.span;
    match convert(ty, &property.value.value, Some((sources, span))) {
        Ok(value) => Some(value),
        Err(ValueError { code, message, label, help, offset }) => {
            let span = match offset.zip(string_start(sources, span, &property.value.value)) {
                // Point inside the string at the exact characters; at its last one for what is
                // missing at its end.
                Some(((start, len), (at, value_len))) => {
                    let start = start.min(value_len.saturating_sub(1));
                    Span { file: span.file, range: (at + start, len.max(1)).into() }
                }
                None => span,
            };
            let key = &property.key.value;
            let message = message.unwrap_or_else(|| match &property.value.value {
                Literal::String(s) if s.is_empty() => format!("`{key}` is empty"),
                _ => format!("`{key}` expects {}", ty.describe()),
            });
            let builder = problems.at(sources, code, span, message, label);
            if let Some(help) = help {
                builder.help(help);
            }
            None
        }
    }
}

struct ValueError {
    code: Code,
    message: Option<String>,
    label: String,
    help: Option<String>,
    /// A byte range inside the string value, where the problem is.
    offset: Option<(usize, usize)>,
}

fn wrong_type(literal: &Literal) -> ValueError {
    ValueError {
        code: Code::WrongType,
        message: None,
        label: format!("found {}", literal.describe()),
        help: None,
        offset: None,
    }
}

fn bad_value(label: impl Into<String>, help: impl Into<String>) -> ValueError {
    ValueError { code: Code::BadValue, message: None, label: label.into(), help: Some(help.into()), offset: None }
}

/// A value of the right type outside its range, which the message gives.
fn out_of_range() -> ValueError {
    ValueError { code: Code::BadValue, message: None, label: "out of range".into(), help: None, offset: None }
}

/// What to write instead of a path with `\` (an escape in a KDL string: `\t` is a tab, `\m` none).
pub const WINDOWS_PATH: &str = "a `\\` in a KDL string starts an escape (`\\t` is a tab): write paths with `/`, or as a raw string, `#\"data\\train.jsonl\"#`";

/// Whether the file starts as a GGUF file does: what llama.cpp would otherwise reject only when
/// a step loads it, with a message that does not say why.
fn is_gguf(path: &std::path::Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}

/// Converts a literal to a value of `ty`. `at` is where it was written (for relative paths);
/// defaults have no place.
fn convert(ty: ValueType, literal: &Literal, at: Option<(&Sources, Span)>) -> Result<Value, ValueError> {
    let string = match literal {
        Literal::String(s) => Some(s.as_str()),
        _ => None,
    };
    // Empty, no property means anything: `stop=""` would end nothing, `title=""` head nothing,
    // `status=""` keep nothing. (Spaces alone are text, a stop sequence of its own.)
    if string.is_some_and(|s| if ty == ValueType::Text { s.is_empty() } else { s.trim().is_empty() }) {
        return Err(bad_value("empty", "give a value, or leave the property out"));
    }
    match ty {
        ValueType::Text => string.map(|s| Value::Text(s.to_string())).ok_or_else(|| wrong_type(literal)),
        ValueType::EnvVar => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            let mut chars = s.chars();
            let first_fits = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if first_fits && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                Ok(Value::Text(s.to_string()))
            } else {
                Err(bad_value(
                    "not a variable's name",
                    "give the name of the environment variable that holds the value, such as \"OPENAI_API_KEY\", not the value",
                ))
            }
        }
        ValueType::Server => servers(string.ok_or_else(|| wrong_type(literal))?),
        ValueType::Integer { min, max } => match literal {
            Literal::Integer(i) if (min as i128..=max as i128).contains(i) => Ok(Value::Integer(*i as i64)),
            // Past `i64::MAX` the type's description names no upper bound.
            Literal::Integer(i) if *i > max as i128 => {
                Err(ValueError { label: format!("larger than {}", super::schema::thousands(max)), ..out_of_range() })
            }
            Literal::Integer(_) => Err(out_of_range()),
            _ => Err(wrong_type(literal)),
        },
        ValueType::Number { min, max } => {
            let n = match literal {
                Literal::Integer(i) => *i as f64,
                Literal::Float(f) => *f,
                _ => return Err(wrong_type(literal)),
            };
            if !n.is_finite() || n < min || n > max {
                return Err(out_of_range());
            }
            Ok(Value::Number(n))
        }
        ValueType::Bool => match literal {
            Literal::Bool(b) => Ok(Value::Bool(*b)),
            _ => Err(ValueError {
                help: Some("KDL writes booleans as `#true` and `#false`".into()),
                ..wrong_type(literal)
            }),
        },
        ValueType::Duration { min, max } => {
            let s = string.ok_or_else(|| ValueError {
                help: Some("write a duration with its unit, in quotes: \"5s\", \"500ms\", \"2m\"".into()),
                ..wrong_type(literal)
            })?;
            // humantime's own message lists units (months, years) no duration here may use.
            let duration = humantime::parse_duration(s).map_err(|_| {
                let problem = if s.trim_start().starts_with('-') { "a negative duration" } else { "not a duration" };
                bad_value(problem, "write a number with a unit: \"500ms\", \"5s\", \"2m\", \"1h\"")
            })?;
            if (min..=max).contains(&duration) { Ok(Value::Duration(duration)) } else { Err(out_of_range()) }
        }
        ValueType::Size { min, max } => {
            let s = string.ok_or_else(|| ValueError {
                help: Some("write a size with its unit, in quotes: \"256MiB\", \"1GiB\"".into()),
                ..wrong_type(literal)
            })?;
            // Trimmed as durations are; a bare number could mean bytes or megabytes, so it needs its unit.
            let s = s.trim();
            if let Ok(bytes) = s.parse::<u64>() {
                return Err(bad_value(
                    "no unit",
                    format!("write it with its unit: {bytes} bytes is \"{}\"", super::schema::size_text(bytes)),
                ));
            }
            let size = s
                .parse::<bytesize::ByteSize>()
                .map_err(|_| bad_value("not a size", "write a number with a unit: \"256MiB\", \"1GiB\", \"500kB\""))?
                .as_u64();
            if (min..=max).contains(&size) { Ok(Value::Size(size)) } else { Err(out_of_range()) }
        }
        ValueType::Choice(options) => {
            // Trimmed, as lists' items are.
            let s = string.ok_or_else(|| wrong_type(literal))?.trim();
            if options.contains(&s) { Ok(Value::Choice(s.to_string())) } else { Err(unknown_choice(s, options, 0)) }
        }
        ValueType::Choices(options) => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            let mut list = vec![];
            for (item, at) in items(s) {
                if !options.contains(&item) {
                    return Err(unknown_choice(item, options, at));
                }
                if list.iter().any(|listed| listed == item) {
                    return Err(listed_twice(item, at));
                }
                list.push(item.to_string());
            }
            Ok(Value::Choices(list))
        }
        ValueType::Integers => {
            let s = match literal {
                Literal::Integer(i) => match i64::try_from(*i) {
                    Ok(k) if k > 0 => return Ok(Value::Integers(vec![k])),
                    _ => return Err(bad_value("not a positive integer within range", "write for example 10")),
                },
                Literal::String(s) => s,
                _ => return Err(wrong_type(literal)),
            };
            let mut list = vec![];
            for (item, at) in items(s) {
                let Some(k) = item.parse::<i64>().ok().filter(|k| *k > 0) else {
                    return Err(bad_value("not a list of positive integers", "write for example \"1,10\""));
                };
                if list.contains(&k) {
                    return Err(listed_twice(item, at));
                }
                list.push(k);
            }
            Ok(Value::Integers(list))
        }
        ValueType::Input(_) => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            Ok(Value::Reference(s.to_string()))
        }
        // A file name ends in `.gguf` and a PEFT directory's path has a `/`; anything else names
        // a step.
        ValueType::Adapter => match string {
            Some(s) if s.to_ascii_lowercase().ends_with(".gguf") || s.contains('/') => {
                let peft = at.and_then(|(sources, span)| match resolve(sources, span.file, s) {
                    Some(Location::File(path)) if path.is_dir() => Some(Value::File(path)),
                    _ => None,
                });
                let file = match peft {
                    Some(dir) => dir,
                    None => convert(ValueType::File, literal, at)?,
                };
                if let Value::File(path) = &file
                    && at.is_some()
                    && let Err(why) = crate::train::Lora::check_file(path, None)
                {
                    return Err(ValueError {
                        code: Code::BadValue,
                        message: Some(why.to_string()),
                        label: "not a LoRA adapter".into(),
                        help: Some(
                            "name a LoRA adapter: a GGUF file, such as the `adapter.gguf` a `finetune-lora` step \
                             writes, or a PEFT directory (`adapter_config.json`, `adapter_model.safetensors`)"
                                .into(),
                        ),
                        offset: None,
                    });
                }
                Ok(file)
            }
            Some(s) => Ok(Value::Reference(s.to_string())),
            None => Err(wrong_type(literal)),
        },
        ValueType::Model => string.map(|s| Value::Model(s.to_string())).ok_or_else(|| wrong_type(literal)),
        ValueType::ModelFile if string.is_some_and(|s| crate::assets::builtin_model(s).is_some()) => {
            Ok(Value::BuiltinModel(string.unwrap_or_default().to_string()))
        }
        // A file of text that a step reads only when it runs: checked now, not minutes into a loop.
        ValueType::Template(_) | ValueType::RevisionExamples => {
            let file = convert(ValueType::File, literal, at)?;
            let (Value::File(path), Some(_)) = (&file, at) else { return Ok(file) };
            let text = crate::stdlib::read_to_string(path).map_err(|e| ValueError {
                code: Code::MissingFile,
                message: Some(format!("cannot read `{}`: {e}", path.display())),
                label: "unreadable".into(),
                help: None,
                offset: None,
            })?;
            let checked = match ty {
                ValueType::Template(values) => crate::llm::prompt::check(&text, values).map_err(|e| e.to_string()),
                _ => crate::llm::prompt::revision_examples(&text).map(drop),
            };
            checked.map(|()| file).map_err(|why| ValueError {
                code: Code::BadValue,
                message: Some(format!("`{}` cannot be used: {why}", string.unwrap_or_default())),
                label: "not usable".into(),
                help: (ty == ValueType::RevisionExamples).then(|| format!("write {}", ty.describe())),
                offset: None,
            })
        }
        ValueType::File | ValueType::ModelFile => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            if s.is_empty() {
                return Err(bad_value("empty", "name a file"));
            }
            let Some((sources, span)) = at else {
                return Ok(Value::File(PathBuf::from(s)));
            };
            match resolve(sources, span.file, s) {
                Some(Location::File(path)) if ty == ValueType::ModelFile && crate::train::is_model_dir(&path) => {
                    Ok(Value::File(path))
                }
                Some(Location::File(path)) if path.is_dir() => Err(ValueError {
                    code: Code::MissingFile,
                    message: Some(format!("`{s}` is a directory, not a file")),
                    label: "a directory".into(),
                    help: Some("name a file in it".into()),
                    offset: None,
                }),
                // A device or a pipe (`/dev/zero`) would be read, or hashed, forever.
                Some(Location::File(path)) if path.metadata().is_ok_and(|m| !m.is_file()) => Err(ValueError {
                    code: Code::MissingFile,
                    message: Some(format!("`{s}` is not a regular file")),
                    label: "not a file".into(),
                    help: Some("name a file".into()),
                    offset: None,
                }),
                Some(Location::File(path)) if ty == ValueType::ModelFile && !is_gguf(&path) => Err(ValueError {
                    code: Code::BadValue,
                    message: Some(format!("`{s}` is not a GGUF model file")),
                    label: "not GGUF".into(),
                    help: Some("llama.cpp reads models in GGUF (a file that starts with the bytes `GGUF`)".into()),
                    offset: None,
                }),
                Some(Location::File(path)) if ty == ValueType::ModelFile => match crate::train::check_complete(&path) {
                    Ok(()) => Ok(Value::File(path)),
                    Err(why) => Err(ValueError {
                        code: Code::BadValue,
                        message: Some(format!("`{s}` is not a whole GGUF model: {why}")),
                        label: "cut short".into(),
                        help: Some("fetch or convert the model again".into()),
                        offset: None,
                    }),
                },
                Some(Location::File(path)) => Ok(Value::File(path)),
                Some(Location::Stdlib(name)) => Ok(Value::File(PathBuf::from(name))),
                None => Err(ValueError {
                    code: Code::MissingFile,
                    message: Some(format!("cannot find `{s}`")),
                    label: "no such file".into(),
                    help: Some({
                        // A `--set` override has no file: its paths are relative to where the
                        // command runs, as a shell's are.
                        let relative_to = match sources.get(span.file).path {
                            Some(_) => "this workflow file",
                            None => "the current directory (as every path given with `--set` is)",
                        };
                        match ty {
                            // `"data\train.jsonl"`: KDL read `\t` as a tab.
                            _ if s.contains(['\t', '\n', '\r', '\u{8}', '\u{c}']) => WINDOWS_PATH.to_string(),
                            ValueType::ModelFile => {
                                let names: Vec<String> = crate::assets::BUILTIN_MODELS
                                    .iter()
                                    .map(|(name, _)| format!("\"{name}\""))
                                    .collect();
                                format!(
                                    "use a built-in model ({}), or a path relative to {relative_to}",
                                    names.join(" or ")
                                )
                            }
                            _ => format!("paths are relative to {relative_to}"),
                        }
                    }),
                    offset: None,
                }),
            }
        }
        ValueType::Metric => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            match s.rsplit_once('.') {
                Some((step, metric)) if !step.is_empty() && !metric.is_empty() => {
                    Ok(Value::Metric { step: step.to_string(), metric: metric.to_string() })
                }
                _ => Err(bad_value(
                    "not `step.metric`",
                    "name a step and one of its metrics, for example \"scores.pass@1\"",
                )),
            }
        }
        ValueType::Expression => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            Expr::parse(s).map(Value::Expression).map_err(|e| ValueError {
                code: Code::BadExpression,
                message: Some(format!("invalid `until` expression: {}", e.message)),
                label: e.message.clone(),
                help: Some(
                    e.help.unwrap_or("compare metrics with numbers: `revised.count == 0 || iteration >= 3`").into(),
                ),
                offset: Some((e.offset, e.len)),
            })
        }
        ValueType::Statuses => {
            let s = string.ok_or_else(|| wrong_type(literal))?;
            let (negated, list) = match s.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, s),
            };
            let mut statuses = vec![];
            for (item, at) in items(list) {
                let at = at + usize::from(negated);
                match Status::parse(item) {
                    Some(status) if statuses.contains(&status) => return Err(listed_twice(item, at)),
                    Some(status) => statuses.push(status),
                    None => return Err(unknown_choice(item, Status::NAMES, at)),
                }
            }
            if negated && statuses.len() == Status::NAMES.len() {
                return Err(bad_value(
                    "keeps no status",
                    "`!` keeps every status but those listed, and this lists them all: leave one out",
                ));
            }
            Ok(Value::Statuses(StatusFilter { negated, statuses }))
        }
    }
}

/// `"spawn"`, or servers' base URLs, comma-separated.
fn servers(s: &str) -> Result<Value, ValueError> {
    const HELP: &str = "give the server's base URL (`http://host:8080` or `…/v1`; several separated by commas), or \
                        \"spawn\" to have seedflow start llama-server";
    if s == "spawn" {
        return Ok(Value::Text(s.to_string()));
    }
    let mut listed = vec![];
    for (url, at) in items(s) {
        if let Some(why) = url_problem(url) {
            return Err(bad_value(if url == s { why } else { format!("`{url}`: {why}") }, HELP));
        }
        // seedflow adds the endpoints' paths itself.
        let base = url.trim_end_matches('/');
        if let Some(path) = ["/chat/completions", "/completions", "/models"].into_iter().find(|p| base.ends_with(p)) {
            return Err(ValueError {
                message: Some(format!("`{url}` names an endpoint, not the server")),
                ..bad_value(
                    format!("ends in `{path}`"),
                    format!("give the server's base URL, without `{path}`: seedflow adds each endpoint's path"),
                )
            });
        }
        // A server listed twice would get twice the requests, not share them with another.
        if listed.contains(&base) {
            return Err(listed_twice(url, at));
        }
        listed.push(base);
    }
    Ok(Value::Text(s.to_string()))
}

/// Why `url` is not a server's base URL, if it is not: it needs a host, a port from 1 to 65535 if
/// any (the HTTP client takes another as port 80), and no query or fragment, which the endpoints'
/// paths would follow.
fn url_problem(url: &str) -> Option<String> {
    let uri = url.parse::<ureq::http::Uri>().ok();
    let Some(uri) = uri.filter(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|host| !host.is_empty())
    }) else {
        return Some("not a server".into());
    };
    let host_port = uri.authority().map_or("", |a| a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h));
    if let Some((_, port)) = host_port.rsplit_once(':').filter(|(_, port)| !port.contains(']'))
        && !port.parse::<u16>().is_ok_and(|port| port > 0)
    {
        return Some(format!("port `{port}` is not from 1 to 65535"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Some("a query or fragment, which seedflow's endpoint paths would follow".into());
    }
    None
}

fn unknown_choice(word: &str, options: &[&str], offset: usize) -> ValueError {
    let help = match did_you_mean(word, options.iter().copied()) {
        Some(best) => format!("did you mean `{best}`?"),
        None => format!("choose from {}", quoted_list(options)),
    };
    ValueError {
        code: Code::BadValue,
        message: Some(format!("`{word}` is not one of {}", quoted_list(options))),
        label: "unknown value".into(),
        help: Some(help),
        offset: Some((offset, word.len())),
    }
}

/// A comma-separated list's items, trimmed, each with where it starts in the list.
fn items(list: &str) -> impl Iterator<Item = (&str, usize)> {
    list.split(',').scan(0, |start, item| {
        let trimmed = item.trim();
        let at = *start + item.find(trimmed).unwrap_or(0);
        *start += item.len() + 1;
        Some((trimmed, at))
    })
}

/// An item a list holds already: a mistake for another item, or a copy to remove.
fn listed_twice(word: &str, offset: usize) -> ValueError {
    ValueError {
        code: Code::BadValue,
        message: Some(format!("`{word}` is listed twice")),
        label: "again here".into(),
        help: Some("list each item once".into()),
        offset: Some((offset, word.len())),
    }
}

fn quoted_list(options: &[&str]) -> String {
    options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
}
