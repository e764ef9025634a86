#!/usr/bin/env python3
"""Two stand-ins for the default model, small enough to travel to a GPU machine with no network
(the real one is 400 MB), both with its tokenizer and chat template so prompts are the same:

- `hollow.gguf`: the default model's architecture, sizes and quantisation types tensor for tensor,
  so llama.cpp runs the same kernels on the same shapes; all weights are zero except the first
  rows of the token embedding and the output projection. Zeros compress to nothing, and the speed
  of a forward pass does not depend on the values. For speed only.
- `tiny.gguf`: a small model (64 wide, two layers) with random weights throughout, for comparing
  the GPU's output with the CPU's: every operation of the forward pass changes the result.

    python3 bench/gpu/models.py OUT_DIR      # needs numpy and gguf (pip install numpy gguf)
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

ROOT = Path(__file__).resolve().parents[2]
RANDOM_ROWS = 4096


def default_model():
    fetch = ["cargo", "run", "--quiet", "--", "fetch", "model"]
    return Path(subprocess.run(fetch, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip())


def copy_metadata(reader, writer, overrides):
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = overrides.get(name, field.contents())
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type)


def ternary(rng, rows, columns, scale=0.05):
    """Weights in {-s, 0, s}: random enough to give distinct logits, and they compress well."""
    return (rng.integers(-1, 2, size=(rows, columns)) * scale).astype(np.float32)


def hollow(reader, out, rng):
    writer = GGUFWriter(out, "qwen2")
    copy_metadata(reader, writer, {"general.name": "hollow qwen2.5-coder-0.5b (zero weights)"})
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind == Q.F32:
            data = np.ones(tensor.shape[::-1], dtype=np.float32) if tensor.name.endswith("norm.weight") else np.zeros(tensor.shape[::-1], dtype=np.float32)
            writer.add_tensor(tensor.name, data)
            continue
        columns, rows = (int(d) for d in tensor.shape)
        data = np.zeros(tensor.n_bytes, dtype=np.uint8).reshape(rows, -1)
        if tensor.name in ("token_embd.weight", "output.weight"):
            data[:RANDOM_ROWS] = quants.quantize(ternary(rng, RANDOM_ROWS, columns), kind)
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    write(writer)


def tiny(reader, out, rng):
    width, layers, heads, kv_heads, ffn = 64, 2, 4, 2, 128
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(out, "qwen2")
    copy_metadata(reader, writer, {
        "general.name": "tiny random qwen2", "qwen2.block_count": layers, "qwen2.embedding_length": width,
        "qwen2.feed_forward_length": ffn, "qwen2.attention.head_count": heads, "qwen2.attention.head_count_kv": kv_heads,
    })
    head = width // heads
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
    # Logits spread wide (a standard deviation of about 3), so that the GPU's rounding, not
    # near-ties between random tokens, decides where its greedy answers part from the CPU's.
    for name, scale in (("token_embd.weight", 0.05), ("output.weight", 0.5)):
        writer.add_tensor(name, quants.quantize(ternary(rng, vocab, width, scale), Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(width, dtype=np.float32))
    for i in range(layers):
        shapes = {
            "attn_norm.weight": (width,), "ffn_norm.weight": (width,),
            "attn_q.weight": (width, width), "attn_q.bias": (width,),
            "attn_k.weight": (kv_heads * head, width), "attn_k.bias": (kv_heads * head,),
            "attn_v.weight": (kv_heads * head, width), "attn_v.bias": (kv_heads * head,),
            "attn_output.weight": (width, width),
            "ffn_gate.weight": (ffn, width), "ffn_up.weight": (ffn, width), "ffn_down.weight": (width, ffn),
        }
        for name, shape in shapes.items():
            data = 1 + normal(*shape) if name.endswith("norm.weight") else normal(*shape)
            writer.add_tensor(f"blk.{i}.{name}", data)
    write(writer)


def write(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(default_model())
    rng = np.random.default_rng(0)
    hollow(reader, out / "hollow.gguf", rng)
    tiny(reader, out / "tiny.gguf", rng)


if __name__ == "__main__":
    main()
