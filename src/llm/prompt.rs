//! Prompt templates: `{{name}}` is replaced by a value, and `{{#name}}…{{/name}}` is kept only
//! when `name` has a non-empty value. Templates live in `stdlib/prompts/` and can be replaced
//! per step with `template=`.

use crate::data::{Task, TaskStyle, Verdict};

/// What `generate` fills a template with.
pub const SOLVE_VALUES: &[&str] = &["requirement", "tests", "prompt"];
/// What `revise` fills a template with.
pub const REVISE_VALUES: &[&str] = &["requirement", "tests", "code", "feedback", "lines", "reference", "hint"];

crate::choice! {
    /// How a `revise` prompt shows the task's reference solution.
    pub enum ReferenceMode {
        /// Not at all: the model fixes its code from the feedback alone.
        Off = "off",
        /// As orientation, with the instruction to keep the model's own code (`{{hint}}`).
        Hint = "hint",
        /// As a correct solution (`{{reference}}`), which a small model mostly copies.
        Show = "show",
    }
}

/// Checks a template before any prompt is made from it: every `{{name}}` one of `values`, every
/// `{{` closed, every section ended, and some value used (or the model would not see the task).
/// A template that fails would send the model prompts with the braces in them, and nothing
/// would say so.
pub fn check(template: &str, values: &[&str]) -> Result<(), TemplateError> {
    let known = || values.iter().map(|v| format!("{{{{{v}}}}}")).collect::<Vec<_>>().join(", ");
    let fail = |message: String| Err(TemplateError(message));
    let mut used = false;
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { return fail("a `{{` is never closed with `}}`".into()) };
        let tag = after[..end].trim();
        rest = &after[end + 2..];
        let name = tag.strip_prefix('#').unwrap_or(tag);
        if !values.contains(&name) {
            return fail(format!("`{{{{{tag}}}}}` is not a value this step fills: it fills {}", known()));
        }
        if tag.starts_with('#') {
            let close = format!("{{{{/{name}}}}}");
            let Some((_, after_section)) = rest.split_once(close.as_str()) else {
                return fail(format!("`{{{{{tag}}}}}` is never ended with `{close}`"));
            };
            rest = after_section;
        }
        used = true;
    }
    if used { Ok(()) } else { fail(format!("it uses none of {}, so the model would not see the task", known())) }
}

/// Whether `template` shows `value` where it is given: rendered with a mark for it, the mark
/// appears (a `{{#value}}` section alone shows it only if it holds `{{value}}`).
pub fn uses(template: &str, value: &str) -> bool {
    const MARK: &str = "\u{1}";
    render(template, &[(value, MARK)]).contains(MARK) && !template.contains(MARK)
}

/// Why a prompt template cannot be used.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

/// Fills `template` with `values` (`{{ name }}` as `{{name}}`); an unknown `{{name}}` is left as
/// written.
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    let value = |name: &str| values.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let tag = after[..end].trim();
        rest = &after[end + 2..];
        if let Some(name) = tag.strip_prefix('#') {
            let close = format!("{{{{/{name}}}}}");
            let (inner, tail) = rest.split_once(close.as_str()).unwrap_or((rest, ""));
            if value(name).is_some_and(|v| !v.is_empty()) {
                out.push_str(&render(inner, values));
            }
            rest = tail;
        } else if let Some(v) = value(tag) {
            out.push_str(v);
        } else {
            out.push_str("{{");
            out.push_str(tag);
            out.push_str("}}");
        }
    }
    out.push_str(rest);
    out
}

/// The built-in template for a task, by its style.
pub fn default_template(style: TaskStyle) -> &'static str {
    let name = match style {
        TaskStyle::Mbpp => "std/prompts/mbpp.txt",
        TaskStyle::Requirement => "std/prompts/requirement.txt",
        TaskStyle::Humaneval => "std/prompts/humaneval.txt",
    };
    crate::stdlib::file(name).map_or("", |(_, text)| text)
}

pub const REVISE_TEMPLATE: &str = "std/prompts/revise.txt";

/// The user message asking for a solution to `task`.
pub fn solve(template: &str, task: &Task) -> String {
    let tests = task.tests.join("\n");
    render(template, &[("requirement", task.prompt.trim()), ("tests", &tests), ("prompt", &task.prompt)])
}

/// The line of `code` where the error in `feedback` was raised (the innermost frame of the
/// program in its traceback), numbered as in the traceback; `None` for a wrong result.
pub fn failing_line(code: &str, feedback: &str) -> Option<String> {
    const FRAME: &str = "File \"<program>\", line ";
    let at = feedback.rfind(FRAME)? + FRAME.len();
    let digits: String = feedback[at..].chars().take_while(char::is_ascii_digit).collect();
    let number: usize = digits.parse().ok()?;
    let line = code.lines().nth(number.checked_sub(1)?)?;
    (!line.trim().is_empty()).then(|| format!("line {number}: {}", line.trim()))
}

/// The user message asking to revise a failed program (Self-Revise).
pub fn revise(template: &str, verdict: &Verdict, reference: ReferenceMode) -> String {
    let task = &verdict.sample.task;
    let tests =
        if task.tests.is_empty() { task.test_program.clone().unwrap_or_default() } else { task.tests.join("\n") };
    let solution = task.reference.as_deref().unwrap_or("");
    revise_message(template, &task.prompt, &tests, &verdict.sample.code, &verdict.feedback, (reference, solution))
}

/// A `revise` template filled in; the reference solution goes where its mode says, if anywhere.
fn revise_message(
    template: &str,
    requirement: &str,
    tests: &str,
    code: &str,
    feedback: &str,
    (mode, solution): (ReferenceMode, &str),
) -> String {
    let code = code.trim_end();
    let lines = failing_line(code, feedback).unwrap_or_default();
    let solution = solution.trim_end();
    render(
        template,
        &[
            ("requirement", requirement.trim()),
            ("tests", tests),
            ("code", code),
            ("feedback", feedback.trim()),
            ("lines", &lines),
            ("reference", if mode == ReferenceMode::Show { solution } else { "" }),
            ("hint", if mode == ReferenceMode::Hint { solution } else { "" }),
        ],
    )
}

/// A worked revision for a few-shot `revise` prompt: one line of an `examples` file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RevisionExample {
    pub requirement: String,
    #[serde(default)]
    pub tests: Vec<String>,
    pub code: String,
    pub feedback: String,
    pub revision: String,
}

/// The worked revisions of an `examples` file, one JSON object a line; an error names its line.
pub fn revision_examples(text: &str) -> Result<Vec<RevisionExample>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", number + 1)))
        .collect()
}

/// The (user, assistant) turns that show `example` being revised, before the real request. The
/// reference solution is left out: the example teaches fixing from feedback.
pub fn revise_example(template: &str, example: &RevisionExample) -> (String, String) {
    let tests = example.tests.join("\n");
    let user = revise_message(
        template,
        &example.requirement,
        &tests,
        &example.code,
        &example.feedback,
        (ReferenceMode::Off, ""),
    );
    (user, format!("```python\n{}\n```", example.revision.trim_end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_values_and_sections() {
        let template = "Task: {{requirement}}\n{{#reference}}Reference:\n{{reference}}\n{{/reference}}End {{unknown}}";
        assert_eq!(
            render(template, &[("requirement", "add"), ("reference", "x")]),
            "Task: add\nReference:\nx\nEnd {{unknown}}"
        );
        assert_eq!(render(template, &[("requirement", "add"), ("reference", "")]), "Task: add\nEnd {{unknown}}");
        assert_eq!(render("{{open", &[]), "{{open");
    }

    #[test]
    fn templates_are_checked_before_use() {
        for (template, values) in [
            (default_template(TaskStyle::Mbpp), SOLVE_VALUES),
            (default_template(TaskStyle::Requirement), SOLVE_VALUES),
            (default_template(TaskStyle::Humaneval), SOLVE_VALUES),
            (crate::stdlib::file(REVISE_TEMPLATE).unwrap().1, REVISE_VALUES),
        ] {
            assert_eq!(check(template, values), Ok(()));
        }
        // What `revise` needs of a template of the user's.
        let revise = crate::stdlib::file(REVISE_TEMPLATE).unwrap().1;
        assert!(uses(revise, "code") && uses(revise, "feedback") && uses(revise, "reference"));
        assert!(!uses("{{requirement}} {{code", "code") && !uses("{{codes}}", "code"));
        assert!(uses("{{#code}}Yours: {{code}}{{/code}}", "code") && !uses("{{#code}}Yours.{{/code}}", "code"));
        assert_eq!(check("Solve {{ requirement }}", SOLVE_VALUES), Ok(()));
        assert_eq!(render("Solve {{ requirement }}", &[("requirement", "x")]), "Solve x");
        let error = |template| check(template, SOLVE_VALUES).unwrap_err().to_string();
        assert!(
            error("Solve {{nope}}").starts_with("`{{nope}}` is not a value this step fills"),
            "{}",
            error("{{nope}}")
        );
        assert!(error("Solve {{requirement").contains("never closed"));
        assert!(error("{{#tests}}{{tests}}").contains("never ended with `{{/tests}}`"));
        assert!(error("Solve it.").contains("uses none of {{requirement}}, {{tests}}, {{prompt}}"));
    }

    #[test]
    fn the_shipped_revision_examples_read_as_turns() {
        let text = crate::stdlib::file("std/prompts/revise-examples.jsonl").unwrap().1;
        let template = crate::stdlib::file(REVISE_TEMPLATE).unwrap().1;
        let examples: Vec<RevisionExample> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(examples.len(), 3);
        let (user, assistant) = revise_example(template, &examples[2]);
        assert!(user.contains("returned [14, 22, 22]") && !user.contains("A correct solution"), "{user}");
        assert!(!user.contains("For orientation") && !user.contains("raised at"), "{user}");
        let (user, _) = revise_example(template, &examples[1]);
        assert!(
            user.contains("raised at this line of the code:\n\nline 2: for i in range(2, int(math.sqrt(n)) + 1):"),
            "{user}"
        );
        assert_eq!(
            assistant,
            "```python\ndef heap_queue_largest(nums, n):\n    return sorted(nums, reverse=True)[:n]\n```"
        );
    }

    #[test]
    fn revise_shows_the_reference_as_its_mode_says() {
        let mut task = Task::example("7");
        task.reference = Some("def f(x):\n    return x + 1\n".into());
        let verdict = Verdict {
            sample: crate::data::Sample::reference(&task).unwrap(),
            status: crate::data::Status::Error,
            feedback: "Traceback (most recent call last):\n  File \"<test 1>\", line 1, in <module>\n  \
                       File \"<program>\", line 2, in f\nNameError: name 'y' is not defined"
                .into(),
            failed_test: None,
            duration_ms: 0.0,
        };
        let template = crate::stdlib::file(REVISE_TEMPLATE).unwrap().1;
        let shown = |mode| revise(template, &verdict, mode);
        assert!(shown(ReferenceMode::Show).contains("A correct solution, for reference"));
        assert!(!shown(ReferenceMode::Show).contains("For orientation"));
        assert!(shown(ReferenceMode::Hint).contains("For orientation only"));
        assert!(shown(ReferenceMode::Hint).contains("keep your own code"));
        let off = shown(ReferenceMode::Off);
        assert!(!off.contains("For orientation") && !off.contains("for reference"), "{off}");
        assert!(off.contains("raised at this line of the code:\n\nline 2: return x + 1"), "{off}");
        // A wrong result has no line to point at; a line past the code is not quoted.
        assert_eq!(failing_line("def f():\n    pass", "Test failed: assert f() == 1"), None);
        assert_eq!(failing_line("x = 1", "File \"<program>\", line 9, in <module>"), None);
    }

    #[test]
    fn requirement_prompt_leaves_the_tests_out() {
        let mut task = Task::example("7");
        task.prompt = "Write add(a, b).".into();
        task.tests = vec!["assert add(1, 2) == ok(3)".into()];
        let prompt = solve(default_template(TaskStyle::Requirement), &task);
        assert_eq!(prompt, "You are an expert Python programmer, and here is your task: Write add(a, b).\n");
    }

    #[test]
    fn mbpp_prompt_shows_requirement_and_tests() {
        let mut task = Task::example("7");
        task.prompt = "Write a function to add two numbers.".into();
        task.tests = vec!["assert add(1, 2) == 3".into(), "assert add(0, 0) == 0".into()];
        let prompt = solve(default_template(TaskStyle::Mbpp), &task);
        assert_eq!(
            prompt,
            "You are an expert Python programmer, and here is your task: Write a function to add two numbers.\n\
             Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
        );
    }
}
