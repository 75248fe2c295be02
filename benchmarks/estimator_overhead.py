"""Step-time overhead of each QAT estimator against ste, measured in one run on the same batches.

The model is prepared for QAT once; for every batch each estimator in turn does a forward and backward
pass (the estimators are swapped on the same fake-quantized layers), so all see identical work apart from
the backward of rounding. Reports the median step time per estimator and its overhead over ste, and
appends the table to docs/results.md.

    python benchmarks/estimator_overhead.py --model smollm2-135m --bits 2 --group-size 64 --steps 12
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

from qatcli.data import TrainBatches, read_texts, tokenize_texts
from qatcli.estimators import make_estimator
from qatcli.fake_quant import prepare_qat
from qatcli.grid import QuantSpec
from qatcli.models import load_model, load_tokenizer, resolve_model
from qatcli.rtn import quantize_rtn
from qatcli.runtime import resolve_device
from qatcli.targets import check_group_size, find_targets
from qatcli.train import ce_loss

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, SOTU, machine, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--estimators", nargs="+", default=["ste", "fourier"])
    parser.add_argument("--steps", type=int, default=12, help="Measured batches (after 2 warm-up batches).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--data", default=str(SOTU / "train.txt"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()

    device = resolve_device(args.device)
    ref = resolve_model(args.model)
    model = load_model(ref, device)
    tokenizer = load_tokenizer(ref)
    spec = QuantSpec(args.bits, args.group_size)
    targets = find_targets(model, [], [])
    check_group_size(targets, spec)
    fakes = prepare_qat(model, quantize_rtn(targets, spec), make_estimator("ste"))
    for p in model.parameters():
        p.requires_grad_(False)
    for fake in fakes.values():
        fake.weight.requires_grad_(True)
        fake.scales.requires_grad_(True)
    estimators = {name: make_estimator(name) for name in args.estimators}
    batches = TrainBatches(tokenize_texts(read_texts(args.data, "train"), tokenizer), args.seqlen, args.batch_size, 0)

    times: dict[str, list[float]] = {name: [] for name in estimators}
    for step in range(args.steps + 2):
        ids = batches.next_batch().to(device)
        for name, estimator in estimators.items():
            for fake in fakes.values():
                fake.estimator = estimator
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast:
                loss = ce_loss(model(ids, use_cache=False).logits, ids)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        print(f"step {step}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t), flush=True)

    base = statistics.median(times["ste"])
    lines = [
        f"### Estimator step-time overhead ({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/estimator_overhead.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Model {args.model}, {args.bits}-bit g{args.group_size}, batches of {args.batch_size} x {args.seqlen} "
        f"tokens; forward + backward, the same {args.steps} batches for every estimator, interleaved.",
        "",
        "| estimator | median step s | overhead vs ste |",
        "|---|---|---|",
    ]
    for name, t in times.items():
        median = statistics.median(t)
        lines.append(f"| {name} | {median:.3f} | {100 * (median / base - 1):+.1f}% |")
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
