//! `seedflow graph`: the plan as Graphviz dot or Mermaid. Loops are drawn as clusters; edges
//! that read the previous iteration (`prev.`) are dashed.

use std::fmt::Write;

use super::{Graph, Plan, Source};

/// One edge: from the node id it reads, to the node id reading it, labelled by property.
struct Edge {
    from: String,
    to: String,
    label: String,
    previous_iteration: bool,
}

/// A step's name qualified by its loop's: unique, as names hold no `.`.
fn id(scope: Option<&str>, step: &str) -> String {
    match scope {
        Some(l) => format!("{l}.{step}"),
        None => step.to_string(),
    }
}

/// A qualified name as a dot id: quoted, so no name reads as a keyword (`node`, `edge`).
fn dot_id(id: &str) -> String {
    format!("\"{id}\"")
}

/// A qualified name as a Mermaid id, which takes letters, digits and `_` only: prefixed, so no
/// name reads as a keyword (`end`), and with `.` as `_I_`, which no name can hold (names are
/// lowercase), so `a-b` and `b` in loop `a` stay apart.
fn mermaid_id(id: &str) -> String {
    format!("s_{}", id.replace('-', "_").replace('.', "_I_"))
}

fn edges(graph: &Graph, scope: Option<&str>, out: &mut Vec<Edge>) {
    for step in &graph.steps {
        if let Some(body) = &step.body {
            edges(body, Some(step.name()), out);
            continue;
        }
        for input in &step.inputs {
            let (from, previous_iteration) = match &input.source {
                Source::Local(s) => (id(scope, s), false),
                Source::Outer(s) => (id(None, s), false),
                Source::Prev(s) => (id(scope, s), true),
                Source::InLoop { loop_name, step } => (id(Some(loop_name), step), false),
            };
            out.push(Edge { from, to: id(scope, step.name()), label: input.property.clone(), previous_iteration });
        }
    }
}

pub fn to_dot(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box];", plan.name);
    for &i in &plan.graph.order {
        let step = &plan.graph.steps[i];
        match &step.body {
            Some(body) => {
                let _ = writeln!(
                    out,
                    "  subgraph \"cluster_{}\" {{\n    label=\"{} (loop-until)\";",
                    step.name(),
                    step.name()
                );
                for &j in &body.order {
                    let inner = &body.steps[j];
                    let _ = writeln!(
                        out,
                        "    {} [label=\"{}\\n{}\"];",
                        dot_id(&id(Some(step.name()), inner.name())),
                        inner.name(),
                        inner.kind()
                    );
                }
                out.push_str("  }\n");
            }
            None => {
                let _ = writeln!(out, "  {} [label=\"{}\\n{}\"];", dot_id(step.name()), step.name(), step.kind());
            }
        }
    }
    let mut all = vec![];
    edges(&plan.graph, None, &mut all);
    for e in all {
        let style = if e.previous_iteration { ", style=dashed" } else { "" };
        let _ = writeln!(out, "  {} -> {} [label=\"{}\"{style}];", dot_id(&e.from), dot_id(&e.to), e.label);
    }
    out.push_str("}\n");
    out
}

pub fn to_mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart TD\n");
    for &i in &plan.graph.order {
        let step = &plan.graph.steps[i];
        match &step.body {
            Some(body) => {
                let _ = writeln!(out, "  subgraph {}[\"{} (loop-until)\"]", mermaid_id(step.name()), step.name());
                for &j in &body.order {
                    let inner = &body.steps[j];
                    let _ = writeln!(
                        out,
                        "    {}[\"{}<br/>{}\"]",
                        mermaid_id(&id(Some(step.name()), inner.name())),
                        inner.name(),
                        inner.kind()
                    );
                }
                out.push_str("  end\n");
            }
            None => {
                let _ = writeln!(out, "  {}[\"{}<br/>{}\"]", mermaid_id(step.name()), step.name(), step.kind());
            }
        }
    }
    let mut all = vec![];
    edges(&plan.graph, None, &mut all);
    for e in all {
        let arrow = if e.previous_iteration { "-.->" } else { "-->" };
        let _ = writeln!(out, "  {} {arrow}|{}| {}", mermaid_id(&e.from), e.label, mermaid_id(&e.to));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{dot_id, id, mermaid_id};

    #[test]
    fn ids_neither_collide_nor_read_as_keywords() {
        let (in_loop, top) = (id(Some("a"), "b"), id(None, "a-b"));
        assert_ne!(dot_id(&in_loop), dot_id(&top));
        assert_ne!(mermaid_id(&in_loop), mermaid_id(&top));
        assert_eq!(dot_id("node"), "\"node\"");
        assert_eq!(mermaid_id("end"), "s_end");
    }
}
