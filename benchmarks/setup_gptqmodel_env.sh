#!/usr/bin/env bash
# Build a separate virtual environment with GPTQModel 7.6.0 on the CPU, for benchmarks/gptqmodel_reference.py.
#
#   bash benchmarks/setup_gptqmodel_env.sh [VENV_DIR]     (default: <repo>/.venv-gptqmodel)
#
# Idempotent: a venv that already imports the pinned versions is left as it is.
# Order matters: torch==2.13.0 (the CPU wheel on this machine's disk) goes in first, so that nothing asked
# for later (gptqmodel asks for torch>=2.8.0, torchao, accelerate) pulls a multi-GB CUDA build of torch.
# gptqmodel 7.6.0 is an sdist whose setup.py compiles nothing at install time (its C++/CUDA kernel sources in
# gptqmodel_ext/ are only built on demand, and the CPU GPTQ path builds none), so no BUILD_CUDA_EXT-style flag is needed.
# gptqmodel 7.7 needs torch>=2.14.1: stay on 7.6.0.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-gptqmodel}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
GPTQMODEL_VERSION="7.6.0"
OPTIMUM_VERSION="2.3.0"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating venv at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

have() {
    "$PY" - "$@" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name).split("+")[0] != want:  # torch reports 2.13.0+cpu
        sys.exit(1)
PYEOF
}

if have "torch==$TORCH_VERSION" "gptqmodel==$GPTQMODEL_VERSION" "optimum==$OPTIMUM_VERSION" \
    && "$PY" -c "import torch, transformers, gptqmodel, safetensors" >/dev/null 2>&1; then
    echo "gptqmodel env ready at $VENV (nothing to do)"
    exit 0
fi

"$PY" -m pip install --quiet --upgrade pip
if ! have "torch==$TORCH_VERSION"; then
    "$PY" -m pip install "torch==$TORCH_VERSION"
fi
# Keep torch pinned in the same resolve so that no dependency upgrades it.
"$PY" -m pip install "torch==$TORCH_VERSION" "gptqmodel==$GPTQMODEL_VERSION" "optimum==$OPTIMUM_VERSION" \
    "transformers>=5.14,<6" safetensors

"$PY" - <<'PYEOF'
import torch, transformers, gptqmodel, safetensors
print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu",
      "| transformers", transformers.__version__, "| gptqmodel", gptqmodel.__version__)
PYEOF
echo "gptqmodel env ready at $VENV"
