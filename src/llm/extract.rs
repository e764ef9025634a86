//! Code out of a model's answer: the fenced block that holds the solution, without the chatter
//! around it. Answers may be cut off by `max-tokens`, so an unclosed fence runs to the end.

/// A fenced block: its language tag and its body.
fn fenced_blocks(answer: &str) -> Vec<(String, String)> {
    let mut blocks = vec![];
    let mut lines = answer.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(language) = trimmed.strip_prefix("```") else { continue };
        let mut body = String::new();
        for inner in lines.by_ref() {
            if inner.trim_start().starts_with("```") {
                break;
            }
            body.push_str(inner);
            body.push('\n');
        }
        blocks.push((language.trim().to_lowercase(), body));
    }
    blocks
}

/// Whether the answer's first code block is complete, so generation can stop: what follows a
/// solution is explanation the sandbox does not need.
pub fn first_block_closed(answer: &str) -> bool {
    let mut fences = answer.lines().filter(|l| l.trim_start().starts_with("```"));
    fences.next().is_some() && fences.next().is_some()
}

/// The code in `answer`. `entry_point` (the function the tests call) picks the right block when
/// there are several; `completion_of` is a signature the answer may only complete (HumanEval).
pub fn extract_code(answer: &str, entry_point: Option<&str>, completion_of: Option<&str>) -> String {
    let blocks = fenced_blocks(answer);
    let python = |lang: &str| lang.is_empty() || lang == "python" || lang == "py" || lang == "python3";
    let defines = |body: &str| match entry_point {
        Some(name) => body.contains(&format!("def {name}")),
        None => body.contains("def ") || body.contains("class "),
    };
    let chosen = blocks
        .iter()
        .find(|(lang, body)| python(lang) && defines(body))
        .or_else(|| blocks.iter().find(|(lang, _)| python(lang)))
        .or_else(|| blocks.first())
        .map(|(_, body)| body.clone());
    let code = match chosen {
        Some(code) => code,
        // No fence: keep the text from the first line that starts code.
        None => {
            let starts_code = |l: &str| ["def ", "class ", "import ", "from ", "@"].iter().any(|p| l.starts_with(p));
            let lines: Vec<&str> = answer.lines().collect();
            let start = lines.iter().position(|l| starts_code(l)).unwrap_or(0);
            lines[start..].join("\n") + "\n"
        }
    };
    match (completion_of, entry_point) {
        (Some(signature), Some(name)) if !code.contains(&format!("def {name}")) => format!("{signature}{code}"),
        _ => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_python_block_that_defines_the_function() {
        let answer = "Here is the solution:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nExample:\n```python\nprint(add(1, 2))\n```\nThis works because…";
        assert_eq!(extract_code(answer, Some("add"), None), "def add(a, b):\n    return a + b\n");
        assert_eq!(extract_code(answer, None, None), "def add(a, b):\n    return a + b\n");
    }

    #[test]
    fn handles_unclosed_fences_plain_code_and_other_tags() {
        assert_eq!(extract_code("```python\ndef f():\n    return 1", Some("f"), None), "def f():\n    return 1\n");
        assert_eq!(extract_code("Sure.\ndef f():\n    return 1", Some("f"), None), "def f():\n    return 1\n");
        assert_eq!(extract_code("```Python3\ndef f(): pass\n```", None, None), "def f(): pass\n");
        assert_eq!(extract_code("```bash\nls\n```\n```\ndef g(): pass\n```", Some("g"), None), "def g(): pass\n");
    }

    #[test]
    fn completes_a_signature_when_the_answer_only_has_a_body() {
        let signature = "def f(x):\n    \"\"\"Return x.\"\"\"\n";
        assert_eq!(
            extract_code("```python\n    return x\n```", Some("f"), Some(signature)),
            format!("{signature}    return x\n")
        );
        assert_eq!(
            extract_code("```python\ndef f(x):\n    return x\n```", Some("f"), Some(signature)),
            "def f(x):\n    return x\n"
        );
    }

    #[test]
    fn knows_when_the_first_block_is_complete() {
        assert!(!first_block_closed("Here:\n```python\ndef f():"));
        assert!(first_block_closed("Here:\n```python\ndef f():\n    pass\n```"));
        assert!(!first_block_closed("no code yet"));
    }
}
