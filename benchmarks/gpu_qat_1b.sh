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
python3 - "$out/base" <<'PY'
import sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

text = " ".join(f"In the year {1790 + i} the Congress met and spoke of the Union and of peace." for i in range(400))
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
# TinyLlama-1.1B's shape; token ids past the small tokenizer's are sampled and trained on like any other
config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
PY
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
