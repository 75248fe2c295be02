"""Step-time overhead of each QAT estimator against ste, measured in one run on the same batches.

For each group size the model is prepared for QAT once; for every batch each estimator in turn does its
before-step work (jacobian's refresh of B every `update_every` steps), a forward and a backward pass (the
estimators are swapped on the same fake-quantized layers), so all see identical work apart from what the
estimator adds. The mean step time counts the periodic refreshes (a median would hide them); jacobian's
one-time setup (caching the calibration Gram blocks, at its first refresh) runs in the warm-up and is
reported apart. Appends the table to docs/results.md.

    python benchmarks/estimator_overhead.py --model smollm2-135m --bits 2 --group-sizes 64 --steps 20
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

from qatcli.data.models import load_model, load_tokenizer, resolve_model
from qatcli.data.sources import TrainBatches, read_texts, tokenize_texts
from qatcli.qat.estimators import make_estimator
from qatcli.qat.fake_quant import prepare_qat
from qatcli.qat.trainer import ce_loss
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import check_group_size, find_targets
from qatcli.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, SOTU, machine, publish

WARMUP = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, group_size: int, device: torch.device) -> list[str]:
    """Rows of the table for one group size: mean/median step seconds per estimator and overhead vs ste."""
    ref = resolve_model(args.model)
    model = load_model(ref, device)
    tokenizer = load_tokenizer(ref)
    spec = QuantSpec(args.bits, group_size)
    targets = find_targets(model, [], [])
    check_group_size(targets, spec)
    estimators = {name: make_estimator(name) for name in args.estimators}
    fakes = prepare_qat(model, quantize_rtn(targets, spec), estimators[args.estimators[0]])
    for p in model.parameters():
        p.requires_grad_(False)
    for fake in fakes.values():
        fake.weight.requires_grad_(True)
        fake.scales.requires_grad_(True)
    tokens = tokenize_texts(read_texts(args.data, "train"), tokenizer)
    batches = TrainBatches(tokens, args.seqlen, args.batch_size, 0)
    calibration = TrainBatches(tokens, args.seqlen, args.batch_size, 1)

    def run_calibration() -> None:
        for _ in range(4):
            model(calibration.next_batch().to(device), use_cache=False)

    setup_seconds: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in estimators}
    for step in range(args.steps + WARMUP):
        ids = batches.next_batch().to(device)
        for name, estimator in estimators.items():
            for fake in fakes.values():
                fake.estimator = estimator
            sync(device)
            t0 = time.perf_counter()
            if step == 0:
                estimator.setup(fakes, run_calibration)
                estimator.before_step(0)  # jacobian caches its Gram blocks here
                sync(device)
                setup_seconds[name] = time.perf_counter() - t0
                t0 = time.perf_counter()
            elif step >= WARMUP:
                estimator.before_step(step - WARMUP)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast:
                loss = ce_loss(model(ids, use_cache=False).logits, ids)
            loss.backward()
            sync(device)
            if step >= WARMUP:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        print(f"g{group_size} step {step}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t))

    base = statistics.mean(times[args.estimators[0]])
    rows = []
    for name, t in times.items():
        mean = statistics.mean(t)
        rows.append(
            f"| {group_size} | {name} | {mean:.3f} | {statistics.median(t):.3f} | {100 * (mean / base - 1):+.1f}% "
            f"| {setup_seconds[name]:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--estimators", nargs="+", default=["ste", "fourier", "jacobian"], help="First = baseline.")
    parser.add_argument("--steps", type=int, default=20, help="Measured batches (after 2 warm-up batches).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--data", default=str(SOTU / "train.txt"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()

    device = resolve_device(args.device)
    rows = [row for g in args.group_sizes for row in measure(args, g, device)]
    lines = [
        f"### Estimator step-time overhead ({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/estimator_overhead.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Model {args.model}, {args.bits}-bit, batches of {args.batch_size} x {args.seqlen} tokens; before-step "
        f"work + forward + backward, the same {args.steps} batches for every estimator, interleaved. Overhead "
        f"from the mean step time against {args.estimators[0]}; jacobian refreshes B every "
        f"{make_estimator('jacobian').update_every} steps (counted), its one-time setup is apart.",
        "",
        "| group | estimator | mean step s | median step s | overhead (mean) | setup s |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
