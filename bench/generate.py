#!/usr/bin/env python3
"""Aggregate generation speed of seedflow's `generate` at 1, 4 and 8 parallel sequences, against
llama.cpp's own `llama-batched-bench` on the same model, CPU flags and sizes, in the same run.

llama-batched-bench is built from the llama.cpp tree in the `llama-cpp-python` source package
(the vendored tree in `llama-cpp-sys-2` has no tools), with llama.cpp's default CPU flags, which
are also what seedflow's build uses. Both decode a shared prompt and then `NTG` tokens per
sequence; the figure compared is generated tokens per second over all sequences.

seedflow's `generate` step also creates its llama.cpp context and decodes the prompt, which
llama-batched-bench leaves out of its generation time. So seedflow is measured twice: over the
whole step (what a user waits for), and as generation alone, from the difference between a step
of `NTG` and one of `2 * NTG` tokens per sequence (the same fixed costs cancel out; the extra
tokens sit at longer contexts, which if anything favours the anchor).

    python3 bench/generate.py
    SEEDFLOW_BIN=path/to/seedflow python3 bench/generate.py
"""
import json
import os
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SEEDFLOW_CACHE", Path.home() / ".cache" / "seedflow"))
NTG = 128
PARALLEL = [1, 4, 8]
THREADS = os.cpu_count() or 1


def seedflow_binary():
    if "SEEDFLOW_BIN" in os.environ:
        return Path(os.environ["SEEDFLOW_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "seedflow-target"))
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, env={**os.environ, "CARGO_TARGET_DIR": str(target)})
    return target / "release" / "seedflow"


def batched_bench():
    build = CACHE / "bench" / "llama.cpp-build"
    binary = build / "bin" / "llama-batched-bench"
    if binary.exists():
        return binary
    work = CACHE / "bench"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", work, "llama-cpp-python==0.3.36"], check=True)
    archive = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-batched-bench", "-j", str(THREADS)], check=True, capture_output=True)
    return binary


def anchor(binary, model, prompt_tokens):
    out = subprocess.run(
        [binary, "-m", model, "-c", "4096", "-b", "512", "-ub", "512", "-t", str(THREADS), "-pps",
         "-npp", str(prompt_tokens), "-ntg", str(NTG), "-npl", ",".join(map(str, PARALLEL))],
        check=True, capture_output=True, text=True,
    ).stdout
    speeds = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
            speeds[int(cells[2])] = float(cells[7])
    return speeds


def ours(binary, work):
    task = {"task_id": "bench", "prompt": "Write a Python function that returns the nth Fibonacci number, with a docstring, type hints and comments explaining each step.", "tests": ["assert True"]}
    (work / "task.jsonl").write_text(json.dumps(task) + "\n")
    flow = ['workflow "bench-generate" seed=1', 'model "coder" path="default" context=4096', 'dataset "task" format="jsonl" path="task.jsonl"',
            'generate "warm-up" model="coder" tasks="task" samples=1 max-tokens=8']
    for n in PARALLEL:
        for tokens in (NTG, 2 * NTG):
            flow.append(f'generate "n{n}-{tokens}" model="coder" tasks="task" samples={n} temperature=0.8 max-tokens={tokens} stop-after-code=#false')
    (work / "bench.kdl").write_text("\n".join(flow) + "\n")
    subprocess.run([binary, "run", work / "bench.kdl", "--run-dir", work / "run", "--ci"], check=True, capture_output=True)

    def measured(name):
        meta = json.loads((work / "run" / name / "meta.json").read_text())
        return meta["metrics"]["tokens"], meta["seconds"]

    whole, generation = {}, {}
    for n in PARALLEL:
        (short_tokens, short_seconds), (long_tokens, long_seconds) = measured(f"n{n}-{NTG}"), measured(f"n{n}-{2 * NTG}")
        whole[n] = short_tokens / short_seconds
        generation[n] = (long_tokens - short_tokens) / (long_seconds - short_seconds)
    return whole, generation


def main():
    model = subprocess.run([seedflow_binary(), "fetch", "model"], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as work:
        whole, generation = ours(seedflow_binary(), Path(work))
    theirs = anchor(batched_bench(), model, 64)
    print(f"generated tokens per second, {THREADS} threads, {NTG} tokens per sequence")
    print(f"{'sequences':>9} {'seedflow step':>13} {'seedflow generation':>19} {'llama-batched-bench':>19} {'ratio':>6}")
    for n in PARALLEL:
        anchor_speed = theirs.get(n, float("nan"))
        print(f"{n:>9} {whole[n]:>13.1f} {generation[n]:>19.1f} {anchor_speed:>19.1f} {generation[n] / anchor_speed:>6.2f}")
    print(f"ratio = seedflow generation / llama-batched-bench; whole step / anchor: "
          + ", ".join(f"{n}: {whole[n] / theirs.get(n, float('nan')):.2f}" for n in PARALLEL))
    print(f"seedflow 8 sequences / 1 sequence: {generation[8] / generation[1]:.2f}x (whole step: {whole[8] / whole[1]:.2f}x)")


if __name__ == "__main__":
    main()
