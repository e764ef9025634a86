#!/usr/bin/env python3
"""The quickstart as users run it, step by step, against llama.cpp's own server and PyTorch + PEFT,
on the same machine in the same run.

The component benchmarks (generate.py, train.py) measure shapes SEED does not produce: one shared
prompt, equal answer lengths, 512-token training sequences. This one runs workflows/quickstart.kdl
itself (seed 42, its prompts, its answers' own lengths, its training examples):

1. in-process: llama.cpp linked into seedflow, the way the README's first command runs it;
2. the anchor for the steps that sample: the same workflow with `--set coder.server=spawn`, so
   every `generate` and `revise` runs on llama-server (built by `seedflow fetch llama-server`),
   which seedflow starts with as many slots as the model's `parallel`, the same threads and
   llama.cpp's built-in chat template, and restarts with each adapter (its start is inside the
   step's time; a second or two). `base`, `attempts` and `final` get the same prompts both ways;
   `revisions` gets each run's own errors, so its prompts differ in detail though not in kind;
3. the anchor for `tune`: PyTorch + PEFT (throw-away virtualenv, as bench/train.py) on exactly the
   pairs the in-process `tune` trained on (its `training-pairs.jsonl`), rendered through the same
   prompt template and ChatML turns, with the same rank, alpha, targets, optimizer, batch and epochs,
   in f32 (`TORCH_PRECISION=bf16`: its forward pass under `torch.autocast` to bfloat16, which runs
   on AMX through oneDNN where the CPU has it: the anchor for seedflow's `precision="bf16"`).

For a sampling step the figure is its wall time and tokens (prompt tokens decoded, answer tokens
generated) and answer tokens per second of the whole step; ratio = seedflow's speed / the anchor's
(above 1: seedflow faster). For `tune`: sequence tokens (prompt + answer) per second over the
whole training, first step included on both sides, and the peak resident memory (seedflow's on a
copy of the run resumed without `tune`, so that llama.cpp's memory is not in it: `tune` and then
`final`; PyTorch's process). The table's last line sums the steps' seconds.

    SEEDFLOW_BIN=target/debug/seedflow python3 bench/workflow.py
    KEEP=runs/bench python3 bench/workflow.py     # keeps both run directories there
    KEEP=runs/bench ONLY=tune python3 bench/workflow.py   # the training alone, on a kept run's pairs

About 30 minutes on 2 cores (two quickstarts, a retraining and a PyTorch training).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from generate import ROOT, THREADS, seedflow_binary
from train import run_child, virtualenv

WORKFLOW = ROOT / "workflows" / "quickstart.kdl"
SAMPLING = ["adapt/iteration-1/attempts", "adapt/iteration-1/revisions", "base", "final"]
TUNE = "adapt/iteration-1/tune"

# PyTorch + PEFT on seedflow's training pairs; prints one JSON line.
TORCH = r"""
import contextlib, json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
model_dir, model_file, pairs_file, meta_file, prompts_dir, threads, precision = sys.argv[1:8]
precision_context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
params = json.load(open(meta_file))["params"]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
modules = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
config = LoraConfig(r=params["rank"], lora_alpha=params["alpha"], lora_dropout=params["dropout"], task_type="CAUSAL_LM",
                    target_modules=[modules[t] for t in params["targets"]])
model = get_peft_model(model, config)
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params["learning-rate"], weight_decay=0.0)
examples = []
for line in open(pairs_file):
    pair = json.loads(line)
    task = pair["task"]
    template = open(f"{prompts_dir}/{task.get('style', 'requirement')}.txt").read()
    message = (template.replace("{{requirement}}", task["prompt"].strip()).replace("{{tests}}", "\n".join(task["tests"]))
               .replace("{{prompt}}", task["prompt"]))
    # llama.cpp's built-in ChatML, as seedflow renders a training sequence.
    prompt = tokenizer(f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("```python\n" + pair["code"].rstrip() + "\n```<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = (prompt + answer)[:params["max-length"]]
    examples.append((ids, [-100] * len(prompt) + ids[len(prompt):]))
generator = torch.Generator().manual_seed(0)
times, tokens = [], []
for epoch in range(params["epochs"]):
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), params["batch"]):
        batch = [examples[i] for i in order[start:start + params["batch"]]]
        began = time.perf_counter()
        for ids, labels in batch:  # one graph per example, gradients summed, as seedflow does
            with precision_context():
                loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss / len(batch)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
        tokens.append(sum(len(ids) for ids, _ in batch))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": times, "tokens": tokens, "peak": peak}))
"""


def run_quickstart(binary, run_dir, *extra):
    """Runs the quickstart into `run_dir`; returns the peak resident memory of seedflow's process."""
    _, peak = run_child([binary, "run", WORKFLOW, "--run-dir", run_dir, "--ci", *extra], cwd=ROOT)
    return peak


def meta(run_dir, step):
    return json.loads((run_dir / step / "meta.json").read_text())


def sampling_line(step, ours, theirs):
    def figures(m):
        metrics = m["metrics"]
        return m["seconds"], int(metrics.get("prompt-tokens", 0)), int(metrics["tokens"])

    (s1, p1, t1), (s2, p2, t2) = figures(ours), figures(theirs)
    ratio = (t1 / s1) / (t2 / s2)
    name = step.rsplit("/", 1)[-1]
    # A server reports a request's prompt tokens at the stream's end, which an answer stopped
    # after its code block never reaches.
    p2 = p2 or "-"
    return (f"{name:<11}{s1:>8.1f}{p1:>8}{t1:>8}{t1 / s1:>8.1f}  |{s2:>8.1f}{p2:>8}{t2:>8}{t2 / s2:>8.1f}  |{ratio:>6.2f}"
            f"{ours['metrics'].get('decode-share', 0):>8.2f}")


def main():
    binary = seedflow_binary()
    model = Path(subprocess.run([binary, "fetch", "model"], check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([binary, "fetch", "llama-server"], check=True, capture_output=True)
    keep = os.environ.get("KEEP")
    # ONLY=tune: seedflow's training against PyTorch's alone (about four minutes), on the pairs of
    # the in-process run kept in KEEP (run first if there is none).
    only = os.environ.get("ONLY")
    if only not in (None, "tune"):
        sys.exit(f"ONLY={only}: the one part that runs alone is `tune`")
    tune_only = only == "tune"
    torch_precision = os.environ.get("TORCH_PRECISION", "f32")
    if torch_precision not in ("f32", "bf16"):
        sys.exit(f"TORCH_PRECISION={torch_precision}: f32 or bf16")
    work = Path(keep).resolve() if keep else Path(tempfile.mkdtemp())
    try:
        local, served = work / "in-process", work / "llama-server"
        reuse = tune_only and (local / TUNE / "training-pairs.jsonl").exists()
        for run_dir in ([] if reuse else [local, served]) + [work / "tune-only"]:
            shutil.rmtree(run_dir, ignore_errors=True)
        if not reuse:
            run_quickstart(binary, local)
        if not tune_only:
            run_quickstart(binary, served, "--set", "coder.server=spawn")
        # The training again, for its memory apart from llama.cpp's: a copy of the run without its
        # `tune` resumes with it (and `final`, whose adapter is new; it needs less memory).
        retrained = work / "tune-only"
        shutil.copytree(local, retrained)
        shutil.rmtree(retrained / TUNE)
        ours_peak = run_quickstart(binary, retrained, "--resume")
        tune = meta(retrained, TUNE)
        quiet = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        out, theirs_peak = run_child([virtualenv(), "-c", TORCH, model.parent, model.name, local / TUNE / "training-pairs.jsonl",
                                      local / TUNE / "meta.json", ROOT / "stdlib" / "prompts", str(THREADS), torch_precision],
                                     env=quiet)
        torch_run = json.loads(out.strip().splitlines()[-1])
        records = [json.loads(l) for l in (retrained / TUNE / "output.jsonl").read_text().splitlines()]
        if not tune_only:
            rows = [sampling_line(step, meta(local, step), meta(served, step)) for step in SAMPLING]
            total = {d: sum(meta(d, s)["seconds"] for s in SAMPLING + [TUNE]) for d in (local, served)}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"The quickstart ({WORKFLOW.relative_to(ROOT)}, seed 42), {model.name}, {THREADS} threads, one run of each")
    if not tune_only:
        print(f"{'':<11}{'seedflow in-process':^32}  |{'llama-server (spawn)':^32}  |")
        print(f"{'step':<11}{'s':>8}{'prompt':>8}{'tokens':>8}{'tok/s':>8}  |{'s':>8}{'prompt':>8}{'tokens':>8}{'tok/s':>8}  |"
              f"{'ratio':>6}{'decode':>8}")
        for row in rows:
            print(row)
    # The same examples, epochs and batch both ways (in another order): whole trainings compared,
    # first step included on both sides; tokens as PyTorch's tokenizer counts the sequences.
    ours_seconds, theirs_seconds = records[-1]["seconds"], sum(torch_run["seconds"])
    sequence_tokens = sum(torch_run["tokens"])
    print(f"tune: {len(records)} optimizer steps ({len(torch_run['seconds'])} in PyTorch), {tune['metrics']['examples']:.0f} "
          f"examples, {sequence_tokens} sequence tokens in all")
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    print(f"  seedflow        {ours_seconds:>7.1f} s {sequence_tokens / ours_seconds:>7.1f} tokens/s  peak {ours_peak / 2**30:.2f} GiB "
          f"(the resumed run: tune, then final; precision=\"{tune['params'].get('precision', 'f32')}\", "
          f"{'AMX' if amx else 'no AMX'})")
    print(f"  PyTorch + PEFT  {theirs_seconds:>7.1f} s {sequence_tokens / theirs_seconds:>7.1f} tokens/s  peak {theirs_peak / 2**30:.2f} GiB "
          f"({torch_precision})")
    print(f"  ratio: speed {theirs_seconds / ours_seconds:.2f}x (target >= 1.5), peak memory {ours_peak / theirs_peak:.2f}x (target <= 0.7)")
    if not tune_only:
        print(f"all steps: {total[local]:.0f} s in-process, {total[served]:.0f} s through llama-server "
              f"(sampling steps and tune; training local in both)")


if __name__ == "__main__":
    sys.exit(main())
