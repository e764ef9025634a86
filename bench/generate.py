#!/usr/bin/env python3
"""Aggregate generation speed of seedflow's `generate` at 1, 4 and 8 parallel sequences, against
llama.cpp's own `llama-batched-bench` on the same model, CPU flags and sizes, in the same run.

llama-batched-bench is built from the llama.cpp tree seedflow itself is built from (the one
vendored in the `llama-cpp-sys-2` crate that Cargo.lock pins), with the same CMake options its
build script uses and the C/C++ flags `.cargo/config.toml` gives it (for this CPU). That tree
leaves out the tools' sources, so batched-bench's own two files come from the `llama-cpp-python`
source package, which vendors a whole llama.cpp. Both decode a shared prompt and then `NTG` tokens
per sequence.

The figure compared is generated tokens per second over all sequences, prompt decoding left out:
llama-batched-bench's `S_TG`, and the `tokens-per-second` metric of seedflow's step (which, unlike
the anchor, also samples each token and computes its log-probability). The whole step's speed,
context creation and prompt decoding included, is printed beside it. Each token of a sequence
takes one decoding step of all of them; a second table splits seedflow's step, by its
`decode-share` metric, into waiting for llama.cpp's decoding and its own work around it, beside
the anchor's step: whether a gap lies in how llama.cpp is run or in the work between decodes.

A last line measures the workload SEED gives `generate`: its error collection's shape (MBPP
training tasks, 5 samples each, the most sequences, answers of their own lengths, stopped once
their code block closes), against llama-batched-bench at the most sequences with the workload's
mean prompt and mean answer lengths (its contexts are longer than the first anchor's, which costs
speed in both): how close scheduling many tasks of unequal answers comes to every sequence busy
all the time.

    python3 bench/generate.py
    SEEDFLOW_BIN=path/to/seedflow ROUNDS=5 python3 bench/generate.py

On a GPU (bench/gpu/check.py runs it so): GPU_LAYERS=-1 offloads every layer in both programs,
SEEDFLOW_MODEL replaces the default model, LLAMA_BATCHED_BENCH names an anchor built elsewhere,
PARALLEL the sequence counts ("1,4,8" unless set), THREADS the CPU threads of both programs
(every core unless set).
"""
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SEEDFLOW_CACHE", Path.home() / ".cache" / "seedflow"))
NTG = 128
PARALLEL = [int(n) for n in os.environ.get("PARALLEL", "1,4,8").split(",")]
GPU_LAYERS = int(os.environ.get("GPU_LAYERS", "0"))
THREADS = int(os.environ.get("THREADS", min(os.cpu_count() or 1, 512)))  # seedflow takes at most 512
ROUNDS = int(os.environ.get("ROUNDS", "3"))
MBPP = ROOT / "examples" / "data" / "mbpp" / "train.jsonl"
WORKLOAD_TASKS = int(os.environ.get("WORKLOAD_TASKS", "8"))
WORKLOAD_SAMPLES = 5  # per task, as in SEED's error collection


def seedflow_binary():
    if "SEEDFLOW_BIN" in os.environ:
        return Path(os.environ["SEEDFLOW_BIN"]).resolve()
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache" / "seedflow-target"))
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, env={**os.environ, "CARGO_TARGET_DIR": str(target)})
    return target / "release" / "seedflow"


def llama_cpp_tree():
    """The llama.cpp source seedflow is built with, and the version of the crate that vendors it."""
    meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--locked"], cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    crate = next(p for p in meta["packages"] if p["name"] == "llama-cpp-sys-2")
    return Path(crate["manifest_path"]).parent / "llama.cpp", crate["version"]


def llama_cpp_flags():
    """The C and C++ flags seedflow's llama.cpp is compiled with: .cargo/config.toml's, unless the
    environment sets them (as Cargo does)."""
    name = "CXXFLAGS_x86_64_unknown_linux_gnu"
    config = tomllib.loads((ROOT / ".cargo" / "config.toml").read_text()).get("env", {})
    return os.environ.get(name, config.get(name, ""))


def batched_bench(shared=False):
    """llama-batched-bench, linked statically, or against llama.cpp's shared libraries when
    `shared` (bench/gpu/bundle.sh runs it on seedflow's CUDA build of them)."""
    if not shared and "LLAMA_BATCHED_BENCH" in os.environ:
        return Path(os.environ["LLAMA_BATCHED_BENCH"]).resolve()
    tree, version = llama_cpp_tree()
    work = CACHE / "bench" / f"llama.cpp-sys-2-{version}"
    flags = llama_cpp_flags()
    key = "portable"
    if flags:
        # A build for one kind of CPU is kept apart from the others (as seedflow's llama-server is).
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        key = hashlib.sha256(f"{flags}\n{cpu}".encode()).hexdigest()[:12]
    build = work / (("build-shared-" if shared else "build-") + key)
    binary = build / "bin" / "llama-batched-bench"
    if binary.exists():
        return binary
    tool = work / "tools" / "batched-bench"
    if not (tool / "batched-bench.cpp").exists():
        downloads = CACHE / "bench"
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run(["python3", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", downloads, "llama-cpp-python==0.3.36"], check=True)
        archive = next(downloads.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(downloads, filter="data")
        sources = next(downloads.glob("llama_cpp_python-*/vendor/llama.cpp/tools/batched-bench"))
        shutil.copytree(tree, work, dirs_exist_ok=True)
        for source in ("CMakeLists.txt", "batched-bench.cpp", "main.cpp"):
            shutil.copy(sources / source, tool / source)
        (work / "tools" / "CMakeLists.txt").write_text("llama_add_compile_flags()\nadd_subdirectory(batched-bench)\n")
    # What llama-cpp-sys-2's build script sets for a CPU build without target-cpu=native, with the
    # C and C++ flags seedflow's build gives it.
    options = [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}", "-DCMAKE_BUILD_TYPE=Release", f"-DBUILD_SHARED_LIBS={'ON' if shared else 'OFF'}", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON"]
    subprocess.run(["cmake", "-S", work, "-B", build, *options], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-batched-bench", "-j", str(THREADS)], check=True, capture_output=True)
    return binary


def anchor(binary, model, prompt_tokens, generated=NTG, parallel=PARALLEL):
    """llama-batched-bench's generation speed by sequence count: a shared prompt of
    `prompt_tokens`, then `generated` tokens per sequence."""
    out = subprocess.run(
        [binary, "-m", model, "-ngl", str(GPU_LAYERS if GPU_LAYERS >= 0 else 999), "-c", str(max(4096, (prompt_tokens + generated + 1) * max(parallel))), "-b", "512", "-ub", "512",
         "-t", str(THREADS), "-pps", "-npp", str(prompt_tokens), "-ntg", str(generated), "-npl", ",".join(map(str, parallel))],
        check=True, capture_output=True, text=True,
    ).stdout
    speeds = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
            speeds[int(cells[2])] = float(cells[7])
    return speeds


def ours(binary, model, work):
    """One run of seedflow's steps: per sequence count, the whole step's and generation's speed
    and the share of generation spent decoding; the prompt's length in tokens; the workload's mean
    prompt and answer lengths."""
    task = {"task_id": "bench", "prompt": "Write a Python function that returns the nth Fibonacci number, with a docstring, type hints and comments explaining each step.", "tests": ["assert True"]}
    (work / "task.jsonl").write_text(json.dumps(task) + "\n")
    flow = ['workflow "bench-generate" seed=1', f'model "coder" path="{model}" context=4096 gpu-layers={GPU_LAYERS} threads={THREADS} parallel={max(PARALLEL)}', 'dataset "task" format="jsonl" path="task.jsonl"',
            'generate "warm-up" model="coder" tasks="task" samples=1 max-tokens=8']
    for n in PARALLEL:
        flow.append(f'generate "n{n}" model="coder" tasks="task" samples={n} temperature=0.8 max-tokens={NTG} stop-after-code=#false')
    # SEED's error collection: several tasks, several samples each, answers of their own lengths.
    flow.append(f'dataset "mbpp" format="mbpp" path="{MBPP}" limit={WORKLOAD_TASKS}')
    flow.append(f'generate "workload" model="coder" tasks="mbpp" samples={WORKLOAD_SAMPLES} temperature=0.8')
    (work / "bench.kdl").write_text("\n".join(flow) + "\n")
    shutil.rmtree(work / "run", ignore_errors=True)
    done = subprocess.run([binary, "run", work / "bench.kdl", "--run-dir", work / "run", "--ci"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seedflow failed:\n{done.stdout}{done.stderr}")
    whole, generation, share = {}, {}, {}
    for n in PARALLEL:
        meta = json.loads((work / "run" / f"n{n}" / "meta.json").read_text())
        whole[n] = meta["metrics"]["tokens"] / meta["seconds"]
        generation[n] = meta["metrics"]["tokens-per-second"]
        share[n] = meta["metrics"]["decode-share"]
    workload = json.loads((work / "run" / "workload" / "meta.json").read_text())["metrics"]
    generation["workload"] = workload["tokens-per-second"]
    tasks = workload["count"] / WORKLOAD_SAMPLES  # the MBPP file may hold fewer than WORKLOAD_TASKS
    # `prompt-tokens` counts the tokens decoded: a prompt's opening shared with the one before it
    # is kept, not decoded, so the anchor's prompt is ~20 tokens shorter than the real ones (its
    # contexts a little shorter, which if anything favours the anchor).
    shape = (round(workload["prompt-tokens"] / tasks), max(1, round(workload["tokens"] / workload["count"])))
    prompt = json.loads((work / "run" / "warm-up" / "meta.json").read_text())["metrics"]["prompt-tokens"]
    return whole, generation, share, int(prompt), shape


def main():
    binary = seedflow_binary()
    model = os.environ.get("SEEDFLOW_MODEL") or subprocess.run([binary, "fetch", "model"], check=True, capture_output=True, text=True).stdout.strip()
    anchor_binary = batched_bench()
    # Alternating rounds, medians reported: speeds on a shared machine drift from run to run.
    rounds = {"whole": [], "generation": [], "share": [], "anchor": []}
    most, one = max(PARALLEL), min(PARALLEL)
    with tempfile.TemporaryDirectory() as work:
        for _ in range(ROUNDS):
            whole, generation, share, prompt_tokens, (workload_prompt, workload_answer) = ours(binary, model, Path(work))
            rounds["whole"].append(whole)
            rounds["generation"].append(generation)
            rounds["share"].append(share)
            speeds = anchor(anchor_binary, model, prompt_tokens)
            speeds["workload"] = anchor(anchor_binary, model, workload_prompt, workload_answer, [most]).get(most, float("nan"))
            rounds["anchor"].append(speeds)
    at = lambda key, n: [r.get(n, float("nan")) for r in rounds[key]]
    whole = {n: median(at("whole", n)) for n in PARALLEL}
    generation = {n: median(at("generation", n)) for n in PARALLEL}
    theirs = {n: median(at("anchor", n)) for n in PARALLEL}
    share = {n: median(at("share", n)) for n in PARALLEL}
    print(f"{Path(model).name}, gpu-layers {GPU_LAYERS}")
    print(f"generated tokens per second, {THREADS} threads, a {prompt_tokens}-token prompt, {NTG} tokens per sequence, median of {ROUNDS} rounds")
    print(f"{'sequences':>9} {'seedflow step':>13} {'seedflow generation':>19} {'llama-batched-bench':>19} {'ratio':>6}")
    for n in PARALLEL:
        print(f"{n:>9} {whole[n]:>13.1f} {generation[n]:>19.1f} {theirs[n]:>19.1f} {generation[n] / theirs[n]:>6.2f}")
        print(f"{'':>9} {'rounds: ' + ', '.join(f'{g:.1f}' for g in at('generation', n)):>33} {', '.join(f'{a:.1f}' for a in at('anchor', n)):>19}")
    print("ratio = seedflow generation / llama-batched-bench; whole step / anchor: "
          + ", ".join(f"{n}: {whole[n] / theirs[n]:.2f}" for n in PARALLEL))
    print("\none decoding step (a token of every sequence), ms")
    print(f"{'sequences':>9} {'seedflow':>9} {'decoding':>9} {'own work':>9} {'llama-batched-bench':>19}")
    for n in PARALLEL:
        step, theirs_step = 1000 * n / generation[n], 1000 * n / theirs[n]
        print(f"{n:>9} {step:>9.2f} {share[n] * step:>9.2f} {(1 - share[n]) * step:>9.2f} {theirs_step:>19.2f}")
    print("seedflow = decoding (waiting for llama.cpp) + own work (sampling, log-probabilities, stop checks); medians\n")
    workload, workload_anchor = median(at("generation", "workload")), median(at("anchor", "workload"))
    print(f"SEED's error collection ({WORKLOAD_TASKS} MBPP tasks, {WORKLOAD_SAMPLES} samples each, {most} sequences, answers stopped after their code; "
          f"mean prompt {workload_prompt} tokens, mean answer {workload_answer}): {workload:.1f} tokens/s, llama-batched-bench at "
          f"{most} sequences of that prompt and answer {workload_anchor:.1f}, ratio {workload / workload_anchor:.2f}; "
          f"{workload / theirs[most]:.2f} of the table's anchor "
          f"(rounds: {', '.join(f'{g:.1f}' for g in at('generation', 'workload'))} against {', '.join(f'{a:.1f}' for a in at('anchor', 'workload'))})")
    print(f"{most} sequences / {one}: seedflow {generation[most] / generation[one]:.2f}x (whole step {whole[most] / whole[one]:.2f}x), "
          f"llama-batched-bench {theirs[most] / theirs[one]:.2f}x")


if __name__ == "__main__":
    main()
