#!/usr/bin/env python3
"""Builds the `result-envelope` scenario from MBPP: tasks a capable code model fails only because
it does not know a house convention that no prompt states.

The convention: every public function returns its result wrapped in the team's envelope,
`ok(value)` — a helper the team's runtime provides (here the tasks' `setup` defines it, as a
team's test fixture would). A prompt gives the requirement and the function's signature, nothing
else: the tests (`assert f(x) == ok(y)`) are checks, never shown to the model at work. So the
base model writes correct logic and fails every test, while the task's logic stays within its
reach; what it has to learn is the convention.

Each MBPP problem whose tests are all of the form `assert f(args) == expected` and whose function
is not recursive is rewritten: the reference solution's `return X` statements in `f` become
`return ok(X)` (through Python's `ast`, which also normalises the layout: 4-space indents, `\\n`
line ends), and each test compares with `ok(expected)`. Every reference is run against its tests
with this interpreter; a task whose reference fails is left out.

    python3 examples/data/result-envelope/build.py   # writes train.jsonl and test.jsonl beside it

Train comes from MBPP's train split (task ids 601–974), test from MBPP's test split (11–510), so
no problem is in both. Derived from MBPP (Austin et al., 2021; CC BY 4.0).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MBPP = HERE.parent / "mbpp"
TRAIN, TEST = 40, 200

# The team's runtime: what a `from team import ok` would give. Equal only to another envelope,
# so a bare value never passes.
SETUP = '''class Result:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is Result and self.value == other.value

    def __repr__(self):
        return "ok(%r)" % (self.value,)


def ok(value):
    return Result(value)
'''


def entry_point(tests):
    """The function every test calls, if all tests are `assert f(...) == expected`."""
    names = set()
    for test in tests:
        node = ast.parse(test).body[0]
        if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)):
            return None
        compare = node.test
        if len(compare.ops) != 1 or not isinstance(compare.ops[0], ast.Eq):
            return None
        if not (isinstance(compare.left, ast.Call) and isinstance(compare.left.func, ast.Name)):
            return None
        names.add(compare.left.func.id)
    return names.pop() if len(names) == 1 else None


class WrapReturns(ast.NodeTransformer):
    """`return X` -> `return ok(X)` in one function, not in functions or lambdas nested in it."""

    def __init__(self):
        self.depth = 0
        self.wrapped = 0

    def visit_FunctionDef(self, node):
        self.depth += 1
        if self.depth == 1:
            self.generic_visit(node)
        self.depth -= 1
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        return node

    def visit_Return(self, node):
        if node.value is None:
            raise ValueError("a bare return")
        self.wrapped += 1
        return ast.copy_location(ast.Return(ast.Call(ast.Name("ok", ast.Load()), [node.value], [])), node)


def convert(record):
    tests = record["test_list"]
    if record.get("test_setup_code"):
        return None
    name = entry_point(tests)
    if name is None:
        return None
    module = ast.parse(record["code"].replace("\r\n", "\n").replace("\t", "    "))
    functions = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if len(functions) != 1:
        return None
    function = functions[0]
    # Recursive, or called by other code: wrapping its returns would change what callers get.
    calls = [n for n in ast.walk(module) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]
    if calls:
        return None
    wrap = WrapReturns()
    try:
        wrap.visit(function)
    except ValueError:
        return None
    if wrap.wrapped == 0:
        return None
    ast.fix_missing_locations(module)
    solution = ast.unparse(module) + "\n"
    new_tests = []
    for test in tests:
        compare = ast.parse(test).body[0].test
        call = ast.get_source_segment(test, compare.left)
        expected = ast.get_source_segment(test, compare.comparators[0])
        new_tests.append(f"assert {call} == ok({expected})")
    signature = f"{name}({ast.unparse(function.args)})"
    prompt = f"{record['text'].strip()}\nWrite it as the function `{signature}`."
    return {
        "task_id": f"envelope-{record['task_id']}",
        "prompt": prompt,
        "solution": solution,
        "setup": SETUP,
        "tests": new_tests,
        "entry_point": name,
    }


def passes(task):
    """Runs the reference against its tests natively: program, setup, then each test."""
    program = "\n".join([task["solution"], task["setup"], *task["tests"]])
    try:
        result = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def build(split, count):
    tasks = []
    for line in (MBPP / f"{split}.jsonl").read_text().splitlines():
        task = convert(json.loads(line))
        if task is not None and passes(task):
            tasks.append(task)
        if len(tasks) == count:
            break
    path = HERE / f"{split}.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    print(f"{path}: {len(tasks)} tasks")


if __name__ == "__main__":
    build("train", TRAIN)
    build("test", TEST)
