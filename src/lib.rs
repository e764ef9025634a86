//! seedflow adapts code LLMs to a new scenario from a handful of examples, with the SEED method
//! (Sample-Efficient adaptation with Error-Driven learning), written as KDL workflows.
//!
//! The modules follow the pipeline: [`dsl`] (text -> checked declarations) -> [`plan`] (a DAG)
//! -> [`engine`] (the executor) -> [`nodes`] (one module per step kind) over [`data`] records.

pub mod assets;
pub mod choice;
pub mod cli;
pub mod data;
pub mod dsl;
pub mod engine;
pub mod llm;
pub mod nodes;
pub mod numeric;
pub mod plan;
pub mod reference;
pub mod report;
pub mod sandbox;
pub mod stdlib;
pub mod store;
pub mod train;

use std::path::Path;

/// Reads, checks and plans a workflow; on failure, every problem found, in file order.
pub fn load_plan(path: &Path, overrides: &[String]) -> Result<plan::Plan, Vec<dsl::Problem>> {
    load_plan_with(path, overrides, &nodes::vocabulary())
}

/// [`load_plan`] with another set of node kinds (the executor's tests add test-only kinds).
pub fn load_plan_with(
    path: &Path,
    overrides: &[String],
    vocabulary: &dsl::schema::Vocabulary,
) -> Result<plan::Plan, Vec<dsl::Problem>> {
    let mut sources = dsl::Sources::default();
    let mut problems = dsl::Problems::default();
    let checked = dsl::load(path, overrides, vocabulary, &mut sources, &mut problems);
    // Planning goes on after problems in the text, so a file's problems are reported together.
    match plan::build(checked, vocabulary, sources, path.to_path_buf(), &mut problems) {
        Some(plan) if problems.is_empty() => Ok(plan),
        _ => Err(problems.into_sorted()),
    }
}
