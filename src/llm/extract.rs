//! Code out of a model's answer: the fenced block that holds the solution, without the chatter
//! around it. Answers may be cut off by `max-tokens`, so an unclosed fence runs to the end.

/// A fenced code block, as Markdown reads one: a line of three or more backticks or tildes (with
/// a language tag after them) opens it, and the first line of only the same character, at least
/// as many, closes it; so a fence of four backticks can hold lines of three, and a tagged line
/// such as ```` ```python ```` inside a block does not close it. The body loses the opening
/// fence's indentation (a block inside a list item is indented with it).
struct Block {
    language: String,
    body: String,
    closed: bool,
}

/// The fence a line opens: its character, its length, its indentation and what follows it.
fn opening_fence(line: &str) -> Option<(char, usize, usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let rest = &line[indent..];
    let mark = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let length = rest.len() - rest.trim_start_matches(mark).len();
    let info = &rest[length..];
    // A backtick in a backtick fence's tag makes the line inline code instead.
    (length >= 3 && !(mark == '`' && info.contains('`'))).then_some((mark, length, indent, info))
}

fn closes(line: &str, mark: char, length: usize) -> bool {
    let fence = line.trim();
    fence.len() >= length && fence.chars().all(|c| c == mark)
}

fn fenced_blocks(answer: &str) -> Vec<Block> {
    let mut blocks = vec![];
    let mut lines = answer.lines();
    while let Some(line) = lines.next() {
        let Some((mark, length, indent, info)) = opening_fence(line) else { continue };
        let mut block = Block { language: info.trim().to_lowercase(), body: String::new(), closed: false };
        for inner in lines.by_ref() {
            if closes(inner, mark, length) {
                block.closed = true;
                break;
            }
            let spaces = inner.len() - inner.trim_start_matches(' ').len();
            block.body.push_str(&inner[spaces.min(indent)..]);
            block.body.push('\n');
        }
        blocks.push(block);
    }
    blocks
}

/// Whether the answer's first code block is complete, so generation can stop: what follows a
/// solution is explanation the sandbox does not need.
pub fn first_block_closed(answer: &str) -> bool {
    fenced_blocks(answer).first().is_some_and(|b| b.closed)
}

/// Whether `code` defines the function `name` (not merely one whose name starts with it).
fn defines_function(code: &str, name: &str) -> bool {
    code.lines().any(|line| {
        let line = line.trim_start();
        let line = line.strip_prefix("async ").map_or(line, str::trim_start);
        line.strip_prefix("def ")
            .and_then(|rest| rest.trim_start().strip_prefix(name))
            .is_some_and(|rest| rest.trim_start().starts_with('('))
    })
}

/// The code in `answer`. `entry_point` (the function the tests call) picks the right block when
/// there are several; `completion_of` is a signature the answer may only complete (HumanEval).
pub fn extract_code(answer: &str, entry_point: Option<&str>, completion_of: Option<&str>) -> String {
    let blocks = fenced_blocks(answer);
    let python = |b: &&Block| ["", "python", "py", "python3"].contains(&b.language.as_str());
    let defines = |b: &&Block| match entry_point {
        Some(name) => defines_function(&b.body, name),
        None => b.body.contains("def ") || b.body.contains("class "),
    };
    let chosen = blocks
        .iter()
        .find(|b| python(b) && defines(b))
        .or_else(|| blocks.iter().find(python))
        .or_else(|| blocks.first())
        .map(|b| b.body.clone());
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
        (Some(signature), Some(name)) if !defines_function(&code, name) => format!("{signature}{code}"),
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
        assert!(!first_block_closed("Here: ```python f()``` then\n"), "inline code is no fence");
        assert!(!first_block_closed("~~~python\nx = 1\n```\n"), "a fence closes with its own character");
        assert!(first_block_closed("~~~python\nx = 1\n~~~\n"));
    }

    #[test]
    fn reads_fences_as_markdown_does() {
        // Tildes; a longer fence holding a shorter one; a tagged line inside a block.
        assert_eq!(extract_code("~~~python\ndef f(): pass\n~~~\nDone.", Some("f"), None), "def f(): pass\n");
        let nested = "````python\ndef f():\n    \"\"\"\n    ```\n    \"\"\"\n````";
        assert_eq!(extract_code(nested, Some("f"), None), "def f():\n    \"\"\"\n    ```\n    \"\"\"\n");
        let tagged = "```python\ndef f():\n    s = \"\"\"\n```python\n\"\"\"\n```";
        assert_eq!(extract_code(tagged, Some("f"), None), "def f():\n    s = \"\"\"\n```python\n\"\"\"\n");
        // A block indented in a list item loses the fence's indentation, not the code's.
        let listed = "1. The function:\n   ```python\n   def f():\n       return 1\n   ```\n";
        assert_eq!(extract_code(listed, Some("f"), None), "def f():\n    return 1\n");
    }

    #[test]
    fn a_function_whose_name_starts_with_the_entry_point_is_not_it() {
        let answer = "```python\ndef f_helper():\n    return 1\n```\n```python\nasync def f (x):\n    return x\n```";
        assert_eq!(extract_code(answer, Some("f"), None), "async def f (x):\n    return x\n");
        let signature = "def f(x):\n";
        assert_eq!(
            extract_code("```python\ndef f_helper():\n    pass\n```", Some("f"), Some(signature)),
            "def f(x):\ndef f_helper():\n    pass\n"
        );
    }
}
