//! The workflow's syntax tree: KDL lowered once into our own types, every piece with its span.
//! No `kdl` type travels past `lower.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use miette::{NamedSource, SourceSpan};

/// Index of a file in [`Sources`].
pub type FileId = usize;

/// Where something stands: a byte range in one of the loaded sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub file: FileId,
    pub range: SourceSpan,
}

#[derive(Debug, Clone)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Self {
        Self { value, span }
    }
}

/// A KDL value as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    String(String),
    Integer(i128),
    Float(f64),
    Bool(bool),
    Null,
}

impl Literal {
    /// How the value reads in a message.
    pub fn describe(&self) -> String {
        match self {
            Literal::String(s) => format!("the string {s:?}"),
            Literal::Integer(i) => format!("the integer {i}"),
            Literal::Float(f) => format!("the number {f:?}"),
            Literal::Bool(b) => format!("#{b}"),
            Literal::Null => "#null".to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Property {
    pub key: Spanned<String>,
    pub value: Spanned<Literal>,
}

/// One node: `kind "name" key=value … { children }`.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Spanned<String>,
    /// The first positional argument, which names the node.
    pub name: Option<Spanned<Literal>>,
    pub properties: Vec<Property>,
    pub children: Vec<Node>,
    /// The node's whole text.
    pub span: Span,
}

impl Node {
    pub fn name_str(&self) -> Option<&str> {
        match &self.name {
            Some(Spanned { value: Literal::String(s), .. }) => Some(s),
            _ => None,
        }
    }

    pub fn property(&self, key: &str) -> Option<&Property> {
        self.properties.iter().rev().find(|p| p.key.value == key)
    }
}

/// One loaded text: the workflow, an import, or a `--set` override.
#[derive(Debug)]
pub struct SourceFile {
    pub name: String,
    pub path: Option<PathBuf>,
    pub text: Arc<String>,
    /// The `import` that brought this file in; none for the workflow and overrides.
    pub imported_at: Option<Span>,
}

/// Every text a workflow was built from, so diagnostics can show any of them.
#[derive(Debug, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    pub fn add(&mut self, name: impl Into<String>, path: Option<PathBuf>, text: String) -> FileId {
        self.files.push(SourceFile { name: name.into(), path, text: Arc::new(text), imported_at: None });
        self.files.len() - 1
    }

    /// Adds a file that the `import` at `at` brought in.
    pub fn add_import(&mut self, name: impl Into<String>, path: Option<PathBuf>, text: String, at: Span) -> FileId {
        let file = self.add(name, path, text);
        self.files[file].imported_at = Some(at);
        file
    }

    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id]
    }

    pub fn named(&self, id: FileId) -> NamedSource<Arc<String>> {
        let file = &self.files[id];
        NamedSource::new(&file.name, file.text.clone()).with_language("kdl")
    }

    /// Where the characters of the string value written at `span` start, when they stand there
    /// as written: at once for a bare word (an override's value), after the opening quote of
    /// `"…"` without escapes, or of a raw `#"…"#`, on one line. `None` when escapes or a
    /// multi-line string moved them.
    pub fn string_start(&self, span: Span) -> Option<usize> {
        let (written, offset) = (self.text(span), span.range.offset());
        let hashes = written.bytes().take_while(|&b| b == b'#').count();
        let Some(body) = written[hashes..].strip_prefix('"') else {
            return (hashes == 0).then_some(offset);
        };
        let as_written = (hashes > 0 || !body.contains('\\')) && !body.starts_with("\"\"") && !written.contains('\n');
        as_written.then_some(offset + hashes + 1)
    }

    /// The text a span covers.
    pub fn text(&self, span: Span) -> &str {
        let text = &self.files[span.file].text;
        let start = span.range.offset().min(text.len());
        let end = (start + span.range.len()).min(text.len());
        text.get(start..end).unwrap_or("")
    }

    pub fn iter(&self) -> impl Iterator<Item = &SourceFile> {
        self.files.iter()
    }
}
