#!/usr/bin/env python3
"""SEED against its baselines with the default model (or `MODEL`), as the SEED paper compares them: direct
generation (no training), direct fine-tuning (LoRA on the dataset's reference code for the
training problems) and SEED (LoRA on the model's own revised error code for the same problems).
The arms run the shipped workflows unchanged except for the sizes and data below, and are
evaluated greedily on the same held-out problems. Direct generation is the SEED run's own
evaluation of the base model (`base-scores`: same model, same problems, greedy), so it is not run
twice.

    python3 bench/experiment.py                      # MBPP, TRAIN=20 TEST=100 ITERATIONS=2
    TRAIN=100 TEST=500 ITERATIONS=3 python3 bench/experiment.py
    ONLY=seed TRAIN=100 TEST=500 ITERATIONS=3 python3 bench/experiment.py   # one arm (by run name)
    DATA=examples/data/result-envelope TRAIN=40 TEST=200 ITERATIONS=1 python3 bench/experiment.py
    MODEL=qwen2.5-coder-1.5b DATA=… python3 bench/experiment.py     # another model for every arm
    SEED_SET="adapt.revisions.examples=std/prompts/revise-examples.jsonl" DATA=… python3 bench/experiment.py   # SEED's arm changed

`DATA` names a directory of seedflow jsonl tasks (`train.jsonl`, `test.jsonl`), such as the
result-envelope scenario, which the arms read through `--set train.path=…` as a user would.
`SEED_SET` adds `--set` overrides (space-separated `name.property=value`) to the SEED arm alone,
to compare a variant of it against the same baselines; the default `OUT` then names them.

Prints a table (training samples used, pass@1, relative gain over each baseline, wall time), the
paired comparisons of SEED with each baseline on the same test problems (flips, exact McNemar p,
95% bootstrap interval, from `seedflow report`), SEED's own-code edit share per iteration, and
writes `seedflow report`'s comparison (JSON, Markdown, HTML) to `OUT` (default
~/.cache/seedflow/bench/experiment/<data>-<sizes>/). Finished runs are reused and an interrupted
one is resumed, so the script can be started again after a stop.
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
DATA = Path(os.environ["DATA"]) if os.environ.get("DATA") else None
# A model for every arm instead of the default: a built-in name or a GGUF file (`coder.path`).
MODEL = os.environ.get("MODEL")
# Overrides for the SEED arm alone (a variant of Self-Revise, say), as `--set` takes them.
SEED_SET = os.environ.get("SEED_SET", "").split()
SIZES = f"train{TRAIN}-test{TEST}-it{ITERATIONS}"
VARIANT = SEED_SET and "set-" + "-".join(o.replace("/", "_") for o in SEED_SET)
NAME = "-".join(part for part in (DATA.name if DATA else None, MODEL and Path(MODEL).name.removesuffix(".gguf"), SIZES, VARIANT) if part)
OUT = Path(os.environ.get("OUT", CACHE / "bench" / "experiment" / NAME))

# A user's own tasks, the way the README tells users to give them (paths as given, relative to
# the current directory as `--set` paths are).
DATA_SETS = (
    [f"{split}.{key}={value}" for split in ("train", "test") for key, value in
     (("path", DATA / f"{split}.jsonl"), ("format", "jsonl"))]
    if DATA else []
) + ([f"coder.path={MODEL}"] if MODEL else [])
SEED = [f"train.limit={TRAIN}", f"adapt.max-iterations={ITERATIONS}", *DATA_SETS, *SEED_SET]
# (label, run name, workflow, overrides beyond the test size)
DIRECT = ("direct generation", "baseline-direct", "baseline-direct", DATA_SETS)
ARMS = [
    ("direct fine-tuning", "baseline-finetune", "baseline-finetune", [f"train.limit={TRAIN}", *DATA_SETS]),
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
    paths = [] if DATA else [f"train.path={data / 'train.jsonl'}", f"test.path={data / 'test.jsonl'}"]
    return path, overrides + paths


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
    # Runs made before the SEED workflow evaluated the base model (bench/results' MBPP runs) have
    # direct generation as an arm of its own.
    if (OUT / DIRECT[1]).exists():
        arms = [DIRECT, *arms]
    only = os.environ.get("ONLY")
    if only:
        # One arm at a time, for a run too long for one sitting; the table needs them all.
        for label, name, workflow, overrides in arms:
            if name in only.split(","):
                run_arm(binary, name, workflow, overrides)
        print(f"finished: {only}; the table comes from a run of the script without ONLY")
        return
    arms = [(label, *run_arm(binary, name, workflow, overrides)) for label, name, workflow, overrides in arms]
    # The figures come from seedflow's own report of the runs (training samples as it counts
    # them; the paired comparisons against the first run named).
    report_dir = OUT / "report"
    subprocess.run([binary, "report", *[run_dir for _, run_dir, _ in arms], "--out", report_dir], check=True, stdout=subprocess.DEVNULL)
    reported = json.loads((report_dir / "report.json").read_text())
    runs = dict(zip([label for label, _, _ in arms], reported))
    evaluation = lambda run, step: next(e for e in run["evaluations"] if e["step"] == step)["scores"]["pass@1"]
    rows = [] if DIRECT[0] in runs else [("direct generation (SEED run's base-scores)", 0, evaluation(runs["SEED"], "base-scores"), None)]
    for (label, run_dir, seconds), run in zip(arms, reported):
        rows.append((label, run["training_examples"], evaluation(run, "scores"), seconds))
    seed_run = runs["SEED"]

    direct, finetune = rows[0][2], rows[1][2]
    gain = lambda value, base: f"{value - base:+.3f} ({(value - base) / base:+.0%})" if base > 0 else "n/a"
    data = f"{DATA.name} scenario" if DATA else "MBPP"
    lines = [
        f"{data}, {MODEL or 'default model'}, {TRAIN} training problems, first {TEST} test problems, greedy pass@1; "
        f"SEED up to {ITERATIONS} iterations" + (f", with --set {' '.join(SEED_SET)}." if SEED_SET else "."),
        "",
        "| method | training samples | pass@1 | vs direct generation | vs direct fine-tuning | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for label, samples, pass1, seconds in rows:
        wall = f"{seconds / 60:.1f} min" if seconds is not None else "(in SEED's)"
        lines.append(f"| {label} | {samples} | {pass1:.3f} | {gain(pass1, direct)} | {gain(pass1, finetune)} | {wall} |")
    lines += ["", "Paired, task by task on the same test problems (from `seedflow report`):", ""]
    lines += paired_rows(binary, [(label, run_dir) for label, run_dir, _ in arms])
    lines += ["", "SEED's revisions by iteration (`revised`: one passing revision per problem, an own-code edit where one passed):", "",
              "| iteration | errors | revisions (the error code unchanged) | revisions kept | passing copies of the reference | own-edit share of those kept |",
              "|---|---|---|---|---|---|"]
    for loop in seed_run["loops"]:
        for iteration in loop["iterations"]:
            steps = {s["step"]: s["metrics"] for s in iteration["steps"]}
            errors, revisions, revised = steps.get("errors", {}), steps.get("revisions", {}), steps.get("revised", {})
            share, unchanged = revised.get("own-edit-share"), revisions.get("unchanged")
            lines.append(f"| {iteration['number']} | {errors.get('count', 0):.0f} | {revisions.get('count', 0):.0f} "
                         f"({'–' if unchanged is None else f'{unchanged:.0f}'}) | {revised.get('count', 0):.0f} | "
                         f"{revised.get('copies', 0):.0f} | {'–' if share is None else f'{share:.2f}'} |")
    table = "\n".join(lines)
    print(table)
    (OUT / "table.md").write_text(table + "\n")
    print(f"\nreport: {report_dir / 'report.html'}")


def paired_rows(binary, arms):
    """The comparison rows `seedflow report` prints: SEED's base model against SEED's adapter (its
    own report step), and each baseline arm against SEED."""
    seed_dir = dict(arms)["SEED"]
    rows = []
    for label, run_dir in arms:
        dirs = [seed_dir] if label == "SEED" else [run_dir, seed_dir]
        markdown = subprocess.run([binary, "report", *dirs], check=True, capture_output=True, text=True).stdout
        found = [line for line in markdown.splitlines()
                 if line.startswith("| ") and "->" in line and (label == "SEED" or line.startswith("| scores:"))]
        rows += found[:1] if label == "SEED" else [r for r in found if r.startswith("| scores:")]
    header = "| comparison | tasks | pass@1 before | pass@1 after | points | 95% CI | gained | lost | McNemar p |"
    return [header, "|---|---|---|---|---|---|---|---|---|", *rows]


if __name__ == "__main__":
    main()
