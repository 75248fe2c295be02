"""Block-wise QAT (after EfficientQAT's Block-AP): each decoder block's quantized layers are trained, in turn,
to reproduce the full-precision block's outputs on calibration windows.

The windows walk through the model as in GPTQ (quant/walk.py): a block's inputs come through the blocks
before it, already trained and quantized; its targets are what the full-precision block gives on the
full-precision stream of activations. Only one block and the activations are on the device at a time; the
model ends on the CPU.

After each block its trained latent weights and scales are saved in the run directory, one file a block; a
resumed run walks the same windows again, takes the saved blocks instead of training them, and trains the
rest exactly as an uninterrupted run would (each block's order of batches and estimator draw from a seed of its own).

Under torchrun every process walks its share of each batch of windows (batch j of its walk is its rows of batch j)
and every step averages the trainable gradients over the processes: each step is the one-process step of the
whole batch, to float rounding, and every process holds the same trained block, so its windows' next inputs are
those the one-process walk computes for them. A process keeps the activations of its own windows only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcli.config import QATConfig
from qatcli.errors import TrainingDiverged
from qatcli.outputs import atomic_file, write_json_atomic
from qatcli.progress import progress_bar
from qatcli.qat.distributed import Distributed
from qatcli.qat.estimators import Estimator, make_estimator
from qatcli.qat.fake_quant import FakeQuantLinear, convert_qat, prepare_qat, quantized_weights
from qatcli.qat.recording import LandscapeRecorder
from qatcli.quant.layer import LayerQuant, apply_fake_quant
from qatcli.quant.walk import HOME, BlockWalk, run_block
from qatcli.run_layout import BLOCK_STATE_DIR


@dataclass
class BlockReport:
    """The loss of each block on its calibration windows before and after its training, and the blocks whose
    training made them worse, which keep their start."""

    start: dict[int, float] = field(default_factory=dict)
    end: dict[int, float] = field(default_factory=dict)
    kept_start: set[int] = field(default_factory=set)


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``mse`` over every element; ``token_mse``: each token's squared error over its own squared norm;
    ``channel_mse``: each channel's squared error over that channel's mean square in ``target``."""
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if kind == "channel_mse":
        power = target.pow(2).flatten(0, -2).mean(0).clamp_min(1e-6)
        return ((out - target).pow(2) / power).mean()
    err = (out - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-6)).mean()


@torch.no_grad()
def _losses(outputs: list[torch.Tensor], targets: list[torch.Tensor], kind: str) -> float:
    losses = [block_loss(out, target, kind).item() for out, target in zip(outputs, targets, strict=True)]
    return sum(losses) / len(losses)


@torch.no_grad()
def _mean_loss(block: nn.Module, walk: BlockWalk, kind: str) -> float:
    return _losses([run_block(block, hidden, kwargs) for hidden, kwargs in walk.inputs], walk.fp_outputs, kind)


@torch.no_grad()
def _calibrate(block: nn.Module, walk: BlockWalk, batches: int) -> None:
    """Forward passes of the block's first input batches, for estimators that measure their layers."""
    for hidden, kwargs in walk.inputs[:batches]:
        run_block(block, hidden, kwargs)


def _share(windows: torch.Tensor, batch_size: int, group: Distributed | None) -> tuple[torch.Tensor, int]:
    """The windows this process walks and its batch size: under torchrun its rows of every batch of
    ``batch_size`` windows, in order, so that its batch j is its share of batch j; else all of them."""
    if group is None:
        return windows, batch_size
    share = torch.cat([group.local_rows(batch) for batch in windows.split(batch_size)])
    return share, batch_size // group.world_size


def _everywhere(value: float, group: Distributed | None) -> float:
    """A loss of this process's windows as the loss of all the windows (the mean of equal shares)."""
    return value if group is None else group.mean(value)


def _cosine(step: int, steps: int) -> float:
    """Learning-rate factor: cosine from 1 down to 0.1 over the block's steps."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


def _recorder(
    block: nn.Module, fakes: dict[str, FakeQuantLinear], fp: dict[str, torch.Tensor], walk: BlockWalk, kind: str
) -> LandscapeRecorder:
    """The basin measurements of one block on its first calibration batch (which it also trains on)."""
    (hidden, kwargs), target = walk.inputs[0], walk.fp_outputs[0]
    return LandscapeRecorder(block, fakes, fp, lambda: block_loss(run_block(block, hidden, kwargs), target, kind))


def _train_block(
    block: nn.Module,
    fakes: dict[str, FakeQuantLinear],
    estimator: Estimator,
    qat: QATConfig,
    epochs: int,
    seed: int,
    walk: BlockWalk,
    recorder: LandscapeRecorder | None = None,
    group: Distributed | None = None,
) -> list[dict[str, Any]]:
    """Train the block; with a ``recorder``, its measurements at step 0 and every ``qat.record_every`` steps;
    with ``group``, each process on its share of every batch."""
    cfg = qat.block
    for p in block.parameters():
        p.requires_grad_(False)
    weights = [f.weight for f in fakes.values()]
    scales = [f.scales for f in fakes.values()]
    for p in weights + scales:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": weights, "lr": cfg.lr}, {"params": scales, "lr": cfg.scale_lr}], weight_decay=0.0
    )
    steps = epochs * len(walk.inputs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, steps))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    records = [] if recorder is None else [{"step": 0, "landscape": recorder.record()}]
    for _ in range(epochs):
        for i in torch.randperm(len(walk.inputs), generator=gen).tolist():
            hidden, kwargs = walk.inputs[i]
            estimator.before_step(step)
            loss = block_loss(run_block(block, hidden, kwargs), walk.fp_outputs[i], cfg.loss)
            value = _everywhere(loss.item(), group)  # every process stops at the same step
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is {value:g}: the block stage stopped before that update; "
                    "the blocks finished before it are kept (lower qat.block.lr or qat.block.scale_lr)"
                )
            loss.backward()
            if group is not None:
                group.average_gradients(weights + scales)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if recorder is not None and (step % qat.record_every == 0 or step == steps):
                records.append({"step": step, "landscape": recorder.record()})
    for p in weights + scales:
        p.requires_grad_(False)
    return records


def block_state_file(workdir: Path, index: int, suffix: str = ".pt") -> Path:
    return workdir / BLOCK_STATE_DIR / f"block-{index:04d}{suffix}"


def saved_blocks(workdir: Path) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """The blocks a run has finished: index -> layer name -> its latent weight and scales."""
    files = sorted((workdir / BLOCK_STATE_DIR).glob("block-*.pt"))
    return {int(f.stem.removeprefix("block-")): torch.load(f, weights_only=True) for f in files}


def block_records(workdir: Path) -> list[dict[str, Any]]:
    """The basin measurements of every finished block, in block order (each record names its block)."""
    files = sorted((workdir / BLOCK_STATE_DIR).glob("block-*.records.json"))
    return [record for f in files for record in json.loads(f.read_text())]


def train_blocks(
    model: nn.Module,
    layers: dict[str, LayerQuant],
    windows: torch.Tensor,
    qat: QATConfig,
    epochs: int,
    seed: int,
    device: torch.device,
    workdir: Path,
    fp_weights: dict[str, torch.Tensor] | None = None,
    save: bool = True,
    group: Distributed | None = None,
) -> tuple[dict[str, LayerQuant], BlockReport]:
    """Train every block's quantized layers; the model's Linear layers end holding the trained latent weights.

    The targets are the full-precision blocks' outputs: ``fp_weights`` gives the quantized layers' full-precision
    weights where the model holds others (a start from RTN or GPTQ weights); None where it holds them itself.
    With ``qat.record_every``, each block's basin measurements go to its records file (``block_records``).
    Without ``save`` (the processes of a distributed run but the first) the blocks are trained but not saved.
    With ``group`` (under torchrun) each process trains on its share of every batch (see the module's doc), and
    the losses reported are those of all the windows.
    Only one block (and the parts outside the blocks) is on ``device`` at a time; the model ends on the CPU.
    """
    done = saved_blocks(workdir)
    if save:
        (workdir / BLOCK_STATE_DIR).mkdir(parents=True, exist_ok=True)
    share, batch_size = _share(windows, qat.block.batch_size, group)
    walk = BlockWalk(model, share, batch_size, device, keep_fp=True, fp_weights=fp_weights)
    modules = dict(model.named_modules())
    layers = dict(layers)
    fused = qat.fused_for(quantized_weights(layers))  # the whole model's size decides, as for the later steps
    latent: dict[str, torch.Tensor] = {}
    report = BlockReport()
    with progress_bar() as progress:
        task = progress.add_task("block qat", total=len(walk.blocks), unit="block")
        for index, prefix, block in walk:
            names = [n for n in layers if n.startswith(prefix)]
            if index in done:
                with torch.no_grad():
                    for name in names:
                        saved = done[index][name]
                        modules[name].weight.copy_(saved["weight"])
                        layers[name] = replace(layers[name], scales=saved["scales"])
            elif names:
                start = {n: (modules[n].weight.detach().clone(), layers[n].scales.clone()) for n in names}
                estimator = make_estimator(qat, seed + index)
                recorder = None
                if qat.record_every:
                    fp = {n: (fp_weights or {}).get(n, modules[n].weight).detach().clone() for n in names}
                fakes = prepare_qat(model, {n: layers[n] for n in names}, estimator, fused)
                if qat.record_every:
                    recorder = _recorder(block, fakes, fp, walk, qat.block.loss)
                report.start[index] = _everywhere(_mean_loss(block, walk, qat.block.loss), group)
                estimator.setup(lambda batches, block=block: _calibrate(block, walk, batches))
                try:
                    records = _train_block(block, fakes, estimator, qat, epochs, seed + index, walk, recorder, group)
                except TrainingDiverged as err:
                    raise TrainingDiverged(f"block {index + 1} of {len(walk.blocks)}, {err}") from None
                layers.update(convert_qat(model, fakes))
                modules = dict(model.named_modules())
                if save and recorder is not None:
                    write_json_atomic(
                        block_state_file(workdir, index, ".records.json"), [{"block": index, **r} for r in records]
                    )

            def quantize_block(names: list[str] = names) -> None:
                """Quantize the block for what the next block sees; the latent weights wait on the CPU."""
                latent.update(
                    {n: w.to(HOME) for n, w in apply_fake_quant(model, {n: layers[n] for n in names}).items()}
                )

            def end_loss() -> float:  # on the outputs the next block receives
                return _everywhere(_losses(walk.outputs(), walk.fp_outputs, qat.block.loss), group)

            quantize_block()
            if index in report.start:
                report.end[index] = end_loss()
                if report.end[index] > report.start[index]:  # training made the block worse: it keeps its start
                    with torch.no_grad():
                        for n in names:
                            modules[n].weight.copy_(start[n][0])
                            layers[n] = replace(layers[n], scales=start[n][1])
                    quantize_block()
                    walk.forget_outputs()
                    report.kept_start.add(index)
                    report.end[index] = end_loss()
                if save:
                    with atomic_file(block_state_file(workdir, index)) as tmp:
                        torch.save({n: {"weight": latent[n], "scales": layers[n].scales} for n in names}, tmp)
            loss = f": loss {report.start[index]:.4g} -> {report.end[index]:.4g}" if index in report.end else ""
            loss += " (kept its start)" if index in report.kept_start else ""
            progress.update(task, advance=1, description=f"block {index + 1}/{len(walk.blocks)}{loss}")
    with torch.no_grad():
        for name, weight in latent.items():
            modules[name].weight.copy_(weight)
    return layers, report
