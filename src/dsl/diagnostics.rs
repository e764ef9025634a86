//! Every problem a workflow can have, as a miette diagnostic with a stable code, a span and a
//! help line. Problems are collected, not thrown, so a file's problems are reported together.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, Severity};

use super::ast::{Sources, Span};

/// The stable codes users can search for; `seedflow::<code>` in rendered output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Syntax,
    UnknownKind,
    MisplacedNode,
    MissingName,
    UnexpectedArgument,
    UnknownProperty,
    MissingProperty,
    WrongType,
    BadValue,
    DuplicateName,
    UnknownStep,
    UnknownModel,
    UnknownMetric,
    WrongInput,
    PrevOutsideLoop,
    Cycle,
    BadExpression,
    MissingFile,
    ImportCycle,
    BadOverride,
    RunDirectory,
}

impl Code {
    pub const ALL: &'static [Code] = &[
        Code::Syntax,
        Code::UnknownKind,
        Code::MisplacedNode,
        Code::MissingName,
        Code::UnexpectedArgument,
        Code::UnknownProperty,
        Code::MissingProperty,
        Code::WrongType,
        Code::BadValue,
        Code::DuplicateName,
        Code::UnknownStep,
        Code::UnknownModel,
        Code::UnknownMetric,
        Code::WrongInput,
        Code::PrevOutsideLoop,
        Code::Cycle,
        Code::BadExpression,
        Code::MissingFile,
        Code::ImportCycle,
        Code::BadOverride,
        Code::RunDirectory,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "seedflow::syntax",
            Code::UnknownKind => "seedflow::unknown_kind",
            Code::MisplacedNode => "seedflow::misplaced_node",
            Code::MissingName => "seedflow::missing_name",
            Code::UnexpectedArgument => "seedflow::unexpected_argument",
            Code::UnknownProperty => "seedflow::unknown_property",
            Code::MissingProperty => "seedflow::missing_property",
            Code::WrongType => "seedflow::wrong_type",
            Code::BadValue => "seedflow::bad_value",
            Code::DuplicateName => "seedflow::duplicate_name",
            Code::UnknownStep => "seedflow::unknown_step",
            Code::UnknownModel => "seedflow::unknown_model",
            Code::UnknownMetric => "seedflow::unknown_metric",
            Code::WrongInput => "seedflow::wrong_input",
            Code::PrevOutsideLoop => "seedflow::prev_outside_loop",
            Code::Cycle => "seedflow::cycle",
            Code::BadExpression => "seedflow::bad_expression",
            Code::MissingFile => "seedflow::missing_file",
            Code::ImportCycle => "seedflow::import_cycle",
            Code::BadOverride => "seedflow::bad_override",
            Code::RunDirectory => "seedflow::run_directory",
        }
    }
}

/// One problem in a workflow.
#[derive(Debug)]
pub struct Problem {
    pub code: Code,
    pub message: String,
    pub source_code: Option<NamedSource<Arc<String>>>,
    pub labels: Vec<LabeledSpan>,
    pub help: Option<String>,
    /// The file the labels point into, so problems can be sorted by position.
    pub at: Option<Span>,
    /// When that file was imported: each `import` on the way to it, nearest first.
    pub imported: Vec<ImportedHere>,
}

/// Where a file that holds a problem was imported, shown after the problem.
#[derive(Debug)]
pub struct ImportedHere {
    message: String,
    source_code: NamedSource<Arc<String>>,
    label: LabeledSpan,
}

impl fmt::Display for ImportedHere {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ImportedHere {}

impl Diagnostic for ImportedHere {
    fn severity(&self) -> Option<Severity> {
        Some(Severity::Advice)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source_code)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(std::iter::once(self.label.clone())))
    }
}

/// The chain of imports that brought `file` in, nearest first.
fn imports_of(sources: &Sources, file: super::ast::FileId) -> Vec<ImportedHere> {
    let mut chain = vec![];
    let mut current = file;
    while let Some(at) = sources.get(current).imported_at {
        let imported = &sources.get(current).name;
        current = at.file;
        if too_far_right(sources, at).is_some() {
            continue; // an `import` miette cannot draw
        }
        chain.push(ImportedHere {
            message: format!("`{imported}` is imported here"),
            source_code: sources.named(at.file),
            label: LabeledSpan::new_with_span(Some("imported here".into()), at.range),
        });
    }
    chain
}

impl Problem {
    /// A problem that has no place in any file (a missing workflow file, a bad run directory).
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Problem {
            code,
            message: message.into(),
            source_code: None,
            labels: vec![],
            help: None,
            at: None,
            imported: vec![],
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code.as_str()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source_code.as_ref().map(|s| s as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() { None } else { Some(Box::new(self.labels.iter().cloned())) }
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        if self.imported.is_empty() { None } else { Some(Box::new(self.imported.iter().map(|i| i as &dyn Diagnostic))) }
    }
}

/// Collects problems while a workflow is read and checked.
#[derive(Debug, Default)]
pub struct Problems {
    pub list: Vec<Problem>,
}

/// A problem being built; it is recorded when dropped, so a builder chain cannot be forgotten.
pub struct ProblemBuilder<'a> {
    problems: &'a mut Problems,
    problem: Option<Problem>,
}

impl ProblemBuilder<'_> {
    pub fn help(mut self, help: impl Into<String>) -> Self {
        if let Some(p) = self.problem.as_mut() {
            p.help = Some(help.into());
        }
        self
    }

    /// A second label in the same file as the first (another place that matters).
    pub fn also(mut self, span: Span, label: impl Into<String>) -> Self {
        if let Some(p) = self.problem.as_mut()
            && p.at.map(|a| a.file) == Some(span.file)
            && !p.labels.is_empty()
            && p.source_code
                .as_ref()
                .is_some_and(|s| along_its_line(s.inner(), span.range.offset()) <= MOST_DRAWN_COLUMN)
        {
            p.labels.push(LabeledSpan::new_with_span(Some(label.into()), span.range));
        }
        self
    }
}

impl Drop for ProblemBuilder<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.problem.take() {
            self.problems.list.push(p);
        }
    }
}

impl Problems {
    /// Reports a problem at `span`, labelled with `label`.
    pub fn at<'a>(
        &'a mut self,
        sources: &Sources,
        code: Code,
        span: Span,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> ProblemBuilder<'a> {
        let mut problem = Problem {
            code,
            message: message.into(),
            source_code: Some(sources.named(span.file)),
            labels: vec![LabeledSpan::new_with_span(Some(label.into()), span.range)],
            help: None,
            at: Some(span),
            imported: imports_of(sources, span.file),
        };
        if let Some((line, column)) = too_far_right(sources, span) {
            // Said in words instead: miette cannot draw a label that far along a line (it panics).
            problem.message =
                format!("{} (line {line}, column {column} of `{}`)", problem.message, sources.get(span.file).name);
            problem.source_code = None;
            problem.labels.clear();
        }
        ProblemBuilder { problems: self, problem: Some(problem) }
    }

    pub fn push(&mut self, problem: Problem) {
        self.list.push(problem);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Problems in file order, then by position, so output is stable.
    pub fn into_sorted(mut self) -> Vec<Problem> {
        self.list.sort_by_key(|p| p.at.map(|s| (s.file, s.range.offset())));
        self.list
    }
}

/// How far along its line (in bytes) a label may start and still be drawn: miette pads to it with
/// a width that must fit 16 bits, and a tab takes up to four columns.
const MOST_DRAWN_COLUMN: usize = 16_000;

/// How far `offset` is along its line of `text`, in bytes.
fn along_its_line(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |before| offset - before.rfind('\n').map_or(0, |at| at + 1))
}

/// The line and column (from 1) of a span that starts too far along its line to be drawn.
fn too_far_right(sources: &Sources, span: Span) -> Option<(usize, usize)> {
    let text = &sources.get(span.file).text;
    let offset = span.range.offset();
    let before = text.get(..offset).filter(|_| along_its_line(text, offset) > MOST_DRAWN_COLUMN)?;
    let line = &before[before.rfind('\n').map_or(0, |at| at + 1)..];
    Some((before.matches('\n').count() + 1, line.chars().count() + 1))
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        // Case aside: `MBPP` is a typo of `mbpp`.
        .map(|c| (strsim::jaro_winkler(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// A problem on one line, for machines (`--ci`): `file:line:column: message [code]`, or the
/// message and code alone when it points into no file.
pub fn one_line(problem: &Problem) -> String {
    let code = problem.code.as_str();
    let place = problem.source_code.as_ref().zip(problem.labels.first()).map(|(source, label)| {
        let text = source.inner();
        let before = text.get(..label.offset()).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}:{line}:{column}: ", source.name())
    });
    format!("{}{} [{code}]", place.unwrap_or_default(), problem.message)
}

/// Renders problems as users see them without colour, at a fixed width: used by `check` output
/// in tests and by snapshot tests.
pub fn render_plain(problems: &[Problem], width: usize) -> String {
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor()).with_width(width);
    let mut out = String::new();
    for p in problems {
        // Rendering into a String cannot fail.
        let _ = handler.render_report(&mut out, p);
    }
    out
}
