#!/usr/bin/env python3
"""Compute-bound programs in the sandbox against native CPython, program by program.

bench/sandbox.py measures verdicts per second, where the sandbox wins because an instance starts
in microseconds; this measures what it costs once a program computes. It takes the COUNT slowest
MBPP reference solutions natively (each with its tests, all splits), then runs each of them one
at a time both natively (in a `python3 -I` process, timed inside it so the interpreter's start is
left out, the best of ROUNDS) and in seedflow's sandbox (an
`execute` step with one worker and a 60 s deadline, the best of ROUNDS; its verdicts' own
durations), in the same run, and prints each program's times and their ratio, and the ratio of
the totals.

    python3 bench/sandbox_compute.py            # builds seedflow in release mode first
    SEEDFLOW_BIN=path/to/seedflow COUNT=20 ROUNDS=3 python3 bench/sandbox_compute.py
"""
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ["prompt", "test", "validation", "train"]
COUNT = int(os.environ.get("COUNT", "20"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def program(task):
    return "\n".join([task["code"], task["test_setup_code"], *task["test_list"]])


# Times the program inside the interpreter, its start left out (the sandbox's instances start
# in microseconds; what is compared here is running the program).
TIMER = """
import sys, time
source = open(sys.argv[1]).read()
start = time.perf_counter()
exec(compile(source, sys.argv[1], "exec"), {"__name__": "__main__"})
print(time.perf_counter() - start)
"""


def native_seconds(task):
    """Seconds the task's reference and tests take to run in a `python3 -I` process."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(program(task))
    try:
        done = subprocess.run([sys.executable, "-I", "-c", TIMER, f.name], capture_output=True, text=True, timeout=120)
        return float(done.stdout.split()[-1]) if done.returncode == 0 else math.inf
    except subprocess.TimeoutExpired:
        return math.inf
    finally:
        os.unlink(f.name)


def sandbox_seconds(binary, tasks, work):
    """Each task's verdict duration in seconds, the best of ROUNDS runs with one worker."""
    data = work / "slowest.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    flow = work / "bench.kdl"
    flow.write_text(
        'workflow "bench-sandbox-compute"\n'
        f'dataset "slowest" format="mbpp" path="{data}"\n'
        'execute "references" code="slowest" timeout="60s"\n'
    )
    best = {}
    for round in range(ROUNDS):
        run_dir = work / f"run-{round}"
        subprocess.run([binary, "run", flow, "--run-dir", run_dir, "--ci", "--workers", "1"], check=True, capture_output=True)
        for line in (run_dir / "references" / "output.jsonl").read_text().splitlines():
            verdict = json.loads(line)
            task, seconds = str(verdict["task_id"]), verdict["duration_ms"] / 1000
            if verdict["status"] != "passed":
                seconds = math.inf
            best[task] = min(best.get(task, math.inf), seconds)
    return best


def main():
    binary = os.environ.get("SEEDFLOW_BIN")
    if binary is None:
        target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "seedflow-target"))
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, env={**os.environ, "CARGO_TARGET_DIR": str(target)})
        binary = target / "release" / "seedflow"
    tasks = [json.loads(line) for split in SPLITS for line in (ROOT / "examples/data/mbpp" / f"{split}.jsonl").read_text().splitlines()]
    # A first pass, all cores, only picks the slowest; they are timed again one at a time below.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        first = list(pool.map(native_seconds, tasks))
    slowest = [t for _, t in sorted(zip(first, tasks), key=lambda p: -p[0] if math.isfinite(p[0]) else 0)[:COUNT]]
    native = {str(t["task_id"]): min(native_seconds(t) for _ in range(ROUNDS)) for t in slowest}
    with tempfile.TemporaryDirectory() as work:
        sandboxed = sandbox_seconds(binary, slowest, Path(work))
    print(f"the {COUNT} slowest MBPP references natively, best of {ROUNDS}, one at a time")
    print(f"{'task':>6} {'native s':>9} {'sandbox s':>10} {'ratio':>6}")
    ratios = []
    for task in sorted(native, key=lambda t: -native[t]):
        ratio = sandboxed.get(task, math.inf) / native[task]
        ratios.append(ratio)
        print(f"{task:>6} {native[task]:9.4f} {sandboxed.get(task, math.inf):10.4f} {ratio:5.2f}x")
    finite = [r for r in ratios if math.isfinite(r)]
    total_native = sum(native.values())
    total_sandbox = sum(sandboxed.get(t, math.inf) for t in native)
    print(f"total: native {total_native:.2f} s, sandbox {total_sandbox:.2f} s, ratio sandbox / native {total_sandbox / total_native:.2f}x")
    if finite:
        geometric = math.exp(sum(map(math.log, finite)) / len(finite))
        print(f"geometric mean of the ratios: {geometric:.2f}x over {len(finite)} programs; worst {max(finite):.2f}x")


if __name__ == "__main__":
    main()
