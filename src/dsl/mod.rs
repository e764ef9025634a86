//! The workflow language: KDL text -> spanned syntax tree -> checked declarations.

pub mod ast;
pub mod check;
pub mod diagnostics;
pub mod expr;
pub mod lower;
pub mod schema;

use std::path::Path;

pub use ast::{Sources, Span, Spanned};
pub use check::{Checked, Declaration};
pub use diagnostics::{Code, Problem, Problems};

/// Reads, imports, overrides and checks the workflow at `path`. All problems of the text are
/// collected; the result is usable only when `problems` is empty.
pub fn load(
    path: &Path,
    overrides: &[String],
    vocabulary: &schema::Vocabulary,
    sources: &mut Sources,
    problems: &mut Problems,
) -> Checked {
    let mut nodes = lower::load_file(path, sources, problems);
    lower::apply_overrides(&mut nodes, overrides, sources, problems);
    check::check(&nodes, vocabulary, sources, problems)
}
