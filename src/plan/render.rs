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

fn id(scope: Option<&str>, step: &str) -> String {
    match scope {
        Some(l) => format!("{l}.{step}").replace(['-', '.'], "_"),
        None => step.replace('-', "_"),
    }
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
                    "  subgraph cluster_{} {{\n    label=\"{} (loop-until)\";",
                    id(None, step.name()),
                    step.name()
                );
                for &j in &body.order {
                    let inner = &body.steps[j];
                    let _ = writeln!(
                        out,
                        "    {} [label=\"{}\\n{}\"];",
                        id(Some(step.name()), inner.name()),
                        inner.name(),
                        inner.kind()
                    );
                }
                out.push_str("  }\n");
            }
            None => {
                let _ = writeln!(out, "  {} [label=\"{}\\n{}\"];", id(None, step.name()), step.name(), step.kind());
            }
        }
    }
    let mut all = vec![];
    edges(&plan.graph, None, &mut all);
    for e in all {
        let style = if e.previous_iteration { ", style=dashed" } else { "" };
        let _ = writeln!(out, "  {} -> {} [label=\"{}\"{style}];", e.from, e.to, e.label);
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
                let _ = writeln!(out, "  subgraph {}[\"{} (loop-until)\"]", id(None, step.name()), step.name());
                for &j in &body.order {
                    let inner = &body.steps[j];
                    let _ = writeln!(
                        out,
                        "    {}[\"{}<br/>{}\"]",
                        id(Some(step.name()), inner.name()),
                        inner.name(),
                        inner.kind()
                    );
                }
                out.push_str("  end\n");
            }
            None => {
                let _ = writeln!(out, "  {}[\"{}<br/>{}\"]", id(None, step.name()), step.name(), step.kind());
            }
        }
    }
    let mut all = vec![];
    edges(&plan.graph, None, &mut all);
    for e in all {
        let arrow = if e.previous_iteration { "-.->" } else { "-->" };
        let _ = writeln!(out, "  {} {arrow}|{}| {}", e.from, e.label, e.to);
    }
    out
}
