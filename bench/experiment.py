#!/usr/bin/env python3
"""SEED against its baselines on MBPP with the default model, as the SEED paper compares them:
direct generation (no training), direct fine-tuning (LoRA on the dataset's reference code for the
training problems) and SEED (LoRA on the model's own revised error code for the same problems).
All three run the shipped workflows unchanged except for the sizes below, and are evaluated
greedily on the same held-out MBPP test problems.

    python3 bench/experiment.py                      # TRAIN=20 TEST=100 ITERATIONS=2
    TRAIN=100 TEST=500 ITERATIONS=3 python3 bench/experiment.py
    ONLY=seed TRAIN=100 TEST=500 ITERATIONS=3 python3 bench/experiment.py   # one arm (by run name)

Prints a table (training samples used, pass@1, relative gain over each baseline, wall time) and
writes it with `seedflow report`'s comparison (JSON, Markdown, HTML) to `OUT`
(default ~/.cache/seedflow/bench/experiment/<sizes>/). Finished runs are reused and an
interrupted one is resumed, so the script can be started again after a stop.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from generate import CACHE, ROOT, seedflow_binary

TRAIN = int(os.environ.get("TRAIN", 20))
TEST = int(os.environ.get("TEST", 100))
ITERATIONS = int(os.environ.get("ITERATIONS", 2))
SIZES = f"train{TRAIN}-test{TEST}-it{ITERATIONS}"
OUT = Path(os.environ.get("OUT", CACHE / "bench" / "experiment" / SIZES))

SEED = [f"train.limit={TRAIN}", f"adapt.max-iterations={ITERATIONS}"]
# (label, run name, workflow, overrides beyond the test size)
ARMS = [
    ("direct generation", "baseline-direct", "baseline-direct", []),
    ("direct fine-tuning", "baseline-finetune", "baseline-finetune", [f"train.limit={TRAIN}"]),
    ("SEED", "seed", "seed", SEED),
]
# A choice the paper leaves open, with CONTINUE=1: each iteration continues the previous adapter
# on its own revisions (`init=`) instead of training afresh from the base model on all revisions
# so far (`history=`, the shipped default). It starts from a copy of the SEED run, so the steps
# both share come from seedflow's cache; its wall time is its own steps'.
CONTINUE = ("SEED, continuing the previous adapter", "seed-continue", "seed", SEED)
VARIANTS = {"seed-continue": ('history="prev.tune"', 'init="prev.tune"')}


def variant(name, workflow, overrides):
    """The workflow file and overrides of a variant of a shipped workflow, written into OUT."""
    old, new = VARIANTS[name]
    text = (ROOT / "workflows" / f"{workflow}.kdl").read_text()
    assert old in text, f"{workflow}.kdl has no {old}"
    path = OUT / f"{name}.kdl"
    path.write_text(text.replace(old, new))
    data = ROOT / "examples" / "data" / "mbpp"
    return path, overrides + [f"train.path={data / 'train.jsonl'}", f"test.path={data / 'test.jsonl'}"]


def run_arm(binary, name, workflow, overrides):
    """Runs (or resumes, or reuses) one workflow; returns its run directory and wall seconds."""
    run_dir = OUT / name
    file = ROOT / "workflows" / f"{workflow}.kdl"
    if name in VARIANTS:
        file, overrides = variant(name, workflow, overrides)
        if not run_dir.exists():
            shutil.copytree(OUT / workflow, run_dir)
            (run_dir / "wall-seconds.json").unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Wall time over all invocations, so a resumed run counts the time before its stop too. It is
    # written every minute: a killed script (the end of a session) loses at most that much.
    timing = run_dir / "wall-seconds.json"
    earlier = json.loads(timing.read_text()) if timing.exists() else {"seconds": 0.0, "finished": False}
    summary = run_dir / "summary.json"
    if earlier["finished"]:
        return run_dir, earlier["seconds"]
    args = [binary, "run", file, "--run-dir", run_dir, "--set", f"test.limit={TEST}"]
    for override in overrides:
        args += ["--set", override]
    if summary.exists():
        args.append("--resume")
    start, code = time.monotonic(), None

    def record(finished):
        seconds = earlier["seconds"] + time.monotonic() - start
        timing.write_text(json.dumps({"seconds": seconds, "finished": finished}))
        return seconds

    process = subprocess.Popen(args)
    try:
        while code is None:
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                record(False)
    finally:
        if code is None:
            process.terminate()  # seedflow keeps what it finished; the next run resumes it
            process.wait()
        finished = code in (0, 3)  # 3: the workflow's quality gate failed, which is a result here
        seconds = record(finished)
    if code == 2:
        raise SystemExit(f"{workflow}: the workflow or its overrides are invalid (see above)")
    if not finished:
        raise SystemExit(f"{workflow} stopped with exit code {code}; run the script again to resume it")
    return run_dir, seconds


def main():
    # A stop from outside ends the script through `run_arm`'s cleanup, which stops seedflow.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    binary = seedflow_binary()
    OUT.mkdir(parents=True, exist_ok=True)
    arms = ARMS + [CONTINUE] if os.environ.get("CONTINUE") == "1" else ARMS
    only = os.environ.get("ONLY")
    if only:
        # One arm at a time, for a run too long for one sitting; the table needs them all.
        for label, name, workflow, overrides in arms:
            if name in only.split(","):
                run_arm(binary, name, workflow, overrides)
        print(f"finished: {only}; the table comes from a run of the script without ONLY")
        return
    arms = [(label, *run_arm(binary, name, workflow, overrides)) for label, name, workflow, overrides in arms]
    # The figures come from seedflow's own report of the runs (training samples as it counts them).
    report_dir = OUT / "report"
    subprocess.run([binary, "report", *[run_dir for _, run_dir, _ in arms], "--out", report_dir], check=True, stdout=subprocess.DEVNULL)
    reported = json.loads((report_dir / "report.json").read_text())
    rows = []
    for (label, run_dir, seconds), run in zip(arms, reported):
        scores = next(e for e in run["evaluations"] if e["step"] == "scores")
        rows.append((label, run_dir, run["training_examples"], scores["scores"]["pass@1"], seconds))

    direct, finetune = rows[0][3], rows[1][3]
    gain = lambda value, base: f"{(value - base) / base:+.1%}" if base > 0 else "n/a"
    lines = [
        f"MBPP, default model, {TRAIN} training problems, first {TEST} test problems, greedy pass@1; "
        f"SEED up to {ITERATIONS} iterations.",
        "",
        "| method | training samples | pass@1 | vs direct generation | vs direct fine-tuning | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, samples, pass1, seconds in rows:
        lines.append(
            f"| {label} | {samples} | {pass1:.3f} | {gain(pass1, direct)} | {gain(pass1, finetune)} | {seconds / 60:.1f} min |"
        )
    table = "\n".join(lines)
    print(table)
    (OUT / "table.md").write_text(table + "\n")
    print(f"\nreport: {report_dir / 'report.html'}")


if __name__ == "__main__":
    main()
