//! Checked declarations -> an executable plan: every reference resolved to a step, the types of
//! inputs checked, and the steps put in a petgraph DAG (one per scope: the top level and each
//! loop body). A cycle is an error that names its path.

mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

pub use render::{to_dot, to_mermaid};

use crate::data::pass_at_k;
use crate::dsl::expr::{Expr, MetricName};
use crate::dsl::lower::{Location, resolve};
use crate::dsl::schema::{Artifact, Role, Value, ValueType, Vocabulary};
use crate::dsl::{Checked, Code, Declaration, Problems, Sources, Span};

/// Where an input comes from, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A step of the same scope.
    Local(String),
    /// A top-level step, read from inside a loop.
    Outer(String),
    /// `prev.step`: the step's output in the loop's previous iteration (none in the first).
    Prev(String),
    /// `loop.step`: a step inside a loop, as of the loop's last iteration.
    InLoop { loop_name: String, step: String },
}

/// As a workflow writes it: `step`, `prev.step`, `loop.step`.
impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local(step) | Source::Outer(step) => write!(f, "{step}"),
            Source::Prev(step) => write!(f, "prev.{step}"),
            Source::InLoop { loop_name, step } => write!(f, "{loop_name}.{step}"),
        }
    }
}

impl Source {
    /// The step in the caller's graph that must finish first, if any.
    fn dependency(&self) -> Option<&str> {
        match self {
            Source::Local(step) | Source::Outer(step) => Some(step),
            Source::InLoop { loop_name, .. } => Some(loop_name),
            Source::Prev(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Input {
    /// The property that names it (`tasks`, `from`, …).
    pub property: String,
    pub source: Source,
    /// What the referenced step produces.
    pub artifact: Artifact,
}

#[derive(Debug)]
pub struct PlannedStep {
    pub declaration: Declaration,
    pub inputs: Vec<Input>,
    /// For `loop-until`: the steps it repeats.
    pub body: Option<Graph>,
}

impl PlannedStep {
    pub fn name(&self) -> &str {
        &self.declaration.name.value
    }

    pub fn kind(&self) -> &'static str {
        self.declaration.spec.name
    }

    pub fn input(&self, property: &str) -> Option<&Input> {
        self.inputs.iter().find(|i| i.property == property)
    }
}

/// The steps of one scope and the order they depend on each other.
#[derive(Debug)]
pub struct Graph {
    pub steps: Vec<PlannedStep>,
    /// An edge `a -> b` says b reads a's output; node weights index `steps`.
    pub dag: DiGraph<usize, String>,
    /// Steps in an order where each comes after everything it reads.
    pub order: Vec<usize>,
}

impl Graph {
    pub fn index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name() == name)
    }

    /// Indices of the steps `index` waits for.
    pub fn dependencies(&self, index: usize) -> Vec<usize> {
        self.dag.neighbors_directed(NodeIndex::new(index), petgraph::Direction::Incoming).map(|n| self.dag[n]).collect()
    }
}

/// A workflow ready to run.
#[derive(Debug)]
pub struct Plan {
    pub sources: Sources,
    pub name: String,
    pub seed: u64,
    /// The workflow file; relative paths of run directories are not relative to it.
    pub file: PathBuf,
    pub models: BTreeMap<String, Declaration>,
    pub graph: Graph,
}

impl Plan {
    /// Every step with the loop that holds it, in run order.
    pub fn all_steps(&self) -> Vec<(Option<&PlannedStep>, &PlannedStep)> {
        let mut out = vec![];
        for &i in &self.graph.order {
            let step = &self.graph.steps[i];
            out.push((None, step));
            if let Some(body) = &step.body {
                out.extend(body.order.iter().map(|&j| (Some(step), &body.steps[j])));
            }
        }
        out
    }
}

/// A workflow without a `workflow` node is named after its file, made kebab-case like a declared
/// name: the name becomes a directory under `runs/`, so `...kdl` must not make it `runs/..`.
fn name_from_file(file: &Path) -> String {
    let stem = file.file_stem().map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_default();
    let words: Vec<&str> = stem.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let name = match words.join("-") {
        name if name.starts_with(|c: char| c.is_ascii_lowercase()) => name,
        name if name.is_empty() => "workflow".to_string(),
        name => format!("workflow-{name}"),
    };
    name[..name.len().min(crate::dsl::check::MOST_NAME_LENGTH)].trim_end_matches('-').to_string()
}

/// Builds the plan, or reports every problem found in resolving and ordering it.
pub fn build(
    checked: Checked,
    vocabulary: &Vocabulary,
    sources: Sources,
    file: PathBuf,
    problems: &mut Problems,
) -> Option<Plan> {
    let (name, seed) = match &checked.workflow {
        Some(w) => {
            let name = if w.name.value.is_empty() { name_from_file(&file) } else { w.name.value.clone() };
            (name, w.props.integer("seed").map_or(0, |s| s as u64))
        }
        None => (name_from_file(&file), 0),
    };
    let models: BTreeMap<String, Declaration> = checked.models.into_iter().map(|m| (m.name.value.clone(), m)).collect();
    let scope = Scope { vocabulary, sources: &sources, broken: &checked.broken, models: &models, top: &checked.steps };
    for model in models.values() {
        scope.check_values(model, problems);
    }

    let mut top_steps = vec![];
    for declaration in &checked.steps {
        let mut step = PlannedStep { declaration: declaration.clone(), inputs: vec![], body: None };
        if declaration.spec.role == Role::Loop {
            let mut body_steps = vec![];
            for inner in &declaration.body {
                let inputs = scope.resolve_inputs(inner, Some(declaration), problems);
                scope.check_values(inner, problems);
                scope.check_ks(inner, problems);
                scope.check_training_data(inner, problems);
                body_steps.push(PlannedStep { declaration: inner.clone(), inputs, body: None });
            }
            scope.check_until(declaration, problems);
            // The loop waits for whatever its body reads from outside.
            let mut outer: Vec<Input> = vec![];
            for inner in &body_steps {
                for input in &inner.inputs {
                    if matches!(input.source, Source::Outer(_) | Source::InLoop { .. })
                        && !outer.iter().any(|o| o.source == input.source)
                    {
                        outer.push(input.clone());
                    }
                }
            }
            step.inputs = outer;
            step.body = order_graph(body_steps, &sources, problems);
        } else {
            step.inputs = scope.resolve_inputs(declaration, None, problems);
            scope.check_values(declaration, problems);
            scope.check_ks(declaration, problems);
            scope.check_training_data(declaration, problems);
        }
        top_steps.push(step);
    }
    let graph = order_graph(top_steps, &sources, problems)?;
    if !problems.is_empty() {
        return None;
    }
    Some(Plan { sources, name, seed, file, models, graph })
}

struct Scope<'a> {
    vocabulary: &'a Vocabulary,
    sources: &'a Sources,
    broken: &'a [String],
    models: &'a BTreeMap<String, Declaration>,
    top: &'a [Declaration],
}

/// What a reference names, before its type is checked.
struct Found<'a> {
    source: Source,
    declaration: &'a Declaration,
}

impl<'a> Scope<'a> {
    fn top_step(&self, name: &str) -> Option<&'a Declaration> {
        self.top.iter().find(|d| d.name.value == name)
    }

    /// The loop holding a step named `name`, if one does.
    fn loop_holding(&self, name: &str) -> Option<(&'a Declaration, &'a Declaration)> {
        self.top.iter().find_map(|l| l.body.iter().find(|s| s.name.value == name).map(|s| (l, s)))
    }

    /// The step of that name, at the top level or in a loop.
    fn step_named(&self, name: &str) -> Option<&'a Declaration> {
        self.top_step(name).or_else(|| self.loop_holding(name).map(|(_, step)| step))
    }

    fn all_names(&self, within: Option<&Declaration>) -> Vec<String> {
        // A loop is no step's input: its steps are, as `loop.step`.
        let steps = self.top.iter().filter(|d| d.spec.role != Role::Loop);
        let mut names: Vec<String> = steps.map(|d| d.name.value.clone()).collect();
        for l in self.top {
            for s in &l.body {
                if within.is_some_and(|w| w.name.value == l.name.value) {
                    names.push(s.name.value.clone());
                    names.push(format!("prev.{}", s.name.value));
                } else {
                    names.push(format!("{}.{}", l.name.value, s.name.value));
                }
            }
        }
        names
    }

    /// Resolves `reference` written at `span` in a step inside `within` (or at the top).
    fn find(
        &self,
        reference: &str,
        span: Span,
        within: Option<&'a Declaration>,
        problems: &mut Problems,
    ) -> Option<Found<'a>> {
        let sources = self.sources;
        if let Some(step) = reference.strip_prefix("prev.") {
            let Some(current) = within else {
                problems
                    .at(
                        sources,
                        Code::PrevOutsideLoop,
                        span,
                        "`prev.` is only meaningful inside a loop",
                        "outside any loop",
                    )
                    .help(match self.loop_holding(step) {
                        Some((l, _)) => format!("to read the loop's last iteration, write `{}.{step}`", l.name.value),
                        None => "`prev.step` reads a step's output from the loop's previous iteration".to_string(),
                    });
                return None;
            };
            return match current.body.iter().find(|s| s.name.value == step) {
                Some(declaration) => Some(Found { source: Source::Prev(step.to_string()), declaration }),
                None => {
                    self.unknown(reference, span, within, problems);
                    None
                }
            };
        }
        if let Some((outer, inner)) = reference.split_once('.') {
            if let Some(l) = self.top.iter().find(|d| d.name.value == outer && d.spec.role == Role::Loop) {
                if within.is_some_and(|w| w.name.value == outer) {
                    problems
                        .at(
                            sources,
                            Code::UnknownStep,
                            span,
                            format!("`{reference}` names the loop this step is in"),
                            "inside the same loop",
                        )
                        .help(format!(
                            "write `{inner}` for this iteration's output, or `prev.{inner}` for the previous one"
                        ));
                    return None;
                }
                if let Some(declaration) = l.body.iter().find(|s| s.name.value == inner) {
                    let source = Source::InLoop { loop_name: outer.to_string(), step: inner.to_string() };
                    return Some(Found { source, declaration });
                }
            }
            self.unknown(reference, span, within, problems);
            return None;
        }
        if let Some(current) = within
            && let Some(declaration) = current.body.iter().find(|s| s.name.value == reference)
        {
            return Some(Found { source: Source::Local(reference.to_string()), declaration });
        }
        if let Some(declaration) = self.top_step(reference) {
            if declaration.spec.role == Role::Loop {
                problems
                    .at(
                        sources,
                        Code::WrongInput,
                        span,
                        format!("`{reference}` is a loop, which has no output of its own"),
                        "a loop",
                    )
                    .help(match declaration.body.last() {
                        Some(last) => format!("name a step inside it, for example `{reference}.{}`", last.name.value),
                        None => "name a step inside it as `loop.step`".to_string(),
                    });
                return None;
            }
            let source = if within.is_some() {
                Source::Outer(reference.to_string())
            } else {
                Source::Local(reference.to_string())
            };
            return Some(Found { source, declaration });
        }
        if let Some((l, _)) = self.loop_holding(reference) {
            problems
                .at(
                    sources,
                    Code::UnknownStep,
                    span,
                    format!("`{reference}` is inside loop `{}`", l.name.value),
                    "not visible here",
                )
                .help(format!("refer to its last iteration as `{}.{reference}`", l.name.value));
            return None;
        }
        if self.models.contains_key(reference) {
            problems
                .at(sources, Code::WrongInput, span, format!("`{reference}` is a model, not a step"), "a model")
                .help("models are used with `model=`; this property takes a step's output");
            return None;
        }
        self.unknown(reference, span, within, problems);
        None
    }

    fn unknown(&self, reference: &str, span: Span, within: Option<&Declaration>, problems: &mut Problems) {
        // A node that failed its own check was reported already; references to it add nothing.
        if self.broken.iter().any(|b| b == reference) {
            return;
        }
        let names = self.all_names(within);
        let builder =
            problems.at(self.sources, Code::UnknownStep, span, format!("no step named `{reference}`"), "unknown step");
        match crate::dsl::diagnostics::did_you_mean(reference, names.iter().map(String::as_str)) {
            Some(best) => builder.help(format!("did you mean `{best}`?")),
            None => builder.help("a reference names a step defined in this workflow"),
        };
    }

    fn resolve_inputs(
        &self,
        declaration: &Declaration,
        within: Option<&'a Declaration>,
        problems: &mut Problems,
    ) -> Vec<Input> {
        let sources = self.sources;
        let mut inputs = vec![];
        for property in declaration.spec.properties {
            let span = declaration.span_of(property.name);
            let accepted = match property.ty {
                ValueType::Input(accepted) => accepted,
                ValueType::Adapter => &[Artifact::Adapter],
                _ => &[],
            };
            match (property.ty, declaration.props.get(property.name)) {
                (ValueType::Input(_) | ValueType::Adapter, Some(Value::Reference(reference))) => {
                    // An adapter's directory written without a `/` reads as a step's name.
                    if property.ty == ValueType::Adapter
                        && self.step_named(reference).is_none()
                        && let Some(Location::File(path)) = resolve(sources, span.file, reference)
                    {
                        problems
                            .at(sources, Code::UnknownStep, span, format!("no step named `{reference}`"), "unknown step")
                            .help(format!(
                                "`{reference}` is a {} here: write `./{reference}` to use it (a name alone names a step)",
                                if path.is_dir() { "directory" } else { "file" }
                            ));
                        continue;
                    }
                    let Some(found) = self.find(reference, span, within, problems) else {
                        continue;
                    };
                    // A loop's first iteration has no previous one: only a property that may
                    // be left unset (an adapter to start from) can read `prev.`.
                    if property.required && matches!(found.source, Source::Prev(_)) {
                        problems
                            .at(
                                sources,
                                Code::WrongInput,
                                span,
                                format!("`{}` is required, but `{reference}` is nothing in the loop's first iteration", property.name),
                                "empty in iteration 1",
                            )
                            .help(format!(
                                "read `prev.` only in properties that may be unset, such as `adapter`; `{}` is this iteration's output",
                                found.declaration.name.value
                            ));
                        continue;
                    }
                    let Role::Step(artifact) = found.declaration.spec.role else {
                        continue;
                    };
                    if !accepted.contains(&artifact) {
                        let wanted: Vec<_> = accepted.iter().map(|a| a.noun()).collect();
                        let producers: Vec<_> = self
                            .vocabulary
                            .kinds()
                            .iter()
                            .filter(|k| matches!(k.role, Role::Step(a) if accepted.contains(&a)))
                            .map(|k| format!("`{}`", k.name))
                            .collect();
                        problems
                            .at(
                                sources,
                                Code::WrongInput,
                                span,
                                format!(
                                    "`{}` expects {}, but `{reference}` produces {}",
                                    property.name,
                                    wanted.join(" or "),
                                    artifact.noun()
                                ),
                                format!("{} step", found.declaration.spec.name),
                            )
                            .also(found.declaration.name.span, "defined here")
                            .help(format!("name a step of kind {}", producers.join(" or ")));
                        continue;
                    }
                    // (A `history` reads the pairs an adapter was trained on, which fit any model.)
                    if property.ty == ValueType::Adapter
                        && let Some((trained_for, runs)) = self.other_model(found.declaration, declaration)
                    {
                        problems
                            .at(
                                sources,
                                Code::WrongInput,
                                span,
                                format!("`{reference}` trains an adapter for model `{trained_for}`, but this step runs `{runs}`"),
                                format!("trained for `{trained_for}`"),
                            )
                            .help("an adapter works with the model it was trained on only: use the same `model`");
                        continue;
                    }
                    inputs.push(Input { property: property.name.to_string(), source: found.source, artifact });
                }
                (ValueType::Metric, Some(Value::Metric { step, metric })) => {
                    let Some(found) = self.find(step, span, within, problems) else {
                        continue;
                    };
                    // A gate runs every iteration, the first included, which has no previous one.
                    if let Source::Prev(previous) = &found.source {
                        problems
                            .at(
                                sources,
                                Code::WrongInput,
                                span,
                                format!(
                                    "`{}` reads `{step}`, which is nothing in the loop's first iteration",
                                    property.name
                                ),
                                "empty in iteration 1",
                            )
                            .help(format!("check this iteration's metric: `{previous}.{metric}`"));
                        continue;
                    }
                    let Role::Step(artifact) = found.declaration.spec.role else {
                        continue;
                    };
                    if !self.check_metric(found.declaration, metric, span, problems) {
                        continue;
                    }
                    inputs.push(Input { property: property.name.to_string(), source: found.source, artifact });
                }
                // A model node that failed its own check was reported already.
                (ValueType::Model, Some(Value::Model(model)))
                    if !self.models.contains_key(model) && !self.broken.contains(model) =>
                {
                    let builder = problems.at(
                        sources,
                        Code::UnknownModel,
                        span,
                        format!("no model named `{model}`"),
                        "unknown model",
                    );
                    let names: Vec<&str> = self.models.keys().map(String::as_str).collect();
                    let step = self.step_named(model);
                    match (crate::dsl::diagnostics::did_you_mean(model, names.iter().copied()), step) {
                        (Some(best), _) => builder.help(format!("did you mean `{best}`?")),
                        (None, Some(step)) if names.is_empty() => builder.help(format!(
                            "`{model}` is a {} step; declare a model under another name: `model \"coder\" path=\"default\"`",
                            step.spec.name
                        )),
                        (None, Some(step)) => builder.help(format!(
                            "`{model}` is a {} step, not a model; the models are {}",
                            step.spec.name,
                            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                        )),
                        (None, None) => builder.help(format!("declare it: `model \"{model}\" path=\"default\"`")),
                    };
                }
                (ValueType::Adapter, Some(Value::File(adapter))) => {
                    let Some(model) = self.model_file(declaration) else { continue };
                    if let Err(why) = crate::train::Lora::check_file(adapter, Some(&model)) {
                        problems
                            .at(sources, Code::BadValue, span, why.to_string(), "does not fit the step's model")
                            .help("an adapter works with the model it was trained on only");
                    }
                }
                _ => {}
            }
        }
        check_metric_units(declaration, &inputs, sources, problems);
        inputs
    }

    /// What the node's kind checks of its values together, and against its model's file; and that
    /// a step sampling from a model can: llama.cpp reads GGUF files (and so does the llama-server
    /// `spawn` starts), and only a server at a URL samples from a Hugging Face directory (which
    /// `finetune-lora` trains on without one).
    fn check_values(&self, declaration: &Declaration, problems: &mut Problems) {
        if let Some(check_values) = declaration.spec.check_values
            && let Err((property, why)) = check_values(&declaration.props, self.model_file(declaration).as_deref())
        {
            problems.at(self.sources, Code::BadValue, declaration.span_of(property), why, "cannot work here");
        }
        if declaration.spec.role == Role::Step(Artifact::Samples)
            && let Some((name, Value::File(path))) = self.model_of(declaration)
            && path.is_dir()
            && self.models.get(name).is_some_and(|model| match model.props.get("server") {
                Some(Value::Text(server)) => server == "spawn",
                _ => true,
            })
        {
            problems
                .at(
                    self.sources,
                    Code::BadValue,
                    declaration.span_of("model"),
                    format!("`{name}` is a Hugging Face directory, which llama.cpp cannot sample from"),
                    "not a GGUF model",
                )
                .help(format!("give `{name}` the URL of a server that serves it (vLLM, SGLang), or a GGUF `path`"));
        }
    }

    /// `finetune-lora` trains on the passing verdicts of its `data`: a `select` that keeps none
    /// (`status="!passed"`, the errors SEED revises) leaves nothing to train on.
    fn check_training_data(&self, declaration: &Declaration, problems: &mut Problems) {
        if declaration.spec.name != "finetune-lora" {
            return;
        }
        // `history` brings pairs of its own.
        if declaration.props.get("history").is_some() {
            return;
        }
        let Some(Value::Reference(data)) = declaration.props.get("data") else { return };
        let Some(select) = self.step_named(data).filter(|step| step.spec.name == "select") else { return };
        let Some(Value::Statuses(filter)) = select.props.get("status") else { return };
        if !filter.accepts(crate::data::Status::Passed) {
            problems
                .at(
                    self.sources,
                    Code::WrongInput,
                    declaration.span_of("data"),
                    format!("`{data}` keeps no passing verdict, and `finetune-lora` trains on passing ones only"),
                    "nothing to train on",
                )
                .also(select.span_of("status"), "keeps no `passed`")
                .help("train on verdicts that passed: those of the revisions, or `select … status=\"passed\"`");
        }
    }

    /// A `k` list (a `report`'s) asks for pass@k, which takes k programs per task: no more than
    /// its verdicts have.
    fn check_ks(&self, declaration: &Declaration, problems: &mut Problems) {
        if declaration.spec.property("k").is_none_or(|p| p.ty != ValueType::Integers) {
            return;
        }
        let Some(Value::Reference(from)) = declaration.props.get("from") else { return };
        let Some(samples) = self.step_named(from).and_then(|verdicts| self.programs_per_task(verdicts)) else { return };
        if let Some(k) = declaration.props.integers("k").into_iter().find(|k| *k > samples) {
            let has = if samples == 1 { "one program".to_string() } else { format!("{samples} programs") };
            problems
                .at(
                    self.sources,
                    Code::BadValue,
                    declaration.span_of("k"),
                    format!("pass@{k} takes {k} programs per task, and the verdicts of `{from}` have {has}"),
                    "more than the verdicts have",
                )
                .help(format!("generate at least {k} programs per task (`samples`), or leave {k} out"));
        }
    }

    /// The names of the models two steps run, where they are different model files (both
    /// written, as a path or a built-in model's name).
    fn other_model(&self, first: &Declaration, second: &Declaration) -> Option<(String, String)> {
        // A built-in model once fetched is a file like any other; a path by another spelling the same.
        let file = |value| file_of_model(value).map(|path| path.canonicalize().unwrap_or(path));
        let (first_name, first_value) = self.model_of(first)?;
        let (second_name, second_value) = self.model_of(second)?;
        let same = first_value == second_value || file(first_value).is_some_and(|f| Some(f) == file(second_value));
        (!same).then(|| (first_name.to_string(), second_name.to_string()))
    }

    /// The model a step names and its file as written: a path or a built-in model's name.
    fn model_of<'d>(&'d self, declaration: &'d Declaration) -> Option<(&'d str, &'d Value)> {
        let property = declaration.spec.properties.iter().find(|p| p.ty == ValueType::Model)?;
        let Some(Value::Model(name)) = declaration.props.get(property.name) else { return None };
        let model = self.models.get(name)?;
        let file = model.spec.properties.iter().find(|p| p.ty == ValueType::ModelFile)?;
        Some((name, model.props.get(file.name)?))
    }

    /// The GGUF file of the model a step names, if it is at hand (a built-in model once fetched).
    fn model_file(&self, declaration: &Declaration) -> Option<PathBuf> {
        file_of_model(self.model_of(declaration)?.1)
    }

    /// How many programs per task the verdicts of `step` hold at most: for an `execute`, what its
    /// `code` says (one for a dataset's references, a `generate`'s `samples`); a `select` keeps
    /// no more than its verdicts and its `per-task`.
    fn programs_per_task(&self, step: &Declaration) -> Option<i64> {
        let mut step = step;
        let mut most = i64::MAX;
        // A chain of selects, each step named once (a cycle is reported by the graph's check).
        let steps = self.top.len() + self.top.iter().map(|l| l.body.len()).sum::<usize>();
        for _ in 0..=steps {
            let from = |property| match step.props.get(property) {
                Some(Value::Reference(name)) => self.step_named(name),
                _ => None,
            };
            match step.spec.name {
                "select" => {
                    let kept = step.props.integer("per-task").filter(|n| *n > 0).unwrap_or(i64::MAX);
                    most = most.min(kept);
                    step = from("from")?;
                }
                "execute" => {
                    let source = from("code")?;
                    let programs = match source.spec.name {
                        "dataset" => 1,
                        "generate" => source.props.integer("samples")?,
                        _ => return None,
                    };
                    return Some(most.min(programs));
                }
                _ => return None,
            }
        }
        None
    }

    /// Whether the step `declaration` publishes `metric`; says why not when it does not. A step
    /// with a `k` list (a `report`) publishes the pass@k of that list only.
    fn check_metric(&self, declaration: &Declaration, metric: &str, span: Span, problems: &mut Problems) -> bool {
        if !declaration.spec.publishes(metric) {
            self.unknown_metric(declaration, metric, span, problems);
            return false;
        }
        let step = &declaration.name.value;
        if let Some((_, needed)) = declaration.spec.metrics_needing.iter().find(|(m, _)| *m == metric)
            && declaration.props.get(needed).is_none()
        {
            problems
                .at(
                    self.sources,
                    Code::UnknownMetric,
                    span,
                    format!("`{step}` publishes `{metric}` only with a `{needed}`, and has none"),
                    "not published",
                )
                .also(declaration.name.span, format!("no `{needed}`"))
                .help(format!("give `{step}` a `{needed}=…`"));
            return false;
        }
        let ks = declaration.props.integers("k");
        let Some(k) = metric.strip_prefix("pass@").and_then(|k| k.parse::<i64>().ok()) else { return true };
        if declaration.spec.property("k").is_none_or(|p| p.ty != ValueType::Integers) {
            // Without a `k` list (`execute`): pass@1, 5, 10 and 100, those up to its samples per task.
            let samples = self.programs_per_task(declaration);
            if pass_at_k::EXECUTE_KS.iter().any(|&n| n as i64 == k) && samples.is_none_or(|samples| k <= samples) {
                return true;
            }
            let reach = match samples {
                Some(samples) => {
                    format!(" (it runs {samples} program{} per task)", if samples == 1 { "" } else { "s" })
                }
                None => String::new(),
            };
            // pass@k takes k programs per task: a `report` cannot give it from fewer.
            let instead = match samples {
                Some(samples) if k > samples => format!("generate at least {k} programs per task (`samples`)"),
                _ => format!("a `report` step with k=\"{k}\" reports `pass@{k}`"),
            };
            problems
                .at(self.sources, Code::UnknownMetric, span, format!("`{step}` reports no `{metric}`"), "not reported")
                .help(format!(
                    "`{step}` reports pass@1, pass@5, pass@10 and pass@100, those up to its samples per task{reach}; {instead}"
                ));
            return false;
        }
        // A report's pass@k takes k programs per task from the verdicts it reads.
        let verdicts = match declaration.props.get("from") {
            Some(Value::Reference(from)) => self.step_named(from),
            _ => None,
        };
        let samples = verdicts.and_then(|verdicts| self.programs_per_task(verdicts));
        if ks.contains(&k) && samples.is_some_and(|samples| k > samples) {
            problems
                .at(
                    self.sources,
                    Code::UnknownMetric,
                    span,
                    format!(
                        "`{step}` cannot report `{metric}`: its verdicts are of {} per task",
                        match samples {
                            Some(1) => "one program".to_string(),
                            n => format!("{} programs", n.unwrap_or(0)),
                        }
                    ),
                    "not reported",
                )
                .help(format!("generate at least {k} programs per task (`samples`)"));
            return false;
        }
        if ks.contains(&k) {
            return true;
        }
        let listed: Vec<String> = ks.iter().map(|k| format!("pass@{k}")).collect();
        let written: Vec<String> = ks.iter().map(i64::to_string).collect();
        problems
            .at(
                self.sources,
                Code::UnknownMetric,
                span,
                format!("`{step}` reports {}, not `{metric}`", listed.join(", ")),
                "not reported",
            )
            .also(declaration.span_of("k"), format!("k=\"{}\"", written.join(",")))
            .help(format!("add {k} to `{step}`'s `k`"));
        false
    }

    fn unknown_metric(&self, declaration: &Declaration, metric: &str, span: Span, problems: &mut Problems) {
        let spec = declaration.spec;
        let builder = problems.at(
            self.sources,
            Code::UnknownMetric,
            span,
            format!("`{}` ({}) publishes no metric `{metric}`", declaration.name.value, spec.name),
            "unknown metric",
        );
        if spec.metrics.is_empty() {
            builder.help(format!("`{}` steps publish no metrics", spec.name));
        } else {
            // `pass@k` in a kind's list stands for the numbered ones.
            let metrics: Vec<&str> =
                spec.metrics.iter().map(|m| if *m == "pass@k" { "pass@1 (and other k)" } else { m }).collect();
            builder.help(format!("it publishes: {}", metrics.join(", ")));
        }
    }

    /// Every metric an `until` expression reads must be published by a step of the loop.
    fn check_until(&self, l: &Declaration, problems: &mut Problems) {
        let Some(Value::Expression(expr)) = l.props.get("until") else {
            return;
        };
        let span = l.span_of("until");
        let start = self.sources.string_start(span);
        for metric in expr.metrics() {
            // Point at the metric inside the string, where its characters stand as written.
            let at = match start {
                Some(start) => Span { file: span.file, range: (start + metric.offset, metric.len).into() },
                None => span,
            };
            match &metric.step {
                None if metric.metric == "iteration" => {}
                None => {
                    problems
                        .at(
                            self.sources,
                            Code::BadExpression,
                            at,
                            format!("`{}` is not a metric", metric.metric),
                            "unknown name",
                        )
                        .help("name a metric as `step.metric` (a step of this loop), or use `iteration`");
                }
                Some(step) => match l.body.iter().find(|s| s.name.value == *step) {
                    Some(declaration) => {
                        if self.check_metric(declaration, &metric.metric, at, problems) && is_share(&metric.metric) {
                            check_share_comparisons(expr, metric, at, self.sources, problems);
                        }
                    }
                    None => {
                        let names: Vec<_> = l.body.iter().map(|s| s.name.value.as_str()).collect();
                        let builder = problems.at(
                            self.sources,
                            Code::BadExpression,
                            at,
                            format!("`until` reads `{step}`, which is not a step of loop `{}`", l.name.value),
                            "not in this loop",
                        );
                        match crate::dsl::diagnostics::did_you_mean(step, names.iter().copied()) {
                            Some(best) => builder.help(format!("did you mean `{best}`?")),
                            None => builder.help(format!("the loop's steps are: {}", names.join(", "))),
                        };
                    }
                },
            }
        }
        // Decided the same way after every iteration the loop may run, whatever its steps do,
        // `until` says nothing: it never ends the loop early, or always after the first.
        let Some(most) = l.props.integer("max-iterations") else { return };
        let after = |iteration: i64| {
            expr.evaluate(&|m| (m.step.is_none() && m.metric == "iteration").then_some(iteration as f64))
        };
        let (never, always) = ((1..=most).all(|i| after(i) == Some(false)), (1..=most).all(|i| after(i) == Some(true)));
        if never || always {
            let (message, help) = match never {
                true => (
                    format!("`until` cannot hold within `max-iterations={most}`: the loop runs {most} times"),
                    "raise `max-iterations`, or leave `until` out",
                ),
                false => (
                    "`until` holds after the first iteration whatever the steps do: the loop runs once".to_string(),
                    "compare a metric of the loop's steps (`step.metric`)",
                ),
            };
            problems.at(self.sources, Code::BadExpression, span, message, "decided already").help(help);
        }
    }
}

/// The file a model's path names, if it is at hand (a built-in model once fetched).
fn file_of_model(value: &Value) -> Option<PathBuf> {
    match value {
        Value::File(path) => Some(path.clone()),
        Value::BuiltinModel(name) => crate::assets::cached(crate::assets::builtin_model(name)?),
        _ => None,
    }
}

/// Whether a metric is a share from 0 to 1: pass@k, a pass rate, `own-edit-share`, `decode-share`.
fn is_share(metric: &str) -> bool {
    metric.starts_with("pass@") || metric == "pass-rate" || metric.ends_with("-share")
}

/// The numbers `until` compares the share `metric` with must be from 0 to 1, as a gate's are.
fn check_share_comparisons(expr: &Expr, metric: &MetricName, at: Span, sources: &Sources, problems: &mut Problems) {
    let compared = expr.metrics_against_numbers().into_iter().find(|(m, n)| *m == metric && !(0.0..=1.0).contains(n));
    if let Some((_, value)) = compared {
        problems
            .at(
                sources,
                Code::BadExpression,
                at,
                format!("`until` compares `{metric}`, a share from 0 to 1, with {value}"),
                "a share",
            )
            .help(share_help(value));
    }
}

fn share_help(value: f64) -> String {
    if (1.0..=100.0).contains(&value) {
        format!("write {} for {value}%", value / 100.0)
    } else {
        "give a value from 0 to 1".to_string()
    }
}

/// The metrics a step reads that resolved: a share's thresholds must be shares, and a metric and
/// its baseline must both be shares or both not (a pass rate against a count fails or passes
/// always).
fn check_metric_units(declaration: &Declaration, inputs: &[Input], sources: &Sources, problems: &mut Problems) {
    let metrics: Vec<(&str, &str)> = inputs
        .iter()
        .filter_map(|input| match declaration.props.get(&input.property) {
            Some(Value::Metric { metric, .. }) => Some((input.property.as_str(), metric.as_str())),
            _ => None,
        })
        .collect();
    if let Some((property, metric)) = metrics.first()
        && is_share(metric)
    {
        check_share_thresholds(declaration, metric, declaration.span_of(property), sources, problems);
    }
    if let [(first, first_metric), (second, second_metric)] = metrics[..]
        && is_share(first_metric) != is_share(second_metric)
    {
        let unit = |metric| if is_share(metric) { "a share from 0 to 1" } else { "not a share" };
        problems
            .at(
                sources,
                Code::WrongInput,
                declaration.span_of(second),
                format!("`{second}` is {}, but `{first}` is {}", unit(second_metric), unit(first_metric)),
                "another unit",
            )
            .also(declaration.span_of(first), unit(first_metric))
            .help(format!("compare `{first_metric}` with the same metric of another step"));
    }
}

/// A share (pass@k, a pass rate) is from 0 to 1: a threshold on one outside that range, such as
/// `at-least=50` meant as 50%, is met always or never. Thresholds are the unbounded numbers.
fn check_share_thresholds(
    declaration: &Declaration,
    metric: &str,
    span: Span,
    sources: &Sources,
    problems: &mut Problems,
) {
    let thresholds = declaration
        .spec
        .properties
        .iter()
        .filter(|p| matches!(p.ty, ValueType::Number { max, .. } if max.is_infinite()));
    for threshold in thresholds {
        if let Some(Value::Number(value)) = declaration.props.get(threshold.name)
            && !(0.0..=1.0).contains(value)
        {
            let help = share_help(*value);
            problems
                .at(
                    sources,
                    Code::BadValue,
                    declaration.span_of(threshold.name),
                    format!("`{}` is {value}, but `{metric}` is a share from 0 to 1", threshold.name),
                    "out of the metric's range",
                )
                .also(span, "a share")
                .help(help);
        }
    }
}

fn order_graph(steps: Vec<PlannedStep>, sources: &Sources, problems: &mut Problems) -> Option<Graph> {
    let mut dag = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..steps.len()).map(|i| dag.add_node(i)).collect();
    let index: BTreeMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.name(), i)).collect();
    for (i, step) in steps.iter().enumerate() {
        for input in &step.inputs {
            if let Some(&from) = input.source.dependency().and_then(|d| index.get(d)) {
                dag.add_edge(nodes[from], nodes[i], input.property.clone());
            }
        }
    }
    if toposort(&dag, None).is_err() {
        for component in tarjan_scc(&dag) {
            let cyclic = component.len() > 1 || dag.contains_edge(component[0], component[0]);
            if cyclic {
                report_cycle(&steps, &dag, &component, sources, problems);
            }
        }
        return None;
    }
    let order = stable_order(&dag);
    Some(Graph { steps, dag, order })
}

/// A topological order that keeps file order wherever dependencies allow, so listings read
/// like the workflow.
fn stable_order(dag: &DiGraph<usize, String>) -> Vec<usize> {
    let count = dag.node_count();
    let mut done = vec![false; count];
    let mut order = Vec::with_capacity(count);
    while order.len() < count {
        let Some(next) = (0..count).find(|&i| {
            !done[i] && dag.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming).all(|n| done[dag[n]])
        }) else {
            break; // only on a cycle, which is reported before ordering
        };
        done[next] = true;
        order.push(next);
    }
    order
}

fn report_cycle(
    steps: &[PlannedStep],
    dag: &DiGraph<usize, String>,
    component: &[NodeIndex],
    sources: &Sources,
    problems: &mut Problems,
) {
    // Walk reads backwards (from a step to the step it reads) until a step repeats.
    let start = *component.iter().min_by_key(|n| dag[**n]).unwrap_or(&component[0]);
    let mut path = vec![start];
    let mut current = start;
    loop {
        let Some(next) = dag
            .neighbors_directed(current, petgraph::Direction::Incoming)
            .filter(|n| component.contains(n))
            .min_by_key(|n| dag[*n])
        else {
            return;
        };
        if let Some(position) = path.iter().position(|n| *n == next) {
            path.drain(..position);
            path.push(next);
            break;
        }
        path.push(next);
        current = next;
    }
    let names: Vec<&str> = path.iter().map(|n| steps[dag[*n]].name()).collect();
    let first = &steps[dag[path[0]]];
    let second = names.get(1).copied().unwrap_or_default();
    let property = first.inputs.iter().find(|i| i.source.dependency() == Some(second)).map(|i| i.property.as_str());
    let span = property.map_or(first.declaration.name.span, |p| first.declaration.span_of(p));
    problems
        .at(
            sources,
            Code::Cycle,
            span,
            format!("steps depend on each other: {}", names.join(" -> ")),
            format!("`{}` reads `{second}` here", names[0]),
        )
        .help("a step cannot depend on its own output; inside a loop, read the previous iteration with `prev.<step>`");
}

#[cfg(test)]
mod tests {
    use super::name_from_file;
    use std::path::Path;

    #[test]
    fn a_name_from_a_file_is_kebab_case_and_stays_inside_runs() {
        let long = format!("{}.kdl", "a".repeat(99) + "-b");
        for (file, name) in [
            ("flows/My Flow_2.kdl", "my-flow-2"),
            ("...kdl", "workflow"),
            ("2024.kdl", "workflow-2024"),
            (&long, &"a".repeat(99)),
        ] {
            assert_eq!(name_from_file(Path::new(file)), name, "{file}");
        }
    }
}
