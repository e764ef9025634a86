#!/usr/bin/env python3
"""The most direct request there is, as a check of the model rather than of Self-Revise: each
error of a `revise.kdl` run whose value was right (the feedback says it only lacks the wrapper)
becomes a task whose whole prompt is its code and "Rewrite it so that it returns `ok(result)`
instead of `result` … `ok` is already defined". Writes `direct/tasks.jsonl` and
`direct/direct.kdl` beside this file; run `seedflow run direct/direct.kdl`.

    python3 bench/results/result-envelope-revise-probe/direct.py RUN_DIR
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
run = Path(sys.argv[1])
out = HERE / "direct"
out.mkdir(exist_ok=True)
tasks = []
for line in open(run / "errors" / "output.jsonl"):
    error = json.loads(line)
    if "The value is right" not in error["feedback"]:
        continue
    task = error["task"]
    prompt = (
        "Here is a Python function:\n\n```python\n" + error["code"] + "```\n\n"
        "Rewrite it so that it returns `ok(result)` instead of `result`: wrap every returned value "
        "in a call to `ok`. `ok` is already defined; do not define it. Answer with the whole code "
        "in one ```python block."
    )
    tasks.append({"task_id": task["task_id"], "prompt": prompt, "solution": task["reference"],
                  "setup": task["test_setup"], "tests": task["tests"], "entry_point": task["entry_point"]})
(out / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
(out / "raw.txt").write_text("{{requirement}}\n")
(out / "direct.kdl").write_text(
    'workflow "direct-probe" seed=1\nmodel "coder" path="default"\n'
    'dataset "t" format="jsonl" path="tasks.jsonl"\n'
    'generate "g" model="coder" tasks="t" samples=1 temperature=0 max-tokens=300 template="raw.txt"\n'
    'execute "v" code="g"\n'
)
print(f"{len(tasks)} tasks in {out / 'tasks.jsonl'}")
