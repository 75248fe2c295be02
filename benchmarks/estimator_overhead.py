"""Step-time overhead of each QAT estimator against full precision and ste, measured in one run on the same batches.

For each group size the model is prepared for QAT once, and a second, full-precision copy trains the same
Linear weights without fake quantization (the `fp` row). A third copy, prepared with torchao's QAT
(IntxFakeQuantizeConfig at the same bits and group size on the same Linear layers, its weight-only fake
quantizer with per-step min/max scales), is the `torchao` row (skipped with --no-torchao). For every batch the
fp model and then each estimator in turn do their before-step work (jacobian's refresh of B every
`update_every` steps), a forward and a backward pass (the estimators are swapped on the same fake-quantized
layers), so all see identical work apart from what fake quantization and the estimator add. Each estimator runs
with the compiled fake-quantization kernels (qatcli/qat/fused.py); `--plain` adds each in plain PyTorch too. The
mean step time counts the periodic refreshes (a median would hide them); jacobian's one-time setup (caching the
calibration Gram blocks, at its first refresh) runs in the warm-up and is reported apart. Appends the table to
docs/results.md (or --results).

    python benchmarks/estimator_overhead.py --model smollm2-135m --bits 2 --group-sizes 64 --steps 20
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from qatcli.config import JacobianConfig, QATConfig, QuantConfig
from qatcli.data.sources import TrainBatches, read_texts, tokenize_texts
from qatcli.models.loading import ModelRef, load_model, load_tokenizer, resolve_model
from qatcli.qat.estimators import Estimator, LayerEstimator, make_estimator
from qatcli.qat.fake_quant import FakeQuantLinear, prepare_qat
from qatcli.qat.losses import model_ce_loss
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import check_group_size, find_targets
from qatcli.runtime import keep_freed_memory, resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, TRAIN_DATA, machine, publish

WARMUP = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_only(model: nn.Module, weights: list[nn.Parameter]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in weights:
        p.requires_grad_(True)


def timed_step(model: nn.Module, ids: torch.Tensor, device: torch.device, before: Callable[[], None]) -> float:
    """Seconds of before-step work, forward and backward on one batch."""
    sync(device)
    t0 = time.perf_counter()
    before()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        loss = model_ce_loss(model, ids)
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def torchao_model(ref: ModelRef, names: set[str], spec: QuantSpec, device: torch.device) -> nn.Module:
    """The model prepared by torchao's QAT on the same layers: torchao's own fake-quantized Linear."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat import QATConfig as TorchaoQAT

    dtype = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}[spec.bits]
    weight = IntxFakeQuantizeConfig(dtype, group_size=spec.group_size, is_symmetric=spec.sym)
    model = load_model(ref, device)
    quantize_(model, TorchaoQAT(weight_config=weight, step="prepare"), filter_fn=lambda _m, fqn: fqn in names)
    train_only(model, [model.get_submodule(name).weight for name in names])
    return model


def per_layer(estimator: Estimator, fakes: dict[str, FakeQuantLinear]) -> dict[str, LayerEstimator]:
    """The estimator's object for every layer, made once: swapping them in keeps each estimator's own state."""
    return {name: estimator.for_layer(name, fake.grid()) for name, fake in fakes.items()}


def measure(args: argparse.Namespace, group_size: int, device: torch.device) -> list[str]:
    """Rows of the table for one group size: mean/median step seconds, overhead vs fp and vs the first estimator."""
    ref = resolve_model(args.model)
    fp, model = load_model(ref, device), load_model(ref, device)
    spec = QuantSpec(args.bits, group_size)
    targets = find_targets(model, [], [])
    check_group_size(targets, spec)
    estimators = {name: make_estimator(QATConfig(estimator=name), seed=0) for name in args.estimators}
    fakes = prepare_qat(model, quantize_rtn(targets, spec, QuantConfig().clip), estimators[args.estimators[0]])
    layer_estimators = {name: per_layer(estimator, fakes) for name, estimator in estimators.items()}
    train_only(model, [p for fake in fakes.values() for p in (fake.weight, fake.scales)])
    train_only(fp, [fp.get_submodule(name).weight for name in fakes])
    ao = torchao_model(ref, set(fakes), spec, device) if args.torchao else None
    tokens = tokenize_texts(read_texts(args.data, "train"), load_tokenizer(ref))
    batches = TrainBatches(tokens, args.seqlen, args.batch_size, 0)
    calibration = TrainBatches(tokens, args.seqlen, args.batch_size, 1)

    def calibrate(n: int) -> None:
        for _ in range(n):
            model(calibration.next_batch().to(device), use_cache=False)

    setup_seconds: dict[str, float] = {}
    # each estimator with the compiled kernels, and with plain PyTorch as "NAME plain" under --plain
    cells = [(name, name, True) for name in estimators]
    cells += [(f"{name} plain", name, False) for name in estimators] if args.plain else []
    times: dict[str, list[float]] = {c: [] for c in ["fp", *(["torchao"] if ao else []), *(c[0] for c in cells)]}
    for step in range(args.steps + WARMUP):
        ids = batches.next_batch().to(device)
        seconds = {"fp": timed_step(fp, ids, device, lambda: None)}
        if ao is not None:
            seconds["torchao"] = timed_step(ao, ids, device, lambda: None)
        for cell, name, fused in cells:
            estimator = estimators[name]
            for layer, fake in fakes.items():
                fake.estimator, fake.fused = layer_estimators[name][layer], fused
            if step == 0 and fused:
                estimator.setup(calibrate)
                sync(device)
                t0 = time.perf_counter()
                estimator.before_step(0)  # jacobian caches its Gram blocks here
                sync(device)
                setup_seconds[cell] = time.perf_counter() - t0
            before = (lambda e=estimator, s=step - WARMUP: e.before_step(s)) if step >= WARMUP else (lambda: None)
            seconds[cell] = timed_step(model, ids, device, before)
        if step >= WARMUP:
            for name, value in seconds.items():
                times[name].append(value)
        print(f"g{group_size} step {step}: " + ", ".join(f"{n} {s:.3f}s" for n, s in seconds.items()))

    fp_mean, base = statistics.mean(times["fp"]), statistics.mean(times[args.estimators[0]])
    rows = []
    for name, t in times.items():
        mean = statistics.mean(t)
        rows.append(
            f"| {group_size} | {name} | {mean:.3f} | {statistics.median(t):.3f} | {mean / fp_mean:.3f}x "
            f"| {100 * (mean / base - 1):+.1f}% | {setup_seconds.get(name, 0.0):.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--estimators", nargs="+", default=["ste", "fourier", "jacobian"], help="First = baseline.")
    parser.add_argument("--no-torchao", dest="torchao", action="store_false", help="Leave out the torchao row.")
    parser.add_argument(
        "--plain", action="store_true", help="Also time each estimator with plain PyTorch (qat.fused false)."
    )
    parser.add_argument("--steps", type=int, default=20, help="Measured batches (after 2 warm-up batches).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--data", default=TRAIN_DATA)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args()

    device = resolve_device(args.device)
    keep_freed_memory()  # as `qatcli qat` does
    rows = [row for g in args.group_sizes for row in measure(args, g, device)]
    lines = [
        f"### Estimator step-time overhead ({datetime.now(timezone.utc).strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/estimator_overhead.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Model {args.model}, {args.bits}-bit, batches of {args.batch_size} x {args.seqlen} tokens; before-step "
        f"work + forward + backward, the same {args.steps} batches for fp, torchao (0.18 IntxFakeQuantizeConfig, "
        f"weight-only, on the same layers) and every estimator (compiled kernels; NAME plain: plain PyTorch), "
        "interleaved. Ratios "
        f"from the mean step time against fp and against {args.estimators[0]}; jacobian refreshes B every "
        f"{JacobianConfig().update_every} steps (counted), its one-time setup is apart.",
        "",
        f"| group | estimator | mean step s | median step s | vs fp | vs {args.estimators[0]} | setup s |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    publish("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
