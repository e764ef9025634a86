#!/usr/bin/env bash
# Builds seedflow with CUDA on a machine without a GPU or a CUDA install, and packs what the GPU
# check (bench/gpu/check.py) needs into one folder that can travel to a GPU machine:
#
#   bench/gpu/bundle.sh OUT_DIR        # then, there: python3 bench/gpu/check.py OUT_DIR
#
# CUDA 13.0's compiler, headers and libraries come from NVIDIA's Python packages (pip), arranged
# as a toolkit. llama.cpp is built as shared libraries (LLAMA_BUILD_SHARED_LIBS) that link cuBLAS
# dynamically, so the bundle stays small and uses the GPU machine's own CUDA 13 libraries; the
# plain `--features cuda` build links them statically instead. Kernels for Hopper (sm_90) only,
# without flash attention, which seedflow leaves to llama.cpp's `auto` and CUDA then doesn't offer:
# 37 minutes on 2 cores the first time, a few after a change to seedflow. The anchor,
# llama-batched-bench, is built from the same tree without CUDA and runs on these libraries, so
# both programs use the same llama.cpp.
set -euo pipefail
out=$(realpath -m "$1")
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${SEEDFLOW_CACHE:-$HOME/.cache/seedflow}
cuda=${CUDA_TOOLKIT:-$cache/cuda-13.0}
target=${CUDA_TARGET_DIR:-$HOME/.cache/seedflow-cuda-target}

if [ ! -x "$cuda/bin/nvcc" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 -d "$wheels" \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
  for wheel in "$wheels"/*.whl; do unzip -q -o "$wheel" -d "$wheels/x"; done
  mkdir -p "$(dirname "$cuda")" && mv "$wheels/x/nvidia/cu13" "$cuda" && rm -rf "$wheels"
  # The layout nvcc and CMake's FindCUDAToolkit expect of a toolkit.
  mkdir -p "$cuda/targets/x86_64-linux" "$cuda/lib/stubs"
  ln -sfn ../../include "$cuda/targets/x86_64-linux/include"
  ln -sfn ../../lib "$cuda/targets/x86_64-linux/lib"
  ln -sfn lib "$cuda/lib64"
  for lib in cudart cublas cublasLt; do ln -sf "lib$lib.so.13" "$cuda/lib/lib$lib.so"; done
  # The driver library comes with the GPU's driver, not in a package: link against a stub
  # holding the symbols ggml-cuda calls, as the toolkit's own stubs/libcuda.so does.
  ggml_cuda=$(find ~/.cargo/registry/src -path '*llama-cpp-sys-2-*/llama.cpp/ggml/src/ggml-cuda' | sort | tail -1)
  grep -ohE '\bcu[A-Z][A-Za-z_0-9]*\(' "$ggml_cuda"/*.cu* | tr -d '(' | sort -u | sed 's/.*/int &(void) { return 0; }/' > "$cuda/lib/stubs/cuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/cuda.c"
fi

(cd "$root" && PATH=$cuda/bin:$PATH CUDA_PATH=$cuda CUDAToolkit_ROOT=$cuda CMAKE_CUDA_COMPILER=$cuda/bin/nvcc \
  CMAKE_CUDA_ARCHITECTURES=90-real GGML_CUDA_FA=OFF LLAMA_BUILD_SHARED_LIBS=1 CARGO_TARGET_DIR=$target \
  cargo build --features cuda --bin seedflow)

# llama-batched-bench on llama.cpp's shared libraries, built by bench/generate.py.
anchor=$(python3 -c "import sys; sys.path.insert(0, '$root/bench'); import generate; print(generate.batched_bench(shared=True))")
anchor_dir=$(dirname "$anchor")

# Programs and libraries in one archive (OUT_DIR must stay under 64 MiB to travel): seedflow's
# llama.cpp and ggml, and the anchor's own two libraries; OpenMP, which a GPU image may lack.
programs=$(mktemp -d)
mkdir "$programs/lib"
strip -o "$programs/seedflow" "$target/debug/seedflow"
cp "$anchor" "$programs/"
sys_out=$(ls -td "$target"/debug/build/llama-cpp-sys-2-*/out | head -1)
find "$sys_out" -name 'lib*.so*' -path '*/lib*/*' ! -name 'libllama-common*' -exec cp -a {} "$programs/lib/" \;
cp -a "$anchor_dir"/libllama-{common,batched-bench-impl}.so* "$programs/lib/"
cp -L "$(gcc -print-file-name=libgomp.so.1)" "$programs/lib/"
strip "$programs"/lib/*.so.*
rm -rf "$out" && mkdir -p "$out"
tar -cJf "$out/programs.tar.xz" -C "$programs" . && rm -rf "$programs"
python3 "$root/bench/gpu/models.py" "$out"
xz -T0 -9 "$out"/*.gguf
du -sh "$out"/*
