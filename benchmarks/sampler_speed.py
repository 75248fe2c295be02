"""Tokens a second of the `generated:N` sampler with the model's weights in float32 and in bfloat16.

Both dtypes sample the same number of sequences from the same seed, in turn (float32, bfloat16, repeated
`--repeats` times), so they share the machine's state. The samples themselves differ: the bfloat16 model's
logits differ in their last bits, a draw near a boundary of the cumulative distribution goes the other way,
and the sequence goes its own way from there. How far the two distributions are apart is measured on the
float32 sample: the mean KL divergence of the bfloat16 model's next-token distribution from the float32
one's, beside the float32 one's entropy. Prints a table; appends it to docs/results.md with `--results`.

    OMP_NUM_THREADS=2 python benchmarks/sampler_speed.py --model smollm2-135m --sequences 64 --length 128
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import machine, publish

from qatcli.data.generated import first_tokens, native_bfloat16, sample_sequences
from qatcli.models.loading import leading_bos, load_model, load_tokenizer, resolve_model


@torch.no_grad()
def divergence(models: dict[torch.dtype, torch.nn.Module], tokens: torch.Tensor) -> tuple[float, float]:
    """Mean KL(float32 || bfloat16) of the next-token distributions on ``tokens``, and float32's mean entropy."""
    kl, entropy = 0.0, 0.0
    for row in tokens.split(8):
        logp = {dtype: torch.log_softmax(m(row).logits.float(), dim=-1) for dtype, m in models.items()}
        p32 = logp[torch.float32].exp()
        kl += (p32 * (logp[torch.float32] - logp[torch.bfloat16])).sum(-1).sum().item()
        entropy -= (p32 * logp[torch.float32]).sum(-1).sum().item()
    return kl / tokens.numel(), entropy / tokens.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", type=Path, help="append the table to this file (e.g. docs/results.md)")
    args = parser.parse_args()

    cpu = torch.device("cpu")
    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    models = {dtype: load_model(ref, cpu, dtype) for dtype in (torch.float32, torch.bfloat16)}
    allowed = first_tokens(tokenizer, models[torch.float32])
    rates: dict[torch.dtype, list[float]] = {dtype: [] for dtype in models}
    for _ in range(args.repeats):
        samples = {}
        for dtype, model in models.items():
            start = time.perf_counter()
            samples[dtype] = sample_sequences(
                model, allowed, args.sequences, args.length, 0, cpu, bos=leading_bos(tokenizer)
            )
            rates[dtype].append(args.sequences * args.length / (time.perf_counter() - start))
    kl, entropy = divergence(models, samples[torch.float32])

    fp32 = statistics.mean(rates[torch.float32])
    lines = [
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/sampler_speed.py "
        f"{shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}, {torch.get_num_threads()} threads, native bfloat16: {native_bfloat16(cpu)}. "
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d}. {args.model}, {args.sequences} sequences x {args.length} "
        f"tokens, seed 0, {args.repeats} run(s) of each dtype in turn.",
        "",
        "| sampler weights | tokens a second (each run) | vs float32 |",
        "|---|---|---|",
    ]
    for dtype, values in rates.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {str(dtype).removeprefix('torch.')} | {runs} | {statistics.mean(values) / fp32:.2f}x |")
    lines.append("")
    lines.append(
        f"On the float32 sample, KL(float32 || bfloat16) of the next-token distributions: {kl:.2e} nats a token "
        f"(mean), against the float32 distribution's entropy of {entropy:.2f} nats."
    )
    text = "\n".join(lines) + "\n"
    if args.results:
        publish(text, args.results)
    else:
        print(text)


if __name__ == "__main__":
    main()
