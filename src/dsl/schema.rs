//! The language's vocabulary: what each node kind accepts, and the typed values properties hold.
//! Each kind's [`KindSpec`] lives beside its implementation in `src/nodes/`; the checker, the
//! language reference (`docs/language.md`) and `seedflow check` all read the same specs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::marker::PhantomData;

use serde::Serialize;

use super::expr::Expr;
use crate::choice::Choice;
use crate::data::Status;

/// What a step produces, and what a reference to it may be used as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Artifact {
    /// Problems: requirement, tests, reference solution.
    Tasks,
    /// Generated programs.
    Samples,
    /// Programs with their execution results.
    Verdicts,
    /// A LoRA adapter.
    Adapter,
    /// Report files.
    Report,
    /// A pass/fail check of a metric.
    Check,
}

impl Artifact {
    pub fn noun(self) -> &'static str {
        match self {
            Artifact::Tasks => "tasks",
            Artifact::Samples => "samples",
            Artifact::Verdicts => "verdicts",
            Artifact::Adapter => "an adapter",
            Artifact::Report => "a report",
            Artifact::Check => "a check",
        }
    }
}

/// What a node is in the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `workflow`: settings for the whole run; at most one, at the top.
    Workflow,
    /// `model`: a model that steps refer to by name.
    Model,
    /// A step that produces an artifact.
    Step(Artifact),
    /// `loop-until`: owns steps that run repeatedly.
    Loop,
}

/// The type of a property's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueType {
    Text,
    /// An http:// or https:// URL, or "spawn" (a `model`'s `server`).
    Server,
    /// The name of an environment variable: letters, digits and `_`, not starting with a digit.
    EnvVar,
    /// From `min` to `max`, both included; `max` is where a larger value would no longer fit
    /// what it sets (a 32-bit count, llama.cpp's limit) or is `i64::MAX` for none.
    Integer {
        min: i64,
        max: i64,
    },
    Number {
        min: f64,
        max: f64,
    },
    Bool,
    /// `"5s"`, `"500ms"`, `"2m"`; from `min` to `max`, both included.
    Duration {
        min: Duration,
        max: Duration,
    },
    /// `"256MiB"`, `"2GB"`, in bytes; from `min` to `max`, both included.
    Size {
        min: u64,
        max: u64,
    },
    Choice(&'static [&'static str]),
    /// Comma-separated choices: `"json,markdown"`.
    Choices(&'static [&'static str]),
    /// Comma-separated positive integers: `"1,10"`.
    Integers,
    /// The name of a step whose output is one of these artifacts.
    Input(&'static [Artifact]),
    /// The name of a step producing an adapter, a GGUF LoRA adapter file (`….gguf`) or a PEFT
    /// adapter directory: one trained elsewhere, or by an earlier run (a CI artifact).
    Adapter,
    /// The name of a `model` declaration.
    Model,
    /// A path to an existing file, relative to the workflow file (`std/…` for the stdlib).
    File,
    /// A prompt template file that fills some of these values (`{{requirement}}`); checked.
    Template(&'static [&'static str]),
    /// A JSON-lines file of worked revisions for `revise`'s prompt; checked.
    RevisionExamples,
    /// A built-in model's name, a path to a GGUF file, or a Hugging Face model directory.
    ModelFile,
    /// `step.metric`, for example `scores.pass@1`.
    Metric,
    /// An `until` expression.
    Expression,
    /// `passed`, `!passed`, or a list such as `failed,error`.
    Statuses,
}

/// A size as written in a workflow: in the largest binary unit that divides it.
pub fn size_text(bytes: u64) -> String {
    match [(30, "GiB"), (20, "MiB"), (10, "KiB")]
        .into_iter()
        .find(|(shift, _)| bytes != 0 && bytes.is_multiple_of(1 << shift))
    {
        Some((shift, unit)) => format!("{}{unit}", bytes >> shift),
        None => format!("{bytes}B"),
    }
}

/// `n` with its digits grouped by three: `4,294,967,295`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::from(if n < 0 { "-" } else { "" });
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl ValueType {
    /// An integer of at least `min`, with no upper bound of its own.
    pub const fn at_least(min: i64) -> ValueType {
        ValueType::Integer { min, max: i64::MAX }
    }

    /// How the type reads in documentation and messages.
    pub fn describe(&self) -> String {
        match self {
            ValueType::Text => "a string".into(),
            ValueType::Server => "http:// or https:// URLs, comma-separated, or \"spawn\"".into(),
            ValueType::EnvVar => "the name of an environment variable, such as \"OPENAI_API_KEY\"".into(),
            ValueType::Integer { min, max: i64::MAX } => format!("an integer ≥ {}", thousands(*min)),
            ValueType::Integer { min, max } => format!("an integer from {} to {}", thousands(*min), thousands(*max)),
            ValueType::Number { min, max } if max.is_finite() => {
                format!("a number from {min} to {max}")
            }
            ValueType::Number { min, .. } if min.is_finite() => format!("a number ≥ {min}"),
            ValueType::Number { .. } => "a number".into(),
            ValueType::Bool => "#true or #false".into(),
            ValueType::Duration { min, max } => format!(
                "a duration from {} to {}, such as \"5s\"",
                humantime::format_duration(*min),
                humantime::format_duration(*max)
            ),
            ValueType::Size { min, max } => {
                format!("a size from {} to {}, such as \"256MiB\"", size_text(*min), size_text(*max))
            }
            ValueType::Choice(options) => format!("one of {}", quoted(options)),
            ValueType::Choices(options) => format!("a comma-separated list of {}", quoted(options)),
            ValueType::Integers => "positive integers, one or a comma-separated list such as \"1,10\"".into(),
            ValueType::Input(kinds) => {
                let nouns: Vec<_> = kinds.iter().map(|k| k.noun()).collect();
                format!("the name of a step producing {}", nouns.join(" or "))
            }
            ValueType::Adapter => {
                "the name of a step producing an adapter, a GGUF LoRA file (`….gguf`) or a PEFT directory (a path with a `/`)"
                    .into()
            }
            ValueType::Model => "the name of a `model`".into(),
            ValueType::File => "a file path".into(),
            ValueType::Template(values) => {
                let names: Vec<_> = values.iter().map(|v| format!("`{{{{{v}}}}}`")).collect();
                format!("a template file filling {}", names.join(", "))
            }
            ValueType::RevisionExamples => {
                "a JSON-lines file: `requirement`, `tests`, `code`, `feedback`, `revision` per line".into()
            }
            ValueType::ModelFile => "a built-in model's name, a GGUF file or a Hugging Face model directory".into(),
            ValueType::Metric => "a metric such as \"scores.pass@1\"".into(),
            ValueType::Expression => "an expression such as \"revised.count == 0\"".into(),
            ValueType::Statuses => "statuses such as \"passed\", \"!passed\" or \"failed,error\"".into(),
        }
    }
}

fn quoted(options: &[&str]) -> String {
    options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, Clone, Copy)]
pub struct PropertySpec {
    pub name: &'static str,
    pub ty: ValueType,
    /// Required properties have no default.
    pub required: bool,
    /// The default as KDL source (`"5s"`, `0.8`, `#true`); `None` when absent means unset.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// A property that must be given.
pub const fn required(name: &'static str, ty: ValueType, doc: &'static str) -> PropertySpec {
    PropertySpec { name, ty, required: true, default: None, doc }
}

/// A property with a default.
pub const fn optional(name: &'static str, ty: ValueType, default: &'static str, doc: &'static str) -> PropertySpec {
    PropertySpec { name, ty, required: false, default: Some(default), doc }
}

/// A property that may be left unset.
pub const fn unset(name: &'static str, ty: ValueType, doc: &'static str) -> PropertySpec {
    PropertySpec { name, ty, required: false, default: None, doc }
}

/// Declares a kind's properties as [`Param`] constants, each documented by its doc comment,
/// which is the property's documentation in the language reference (`seedflow docs`):
///
/// ```ignore
/// params! {
///     /// Programs per task.
///     pub SAMPLES: i64 = optional("samples", ValueType::at_least(1), "1");
/// }
/// ```
///
/// `required(name, type)`, `optional(name, type, default)` or `unset(name, type)` as in the
/// functions of those names; the doc comment's lines are joined into one paragraph.
macro_rules! params {
    ($($(#[doc = $doc:literal])+ $vis:vis $name:ident: $ty:ty = $kind:ident($($arg:expr),+ $(,)?);)*) => {
        $($(#[doc = $doc])+ $vis const $name: $crate::dsl::schema::Param<$ty> = $crate::dsl::schema::Param::new(
            $crate::dsl::schema::$kind($($arg),+, concat!($($doc),+).trim_ascii_start()),
        );)*
    };
}
pub(crate) use params;

/// A property as the code that runs a kind reads it: its spec and the Rust type of its value.
/// Declared once with [`params!`] beside the kind's [`KindSpec`], listed there with `.spec` and read
/// with [`Props::get`] (or `Context::get`), so a misspelt property does not compile. The constant
/// is checked when it is compiled: the Rust type must read the spec's value type (a choice enum
/// must have the spec's names), and a property read as `Option<T>` must be one that may be
/// unset, one read as `T` one that always has a value (given or defaulted).
#[derive(Debug)]
pub struct Param<T> {
    pub spec: PropertySpec,
    value: PhantomData<fn() -> T>,
}

impl<T> Clone for Param<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Param<T> {}

impl<T: FromValue> Param<T> {
    pub const fn new(spec: PropertySpec) -> Self {
        assert!(T::SHAPE as u8 == Shape::of(&spec.ty) as u8, "the Rust type does not read this value type");
        assert!(
            T::OPTIONAL == (!spec.required && spec.default.is_none()),
            "`Option<T>` is for properties that may be unset"
        );
        if let (Some(names), ValueType::Choice(options) | ValueType::Choices(options)) = (T::NAMES, spec.ty) {
            assert!(same_names(names, options), "the choice enum's names are not the spec's");
        }
        Param { spec, value: PhantomData }
    }

    pub const fn name(&self) -> &'static str {
        self.spec.name
    }

    /// The value the checker gives the property when a workflow leaves it out.
    pub fn default(&self) -> Option<T> {
        T::from_value(super::check::default_value(self.spec.ty, self.spec.default?).as_ref())
    }
}

const fn same_names(a: &[&str], b: &[&str]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        let (x, y) = (a[i].as_bytes(), b[i].as_bytes());
        if x.len() != y.len() {
            return false;
        }
        let mut j = 0;
        while j < x.len() {
            if x[j] != y[j] {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

/// A [`ValueType`] without its bounds: what a Rust type must match to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Text,
    Integer,
    Number,
    Bool,
    Duration,
    Size,
    Choice,
    Choices,
    Integers,
    Input,
    Adapter,
    Model,
    File,
    ModelFile,
    Metric,
    Expression,
    Statuses,
}

impl Shape {
    pub const fn of(ty: &ValueType) -> Shape {
        match ty {
            ValueType::Text | ValueType::Server | ValueType::EnvVar => Shape::Text,
            ValueType::Integer { .. } => Shape::Integer,
            ValueType::Number { .. } => Shape::Number,
            ValueType::Bool => Shape::Bool,
            ValueType::Duration { .. } => Shape::Duration,
            ValueType::Size { .. } => Shape::Size,
            ValueType::Choice(_) => Shape::Choice,
            ValueType::Choices(_) => Shape::Choices,
            ValueType::Integers => Shape::Integers,
            ValueType::Input(_) => Shape::Input,
            ValueType::Adapter => Shape::Adapter,
            ValueType::Model => Shape::Model,
            ValueType::File | ValueType::Template(_) | ValueType::RevisionExamples => Shape::File,
            ValueType::ModelFile => Shape::ModelFile,
            ValueType::Metric => Shape::Metric,
            ValueType::Expression => Shape::Expression,
            ValueType::Statuses => Shape::Statuses,
        }
    }
}

/// A Rust type a property's checked [`Value`] reads as.
pub trait FromValue: Sized {
    const SHAPE: Shape;
    /// `Option<T>`: the property may be unset.
    const OPTIONAL: bool = false;
    /// A choice enum's names.
    const NAMES: Option<&'static [&'static str]> = None;
    /// `None` when the value is missing or of another type.
    fn from_value(value: Option<&Value>) -> Option<Self>;
}

impl<T: FromValue> FromValue for Option<T> {
    const SHAPE: Shape = T::SHAPE;
    const OPTIONAL: bool = true;
    const NAMES: Option<&'static [&'static str]> = T::NAMES;
    fn from_value(value: Option<&Value>) -> Option<Self> {
        match value {
            None => Some(None),
            value => T::from_value(value).map(Some),
        }
    }
}

/// `FromValue` for a type read from one variant of [`Value`].
macro_rules! from_value {
    ($($ty:ty: $shape:ident, $pattern:pat => $read:expr;)+) => {$(
        impl FromValue for $ty {
            const SHAPE: Shape = Shape::$shape;
            fn from_value(value: Option<&Value>) -> Option<Self> {
                match value? {
                    $pattern => Some($read),
                    _ => None,
                }
            }
        }
    )+};
}

from_value! {
    String: Text, Value::Text(s) => s.clone();
    i64: Integer, Value::Integer(i) => *i;
    f64: Number, Value::Number(n) => *n;
    bool: Bool, Value::Bool(b) => *b;
    Duration: Duration, Value::Duration(d) => *d;
    u64: Size, Value::Size(bytes) => *bytes;
    Vec<i64>: Integers, Value::Integers(list) => list.clone();
    Input: Input, Value::Reference(_) => Input;
    ModelName: Model, Value::Model(name) => ModelName(name.clone());
    PathBuf: File, Value::File(path) => path.clone();
    MetricRef: Metric, Value::Metric { step, metric } => MetricRef { step: step.clone(), metric: metric.clone() };
    Expr: Expression, Value::Expression(expr) => expr.clone();
    StatusFilter: Statuses, Value::Statuses(filter) => filter.clone();
}

impl FromValue for AdapterSource {
    const SHAPE: Shape = Shape::Adapter;
    fn from_value(value: Option<&Value>) -> Option<Self> {
        match value? {
            Value::Reference(_) => Some(AdapterSource::Step),
            Value::File(path) => Some(AdapterSource::File(path.clone())),
            _ => None,
        }
    }
}

impl FromValue for ModelPath {
    const SHAPE: Shape = Shape::ModelFile;
    fn from_value(value: Option<&Value>) -> Option<Self> {
        match value? {
            Value::BuiltinModel(name) => crate::assets::builtin_model(name).map(ModelPath::Builtin),
            Value::File(path) => Some(ModelPath::File(path.clone())),
            _ => None,
        }
    }
}

impl<T: Choice> FromValue for T {
    const SHAPE: Shape = Shape::Choice;
    const NAMES: Option<&'static [&'static str]> = Some(T::NAMES);
    fn from_value(value: Option<&Value>) -> Option<Self> {
        match value? {
            Value::Choice(name) => T::parse(name),
            _ => None,
        }
    }
}

impl<T: Choice> FromValue for Vec<T> {
    const SHAPE: Shape = Shape::Choices;
    const NAMES: Option<&'static [&'static str]> = Some(T::NAMES);
    fn from_value(value: Option<&Value>) -> Option<Self> {
        match value? {
            Value::Choices(names) => names.iter().map(|name| T::parse(name)).collect(),
            _ => None,
        }
    }
}

/// The value of an input property: the step it names, which the step reads as an input.
#[derive(Debug, Clone, Copy)]
pub struct Input;

/// Where an adapter comes from: a step of the run (read as an input) or a file.
#[derive(Debug, Clone)]
pub enum AdapterSource {
    Step,
    File(PathBuf),
}

/// The name of a `model` declaration.
#[derive(Debug, Clone)]
pub struct ModelName(pub String);

/// A `model`'s file: a built-in model (fetched on first use) or a GGUF file.
#[derive(Debug, Clone)]
pub enum ModelPath {
    Builtin(&'static crate::assets::Asset),
    File(PathBuf),
}

/// `step.metric`.
#[derive(Debug, Clone)]
pub struct MetricRef {
    pub step: String,
    pub metric: String,
}

/// Everything the language knows about one node kind.
#[derive(Debug)]
pub struct KindSpec {
    pub name: &'static str,
    pub role: Role,
    /// One paragraph: what it does, its inputs and outputs.
    pub doc: &'static str,
    pub properties: &'static [PropertySpec],
    /// Metrics the step publishes; `pass@k` stands for `pass@1`, `pass@10`, ….
    pub metrics: &'static [&'static str],
    /// Of these optional properties, at least one must be given.
    pub at_least_one: &'static [&'static str],
    /// Properties that mean nothing without another: (property, the property it needs).
    pub requires: &'static [(&'static str, &'static str)],
    /// Numeric bounds that contradict each other when the first is above the second: (low, high).
    pub ordered: &'static [(&'static str, &'static str)],
    /// Properties that may not name the same thing, which would compare it with itself.
    pub distinct: &'static [(&'static str, &'static str)],
    /// Metrics published only when a property is given: (metric, property).
    pub metrics_needing: &'static [(&'static str, &'static str)],
    /// Checks the node's values together, and against the model file its `model` names where
    /// that file is at hand.
    pub check_values: Option<CheckValues>,
    /// Properties that cannot change what a step makes (how many threads, how long to wait for a
    /// server), left out of the cache key of the steps that use the node: changing one reruns
    /// nothing.
    pub unkeyed: &'static [&'static str],
    /// A complete workflow that shows the kind in use; checked by a test.
    pub example: &'static str,
}

/// Given a node's values and its model's file if at hand: `Err((property, why))` where a value
/// cannot work.
pub type CheckValues = fn(&Props, Option<&Path>) -> Result<(), (&'static str, String)>;

impl KindSpec {
    pub fn property(&self, name: &str) -> Option<&PropertySpec> {
        self.properties.iter().find(|p| p.name == name)
    }

    pub fn publishes(&self, metric: &str) -> bool {
        self.metrics.iter().any(|m| {
            (*m == metric && metric != "pass@k")
                || (*m == "pass@k"
                    && metric.strip_prefix("pass@").is_some_and(|k| k.parse::<u32>().is_ok_and(|k| k > 0)))
        })
    }
}

/// The node kinds a workflow may use. The steps' side declares them and hands them to the
/// language and the plan as a value, so neither depends on the steps.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    kinds: Vec<&'static KindSpec>,
}

impl Vocabulary {
    pub fn new(kinds: impl IntoIterator<Item = &'static KindSpec>) -> Self {
        Vocabulary { kinds: kinds.into_iter().collect() }
    }

    pub fn kind(&self, name: &str) -> Option<&'static KindSpec> {
        self.kinds.iter().find(|k| k.name == name).copied()
    }

    /// Every kind, in the order the language reference lists them.
    pub fn kinds(&self) -> &[&'static KindSpec] {
        &self.kinds
    }
}

/// Which statuses a `select` keeps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusFilter {
    pub negated: bool,
    pub statuses: Vec<Status>,
}

impl StatusFilter {
    pub fn accepts(&self, status: Status) -> bool {
        self.statuses.contains(&status) != self.negated
    }
}

/// A checked property value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Integer(i64),
    Number(f64),
    Bool(bool),
    Duration(Duration),
    Size(u64),
    Choice(String),
    Choices(Vec<String>),
    Integers(Vec<i64>),
    /// A step reference as written; the planner resolves it.
    Reference(String),
    Model(String),
    File(PathBuf),
    /// A built-in model, by its name (`"default"`).
    BuiltinModel(String),
    Metric {
        step: String,
        metric: String,
    },
    Expression(Expr),
    Statuses(StatusFilter),
}

impl Value {
    /// The value as it enters a step's cache key. References are left out: the key holds the
    /// hash of what they point at instead.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Text(s) | Value::Choice(s) | Value::Model(s) | Value::BuiltinModel(s) => json!(s),
            Value::Integer(i) => json!(i),
            Value::Number(n) => json!(n),
            Value::Bool(b) => json!(b),
            Value::Duration(d) => json!(humantime::format_duration(*d).to_string()),
            Value::Size(s) => json!(s),
            Value::Choices(list) => json!(list),
            Value::Integers(list) => json!(list),
            Value::Reference(r) => json!(r),
            Value::File(p) => json!(p.display().to_string()),
            Value::Metric { step, metric } => json!(format!("{step}.{metric}")),
            Value::Expression(_) => json!(null),
            Value::Statuses(filter) => json!(filter),
        }
    }
}

/// A node's checked properties, defaults filled in.
#[derive(Debug, Clone, Default)]
pub struct Props(pub BTreeMap<String, Value>);

impl Props {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// A declared property's value; `None` only if the node's kind does not declare it.
    pub fn param<T: FromValue>(&self, param: &Param<T>) -> Option<T> {
        T::from_value(self.get(param.name()))
    }

    pub fn integer(&self, name: &str) -> Option<i64> {
        match self.get(name) {
            Some(Value::Integer(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn integers(&self, name: &str) -> Vec<i64> {
        match self.get(name) {
            Some(Value::Integers(list)) => list.clone(),
            _ => vec![],
        }
    }

    pub fn file(&self, name: &str) -> Option<&PathBuf> {
        match self.get(name) {
            Some(Value::File(p)) => Some(p),
            _ => None,
        }
    }
}
