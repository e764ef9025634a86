#!/usr/bin/env python3
"""A sampling step of a real run against llama.cpp on the same schedule.

bench/generate.py's anchor keeps every sequence busy to the end; a real step's answers end at
their own lengths, so its last steps decode fewer sequences. This replays the schedule of a step
a run has recorded (its answers' token counts, started in order on `parallel` sequences with
continuous batching, as seedflow's `generate` does), costs each decoding step what
llama-batched-bench's generation step costs at that many sequences (built as bench/generate.py
builds it, prompt PROMPT tokens, ANSWER generated), and prints the time llama.cpp alone would
spend generating on that schedule beside the step's own generation time (`tokens` over its
`tokens-per-second`) and their ratio, and what the tail (steps with sequences idle) costs.

    python3 bench/schedule.py runs/quickstart/<time>/adapt/iteration-1/attempts
    PARALLEL=8 PROMPT=115 ANSWER=200 python3 bench/schedule.py RUN_DIR/STEP
    SEEDFLOW_MODEL=model.gguf python3 bench/schedule.py RUN_DIR/STEP   # a run on another model
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from generate import anchor, batched_bench, seedflow_binary

PARALLEL = int(os.environ.get("PARALLEL", "8"))
PROMPT = int(os.environ.get("PROMPT", "115"))
ANSWER = int(os.environ.get("ANSWER", "200"))


def schedule(lengths, parallel):
    """How many decoding steps run with n live sequences, by n."""
    waiting, live, steps = list(lengths), [], {}
    while waiting or live:
        while len(live) < parallel and waiting:
            live.append(waiting.pop(0))
        steps[len(live)] = steps.get(len(live), 0) + 1
        live = [left - 1 for left in live if left > 1]
    return steps


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    step = Path(sys.argv[1])
    lengths = [json.loads(line)["tokens"] for line in (step / "output.jsonl").read_text().splitlines()]
    metrics = json.loads((step / "meta.json").read_text())["metrics"]
    ours = metrics["tokens"] / metrics["tokens-per-second"]
    # The run's model: the default unless SEEDFLOW_MODEL names another (as in bench/generate.py).
    model = os.environ.get("SEEDFLOW_MODEL") or subprocess.run([seedflow_binary(), "fetch", "model"], check=True, capture_output=True, text=True).stdout.strip()
    # llama-batched-bench's generated tokens/s over n sequences, as seconds a step.
    speeds = anchor(batched_bench(), model, PROMPT, ANSWER, list(range(1, PARALLEL + 1)))
    seconds = {n: n / speed for n, speed in speeds.items()}
    steps = schedule(lengths, PARALLEL)
    theirs = sum(count * seconds[n] for n, count in steps.items())
    busy = sum(lengths) / PARALLEL * seconds[PARALLEL]
    print("llama-batched-bench, ms a generation step by sequences:", {n: round(s * 1000, 1) for n, s in seconds.items()})
    print(f"{len(lengths)} answers, {sum(lengths)} tokens, {sum(steps.values())} steps over {PARALLEL} sequences "
          f"({sum(n * c for n, c in steps.items()) / sum(steps.values()):.2f} live a step)")
    print(f"llama.cpp on this schedule: {theirs:.1f} s (every sequence busy: {busy:.1f} s, the tail {theirs / busy - 1:+.1%})")
    print(f"seedflow's step generating: {ours:.1f} s; ratio (speed) {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
