#!/usr/bin/env python3
"""SEED's sampling workload through llama-server against the in-process backend, same machine,
same run: `generate` on the error-collection shape (MBPP training tasks, 5 samples each at
temperature 0.8, answers stopped once their code block closes) at 1, 4 and 8 sequences, once with
llama.cpp in seedflow's process and once with `model … server=URL` against a llama-server started
with as many slots (`--parallel`), the same threads and the same chat template rendering
(`--no-jinja`). The figure is the step's generated tokens over its wall time, prompt decoding and
HTTP included; the ratio is server / in-process. Rounds alternate the two, medians are reported.
It also prints the CPU time seedflow's own process took in the server arm: the HTTP client's
cost, which on one machine comes out of the cores the server computes on.

llama-server is what `seedflow fetch llama-server` builds: llama-cpp-python 0.3.36's llama.cpp,
not the tree seedflow links (whose vendored copy has no server), so the ratio holds the two
llama.cpp versions' difference as well as the HTTP layer's cost.

    python3 bench/server.py
    SEEDFLOW_BIN=path/to/seedflow ROUNDS=3 TASKS=8 python3 bench/server.py
"""
import json
import os
import resource
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import median

from generate import MBPP, PARALLEL, ROUNDS, THREADS, seedflow_binary

TASKS = int(os.environ.get("TASKS", "8"))  # as bench/generate.py's workload
SAMPLES = 5  # per task, as in SEED's error collection


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, model, parallel):
    port = free_port()
    process = subprocess.Popen(
        [binary, "--model", model, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
         "--ctx-size", str(2048 * parallel), "--threads", str(THREADS), "--no-jinja", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("llama-server did not start")


def workload(binary, work, parallel, server=None):
    """Generated tokens per second of the workload step, its tokens, and the CPU seconds
    seedflow's own process took (through a server: the client's, the HTTP layer's cost)."""
    where = f' server="{server}"' if server else ""
    flow = [
        'workflow "bench" seed=1',
        f'model "coder" path="default" context=2048 threads={THREADS} parallel={parallel}{where}',
        f'dataset "mbpp" format="mbpp" path="{MBPP}" limit={TASKS}',
        # The model loaded (in-process) or the server warmed, outside the timed step.
        'generate "warm-up" model="coder" tasks="mbpp" samples=1 temperature=0 max-tokens=4',
        f'generate "workload" model="coder" tasks="mbpp" samples={SAMPLES} temperature=0.8',
    ]
    (work / "bench.kdl").write_text("\n".join(flow) + "\n")
    run = work / f"run-{parallel}-{'server' if server else 'local'}"
    subprocess.run(["rm", "-rf", run], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([binary, "run", work / "bench.kdl", "--run-dir", run, "--ci"], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"seedflow failed:\n{done.stdout}{done.stderr}")
    meta = json.loads((run / "workload" / "meta.json").read_text())
    return meta["metrics"]["tokens"] / meta["seconds"], meta["metrics"]["tokens"], cpu


def main():
    binary = seedflow_binary()
    model = subprocess.run([binary, "fetch", "model"], check=True, capture_output=True, text=True).stdout.strip()
    server = subprocess.run([binary, "fetch", "llama-server"], check=True, capture_output=True, text=True).stdout.strip()
    local, remote = {n: [] for n in PARALLEL}, {n: [] for n in PARALLEL}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for _ in range(ROUNDS):
            for n in PARALLEL:
                local[n].append(workload(binary, work, n))
                process, url = start_server(server, model, n)
                try:
                    remote[n].append(workload(binary, work, n, url))
                finally:
                    process.kill()
                    process.wait()
    print(f"{Path(model).name}, {THREADS} threads: SEED's error collection ({TASKS} MBPP tasks, {SAMPLES} samples each, "
          f"temperature 0.8, stopped after the code), generated tokens per second of the whole step, median of {ROUNDS} rounds")
    print(f"{'sequences':>9} {'in-process':>10} {'llama-server':>12} {'ratio':>6}   rounds (tokens/s, tokens)")
    for n in PARALLEL:
        ours, theirs = median(s for s, _, _ in local[n]), median(s for s, _, _ in remote[n])
        rounds = "; ".join(f"{a:.1f} ({at:.0f}) / {b:.1f} ({bt:.0f})" for (a, at, _), (b, bt, _) in zip(local[n], remote[n]))
        print(f"{n:>9} {ours:>10.1f} {theirs:>12.1f} {theirs / ours:>6.2f}   {rounds}")
    print("ratio = through llama-server / in process")
    client = [cpu for n in PARALLEL for _, _, cpu in remote[n]]
    print(f"seedflow's own CPU time through llama-server (the HTTP client, planning, records): {min(client):.1f}-{max(client):.1f} s a run")


if __name__ == "__main__":
    main()
