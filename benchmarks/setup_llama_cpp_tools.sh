#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-bench) from the llama.cpp that
# llama-cpp-python 0.3.36 vendors: the same engine that `qatcli eval FILE.gguf` and the tests run. For
# benchmarks/gguf_smollm2.py, which compares qatcli's GGUF exports with llama.cpp's own quantizer.
#
#   bash benchmarks/setup_llama_cpp_tools.sh [DIR]     (default: <repo>/runs/llama.cpp-tools; the tools land in DIR/bin)
#
# Idempotent: tools already built are kept. About 6 minutes on 2 cores.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/runs/llama.cpp-tools}"
VERSION="0.3.36"
TOOLS=(llama-quantize llama-imatrix llama-bench)

if [ -x "$DIR/bin/llama-bench" ] && [ -x "$DIR/bin/llama-imatrix" ] && [ -x "$DIR/bin/llama-quantize" ]; then
    echo "llama.cpp tools already in $DIR/bin"
    exit 0
fi
mkdir -p "$DIR"
if [ ! -d "$DIR/src/llama.cpp" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/sdist"
    mkdir -p "$DIR/src"
    tar xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/src" --strip-components=2 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi
cmake -S "$DIR/src/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$DIR/build" --target "${TOOLS[@]}" -j "$(nproc)"
mkdir -p "$DIR/bin"
for tool in "${TOOLS[@]}"; do cp "$DIR/build/bin/$tool" "$DIR/bin/"; done
echo "llama.cpp tools in $DIR/bin"
