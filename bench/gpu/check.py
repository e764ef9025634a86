#!/usr/bin/env python3
"""The GPU check, run on the GPU machine from a bundle made by bench/gpu/bundle.sh:

1. the same greedy generation on the CPU (`gpu-layers=0`) and offloaded (`gpu-layers=-1`) with a
   small random-weight model: the answers should agree token for token until a near-tie between
   two random logits falls the other way under the GPU's rounding, and the mean
   log-probabilities of identical answers to rounding. (Seeded samples are not compared: a
   random model's top candidates are so close that rounding reorders them, and with them which
   token a draw lands on.)
2. bench/generate.py with every layer offloaded, on a model of the default model's shapes and
   quantisation (zero weights), against llama-batched-bench linked to the same llama.cpp
   libraries. Its second table tells where a gap lies: each decoding step of seedflow split
   into waiting for llama.cpp and seedflow's own work, beside the anchor's step.

nvidia-smi is polled meanwhile: the seedflow processes it lists show that the GPU was used.

    python3 bench/gpu/check.py BUNDLE_DIR
"""
import json
import lzma
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cuda_libraries():
    """The folder holding CUDA 13's cuBLAS: the toolkit's or a Python package's."""
    for pattern in ("/usr/local/cuda*/lib64", "/usr/local/cuda*/targets/x86_64-linux/lib", "/opt/**/nvidia/cu13/lib", "/usr/lib/x86_64-linux-gnu"):
        for folder in sorted(Path("/").glob(pattern.lstrip("/"))):
            if (folder / "libcublas.so.13").exists():
                return folder
    sys.exit("no libcublas.so.13 on this machine")


def unpack(bundle, work):
    subprocess.run(["tar", "-xJf", bundle / "programs.tar.xz", "-C", work], check=True)
    models = {}
    for name in ("tiny", "hollow"):
        models[name] = work / f"{name}.gguf"
        with lzma.open(bundle / f"{name}.gguf.xz") as source, open(models[name], "wb") as target:
            shutil.copyfileobj(source, target)
    return models


def workflow(model, gpu_layers):
    tasks = ROOT / "examples" / "data" / "mbpp" / "test.jsonl"
    return "\n".join([
        'workflow "gpu-check" seed=7',
        f'model "m" path="{model}" context=2048 gpu-layers={gpu_layers}',
        f'dataset "mbpp" format="mbpp" path="{tasks}" limit=8',
        'generate "greedy" model="m" tasks="mbpp" samples=1 temperature=0 max-tokens=128 stop-after-code=#false',
    ]) + "\n"


def run(seedflow, model, gpu_layers, work):
    folder = work / f"gpu-layers{gpu_layers}"
    folder.mkdir()
    (folder / "check.kdl").write_text(workflow(model, gpu_layers))
    done = subprocess.run([seedflow, "run", folder / "check.kdl", "--run-dir", folder / "run", "--ci"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"seedflow failed with gpu-layers={gpu_layers}:\n{done.stdout}{done.stderr}")
    meta = json.loads((folder / "run" / "greedy" / "meta.json").read_text())
    samples = [json.loads(line) for line in (folder / "run" / "greedy" / "output.jsonl").read_text().splitlines()]
    return meta["metrics"]["tokens-per-second"], samples


def compare(cpu, gpu):
    (cpu_speed, cpu_samples), (gpu_speed, gpu_samples) = cpu, gpu
    same = [a["answer"] == b["answer"] for a, b in zip(cpu_samples, gpu_samples)]
    drift = max((abs(a["logprob"] - b["logprob"]) for a, b, s in zip(cpu_samples, gpu_samples, same) if s), default=float("nan"))
    print(f"greedy: {sum(same)}/{len(same)} answers identical on CPU and GPU, largest mean log-probability difference "
          f"among them {drift:.2e}; {cpu_speed:.0f} tokens/s on the CPU, {gpu_speed:.0f} on the GPU")
    for a, b, s in zip(cpu_samples, gpu_samples, same):
        if not s:
            shared = len(os.path.commonprefix([a["answer"], b["answer"]]))
            print(f"  task {a['task_id']}: the answers part after {shared} of {len(a['answer'])} characters")


def watch_gpu(stop, seen):
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=process_name,used_memory", "--format=csv,noheader"], capture_output=True, text=True).stdout
        seen.update(line.strip() for line in out.splitlines() if line.strip())
        stop.wait(0.5)


def main():
    bundle = Path(sys.argv[1]).resolve()
    work = Path("/tmp/seedflow-gpu-check")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    # The bundle's llama.cpp, CUDA's libraries, the driver's (where a container mounts it).
    os.environ["LD_LIBRARY_PATH"] = f"{work / 'lib'}:{cuda_libraries()}:/usr/local/nvidia/lib64:{os.environ.get('LD_LIBRARY_PATH', '')}"
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(), flush=True)
    models = unpack(bundle, work)
    seedflow = work / "seedflow"
    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=watch_gpu, args=(stop, seen))
    watcher.start()
    try:
        compare(run(seedflow, models["tiny"], 0, work), run(seedflow, models["tiny"], -1, work))
        print("processes on the GPU during the comparison:", sorted(seen) or "none", flush=True)
        bench = {**os.environ, "SEEDFLOW_BIN": str(seedflow), "SEEDFLOW_MODEL": str(models["hollow"]), "GPU_LAYERS": "-1",
                 "LLAMA_BATCHED_BENCH": str(work / "llama-batched-bench"), "PARALLEL": os.environ.get("PARALLEL", "1,4,8,16,32")}
        subprocess.run([sys.executable, ROOT / "bench" / "generate.py"], check=True, env=bench)
    finally:
        stop.set()
        watcher.join()


if __name__ == "__main__":
    main()
