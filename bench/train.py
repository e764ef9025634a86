#!/usr/bin/env python3
"""LoRA training speed and peak memory of seedflow's `finetune-lora` on the default model,
against PyTorch + PEFT on the same CPU, the same model file, the same data, in the same run.

Both train rank-8 LoRA (alpha 16) on q/k/v/o/gate/up/down with AdamW, batch 1, on sequences of
512 tokens: an MBPP requirement as the chat prompt, and as the answer several MBPP reference
solutions in a row, cut at 512 tokens. PyTorch loads the same GGUF file through transformers
(dequantized to f32, as seedflow does) and trains with PEFT in a throw-away virtualenv. The
figure compared is sequence tokens per second over the steps after the first (warm-up), and the
process's peak resident memory.

    python3 bench/train.py
    SEEDFLOW_BIN=path/to/seedflow STEPS=8 python3 bench/train.py
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from generate import CACHE, ROOT, THREADS, seedflow_binary

STEPS = int(os.environ.get("STEPS", "8"))
LENGTH = 512
MODEL = CACHE / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

WORKFLOW = f"""
model "coder" path="{MODEL}"
dataset "data" format="jsonl" path="data.jsonl"
finetune-lora "tune" model="coder" data="data" rank=8 alpha=16 epochs=1 batch=1 \\
    learning-rate=0.0002 warmup=0 max-length={LENGTH}
"""

# PyTorch + PEFT, run inside the virtualenv: prints one JSON line.
TORCH = r"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model
model_dir, model_file, data_file, length, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
template = open(sys.argv[6]).read()  # seedflow's MBPP prompt, so both see the same text
torch.set_num_threads(threads)
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, config)
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
times, tokens = [], []
for line in open(data_file):
    task = json.loads(line)
    message = template.replace("{{requirement}}", task["prompt"].strip()).replace("{{tests}}", "\n".join(task["tests"]))
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer("```python\n" + task["solution"] + "\n```", add_special_tokens=False)["input_ids"]
    ids = (prompt + answer)[:length]
    labels = [-100] * len(prompt) + ids[len(prompt):]
    start = time.perf_counter()
    loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels[:len(ids)]])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
    tokens.append(len(ids))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": times, "tokens": tokens, "peak": peak}))
"""


def virtualenv():
    venv = CACHE / "bench" / "torch-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "torch", "transformers", "peft", "gguf", "safetensors", "sentencepiece"], check=True)
    return python


def write_data(work):
    tasks = [json.loads(l) for l in (ROOT / "examples/data/mbpp/train.jsonl").read_text().splitlines()]
    with open(work / "data.jsonl", "w") as out:
        for i in range(STEPS):
            # Enough code that every sequence is cut at LENGTH tokens.
            code = "\n\n".join(t["code"] for t in tasks[i * 6:(i + 1) * 6])
            out.write(json.dumps({"task_id": i, "prompt": tasks[i]["text"], "solution": code, "tests": ["assert True"]}) + "\n")


def run_child(command, **kwargs):
    """Runs a command; returns its stdout and its peak resident memory in bytes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **kwargs)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"{command[0]} failed")
    return out, usage.ru_maxrss * 1024


def per_second(seconds_per_step, tokens):
    # The first step warms up (allocations, lazy initialisation); it is left out on both sides.
    return sum(tokens[1:]) / sum(seconds_per_step[1:])


def main():
    if not MODEL.exists():
        subprocess.run([seedflow_binary(), "fetch", "model"], check=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_data(work)
        (work / "train.kdl").write_text(WORKFLOW)
        _, ours_peak = run_child([seedflow_binary(), "run", work / "train.kdl", "--run-dir", work / "run"], cwd=work)
        records = [json.loads(l) for l in (work / "run" / "tune" / "output.jsonl").read_text().splitlines()]
        elapsed = [r["seconds"] for r in records]
        ours_seconds = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:])]
        # Every sequence is LENGTH tokens long: the prompt plus `tokens` completion tokens.
        ours_tokens = [LENGTH] * len(records)
        ours = per_second(ours_seconds, ours_tokens)
        out, theirs_peak = run_child([virtualenv(), "-c", TORCH, MODEL.parent, MODEL.name, work / "data.jsonl", str(LENGTH), str(THREADS), ROOT / "stdlib/prompts/mbpp.txt"])
        torch_run = json.loads(out.strip().splitlines()[-1])
        theirs = per_second(torch_run["seconds"], torch_run["tokens"])
    print(f"LoRA training, default model, rank 8, sequence {LENGTH}, {STEPS} steps, {THREADS} threads")
    print(f"{'':<16}{'tokens/s':>10}{'s/step':>9}{'peak RSS':>12}")
    print(f"{'seedflow':<16}{ours:>10.1f}{LENGTH / ours:>9.2f}{ours_peak / 2**30:>10.2f} GiB")
    print(f"{'PyTorch + PEFT':<16}{theirs:>10.1f}{LENGTH / theirs:>9.2f}{theirs_peak / 2**30:>10.2f} GiB")
    print(f"ratio: speed {ours / theirs:.2f}x (target >= 1.0), peak memory {ours_peak / theirs_peak:.2f}x (target <= 1.0)")


if __name__ == "__main__":
    main()
