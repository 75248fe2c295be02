#!/usr/bin/env bash
# Time and peak memory of recipes/qat-w2-1b-gpu.yaml's QAT on one GPU, on a random Llama of TinyLlama-1.1B's
# shape (no download: the quality of a random model means nothing, its cost is the real one). The data,
# windows and steps are cut (SCALE below) so that it fits a short lease; the per-block and per-step costs
# scale linearly with them. Run where a GPU is present:
#   bash benchmarks/gpu_qat_1b.sh OUT_DIR
set -euo pipefail
out=${1:-runs/gpu-qat-1b}
mkdir -p "$out"
export QATCLI_CACHE="$out/cache" PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# TinyLlama-1.1B's shape
python3 benchmarks/random_llama.py "$out/base" --hidden 2048 --mlp 5632 --layers 22 --heads 32 --kv-heads 4 \
  --vocab 32000
# SCALE: 80 sequences instead of 1280, 64 block windows instead of 512, 40 steps instead of 500
/usr/bin/time -f "%e s wall, %M KiB peak RSS" python3 -m qatcli qat "$out/base" \
  --recipe recipes/qat-w2-1b-gpu.yaml -o "$out/qat" --data generated:80:1024 \
  --set qat.block.nsamples=64 --steps 40 --eval-data generated:80:1024 --max-windows 8
python3 - "$out/qat/qatcli.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
keys = ["setup_seconds", "block_seconds_this_invocation", "train_seconds_this_invocation", "mean_step_seconds",
        "peak_cuda_mib", "peak_rss_mib", "eval"]
print(json.dumps({k: m.get(k) for k in keys}, indent=1))
PY
