#!/usr/bin/env bash
# The CUDA path end to end on a small random Llama (no download): GPTQ, QAT with the block stage, export,
# eval of the export on data sampled from the model. Run where a GPU is present:
#   bash benchmarks/cuda_smoke.sh OUT_DIR
set -euo pipefail
out=${1:-runs/cuda-smoke}
mkdir -p "$out"
export QATCLI_CACHE="$out/cache" PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python3 - "$out/base" <<'PY'
import sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

text = " ".join(f"In the year {1790 + i} the Congress met and spoke of the Union, of trade and of peace." for i in range(400))
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
q() { /usr/bin/time -f "%e s wall, %M KiB peak RSS: $1" python3 -m qatcli "$@"; }
q ptq "$out/base" --method gptq --bits 3 --calib-data generated:20:128 --nsamples 16 --calib-seqlen 128 --device cuda -o "$out/gptq"
q qat "$out/base" --bits 2 --estimator fourier --data generated:20:128 --train-seqlen 64 --steps 20 \
  --set qat.block.nsamples=16 --set qat.block.seqlen=64 --device cuda -o "$out/qat"
q export "$out/qat" -o "$out/qat-gptq"
q eval "$out/base" "$out/qat" "$out/qat-gptq" --data generated:20:128 --seqlen 64 --device cuda --json "$out/eval.json"
python3 -c "import json; print(json.load(open('$out/qat/qatcli.json'))['metrics']['block_loss'])"
