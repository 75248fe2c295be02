#!/usr/bin/env bash
# The CUDA path end to end on a small random Llama (no download): GPTQ, QAT with the block stage, export,
# eval of the export on data sampled from the model. Run where a GPU is present:
#   bash benchmarks/cuda_smoke.sh OUT_DIR
set -euo pipefail
out=${1:-runs/cuda-smoke}
mkdir -p "$out"
export QATCLI_CACHE="$out/cache" PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/random_llama.py "$out/base" --hidden 256 --mlp 768 --layers 4 --heads 4 --kv-heads 2
q() { /usr/bin/time -f "%e s wall, %M KiB peak RSS: $1" python3 -m qatcli "$@"; }
q ptq "$out/base" --method gptq --bits 3 --calib-data generated:20:128 --nsamples 16 --calib-seqlen 128 --device cuda -o "$out/gptq"
q qat "$out/base" --bits 2 --estimator fourier --data generated:20:128 --train-seqlen 64 --steps 20 \
  --set qat.block.nsamples=16 --set qat.block.seqlen=64 --device cuda -o "$out/qat"
q export "$out/qat" -o "$out/qat-gptq"
q eval "$out/base" "$out/qat" "$out/qat-gptq" --data generated:20:128 --seqlen 64 --device cuda --json "$out/eval.json"
python3 -c "import json; print(json.load(open('$out/qat/qatcli.json'))['metrics']['block_loss'])"
