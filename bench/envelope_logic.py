#!/usr/bin/env python3
"""How much of the result-envelope scenario's gap is the convention, and how much is logic.

The scenario's tests compare a function's result against `ok(value)`. Run with `ok` made the
identity, an answer passes when its value is right whether or not it wraps it in `ok`: its logic
is right. For each evaluation step in the given run directories (`base` and `final`, with their
verdicts `base-scores` and `scores`), this prints pass@1 as the run's sandbox judged it and pass@1
of the logic, and, for each adapted model, how many of the problems whose logic the base model
got right it still passes (the base model is taken from the first run directory that has one).

The logic is judged natively, one `python3 -I` process per answer in a temporary directory with a
10 s limit: these are the project's own runs' answers, not untrusted input.

    python3 bench/envelope_logic.py bench/results/result-envelope-1.5b-train40-test150-it1/{baseline-finetune,seed}
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

IDENTITY = "def ok(value):\n    return value\n"
STEPS = [("base", "base-scores"), ("final", "scores")]


def logic_passes(sample):
    """Whether the answer passes its tests with `ok` the identity (defined before and after it)."""
    task = sample["task"]
    source = "\n".join([IDENTITY, sample["code"], IDENTITY, *task["tests"]]) + "\n"
    with tempfile.TemporaryDirectory() as work:
        program = Path(work) / "answer.py"
        program.write_text(source)
        try:
            done = subprocess.run(
                [sys.executable, "-I", program], cwd=work, capture_output=True, stdin=subprocess.DEVNULL, timeout=10
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def judge(run_dir, generated, verdicts):
    """{task: (passed in the run, logic right)} for one evaluation step."""
    samples = read(run_dir / generated / "output.jsonl")
    passed = {v["task_id"]: v["status"] == "passed" for v in read(run_dir / verdicts / "output.jsonl")}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        logic = list(pool.map(logic_passes, samples))
    return {s["task_id"]: (passed.get(s["task_id"], False), right) for s, right in zip(samples, logic)}


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    steps = [
        (run_dir, generated, judge(run_dir, generated, verdicts))
        for run_dir in map(Path, sys.argv[1:])
        for generated, verdicts in STEPS
        if (run_dir / generated / "output.jsonl").exists()
    ]
    base = next((judged for _, generated, judged in steps if generated == "base"), {})
    base_right = {task for task, (_, right) in base.items() if right}
    print(f"{'run':<48} {'step':<6} {'tasks':>5} {'pass@1':>7} {'logic':>7}  of the base model's right logic, kept")
    for run_dir, generated, judged in steps:
        n = len(judged)
        passed = sum(p for p, _ in judged.values()) / n
        right = sum(r for _, r in judged.values()) / n
        kept = f"{sum(judged.get(t, (False, False))[0] for t in base_right)} of {len(base_right)}" if generated == "final" and base else ""
        print(f"{'/'.join(run_dir.parts[-2:]):<48} {generated:<6} {n:>5} {passed:7.3f} {right:7.3f}  {kept}", flush=True)


if __name__ == "__main__":
    main()
