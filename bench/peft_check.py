#!/usr/bin/env python3
"""Checks that the PEFT directory `finetune-lora` writes loads into PEFT: seedflow trains a small
adapter on the default model, then PyTorch + PEFT (in the throw-away virtualenv bench/train.py
uses) loads the same GGUF model and the adapter, and the script checks that every LoRA matrix
was loaded with the values seedflow wrote and that the adapter changes the model's output.

    python3 bench/peft_check.py
    SEEDFLOW_BIN=path/to/seedflow python3 bench/peft_check.py
"""
import json
import subprocess
import tempfile
from pathlib import Path

from train import MODEL, seedflow_binary, virtualenv

WORKFLOW = f"""
model "coder" path="{MODEL}"
dataset "data" format="jsonl" path="data.jsonl"
finetune-lora "tune" model="coder" data="data" rank=8 alpha=16 epochs=2 learning-rate=0.001
"""

CHECK = r"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
model_dir, model_file, adapter = sys.argv[1], sys.argv[2], sys.argv[3]
base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
ids = torch.tensor([[151644, 872, 198, 7985, 264, 729, 13, 151645, 198, 151644, 77091, 198]])
with torch.no_grad():
    before = base(ids).logits
model = PeftModel.from_pretrained(base, adapter)
written = load_file(f"{adapter}/adapter_model.safetensors")
loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
for name, tensor in written.items():
    key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
    assert key in loaded, f"PEFT did not load {name}"
    assert torch.equal(loaded[key], tensor), f"{name} differs after loading"
assert len(loaded) == len(written), f"{len(loaded)} LoRA matrices in the model, {len(written)} written"
with torch.no_grad():
    after = model(ids).logits
change = (after - before).abs().max().item()
assert change > 1e-3, f"the adapter changes the logits by only {change}"
print(f"PEFT loaded {len(written)} LoRA matrices; the adapter changes the logits by up to {change:.3f}")
"""


def main():
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tasks = [{"task_id": i, "prompt": f"Write a function that returns {i}.", "solution": f"def f():\n    return {i}", "tests": [f"assert f() == {i}"]} for i in range(3)]
        (work / "data.jsonl").write_text("\n".join(json.dumps(t) for t in tasks))
        (work / "check.kdl").write_text(WORKFLOW)
        subprocess.run([seedflow_binary(), "run", work / "check.kdl", "--run-dir", work / "run"], cwd=work, check=True)
        subprocess.run([virtualenv(), "-c", CHECK, MODEL.parent, MODEL.name, work / "run" / "tune" / "peft"], check=True)


if __name__ == "__main__":
    main()
