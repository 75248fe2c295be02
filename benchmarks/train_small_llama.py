"""Train a small Llama from scratch on the SOTU training text: a real (not random) model for CPU benchmarks.

Deterministic for a given seed and step count: a byte-level BPE tokenizer trained on the text, a fixed
architecture, seeded data order, AdamW with warmup and cosine decay. Every width (256, 768) is a multiple
of 128, so group size 128 applies. Writes a Hugging Face model directory with its tokenizer and
`training.json` (parameters, steps, wall time, final loss, test perplexity).

    python benchmarks/train_small_llama.py -o runs/sotu-llama-small
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qatcli.data.sources import TrainBatches, eval_windows, read_texts, tokenize_texts
from qatcli.evaluation.perplexity import perplexity
from qatcli.outputs import atomic_dir
from qatcli.report.progress import progress_bar

sys.path.insert(0, str(Path(__file__).parent))
from common import TEST_DATA, TRAIN_DATA


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_text = "\n\n".join(read_texts(TRAIN_DATA, "train"))
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    batches = TrainBatches(tokenize_texts([train_text], tokenizer), args.seqlen, args.batch_size, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(args.steps // 20, 1)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    t0 = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("pretraining", total=args.steps, unit="step")
        for _ in range(args.steps):
            ids = batches.next_batch()
            loss = model(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.update(task, advance=1, description=f"pretraining loss {loss.item():.3f}")
    seconds = time.perf_counter() - t0
    model.eval()

    test = tokenize_texts(read_texts(TEST_DATA, "eval"), tokenizer)
    result = perplexity(model, eval_windows(test, 512), torch.device("cpu"), "test ppl")
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {
            k: getattr(config, k)
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        },
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "train_seconds": round(seconds, 1),
        "final_train_loss": round(loss.item(), 4),
        "test_ppl": result.ppl,
        "test_windows": result.windows,
        "test_seqlen": result.seqlen,
    }
    with atomic_dir(args.output, args.force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
