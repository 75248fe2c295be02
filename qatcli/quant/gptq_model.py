"""GPTQ over a whole model, one decoder block at a time.

The calibration windows enter the first block; every block is quantized on the outputs of the blocks
before it, already quantized. Only the block being worked on is on the device, next to the calibration
activations; the rest of the model waits on the CPU.

Within a block, ``true_sequential`` quantizes the layers in the order data reaches them (q/k/v, then o,
then gate/up, then down), so each group's Hessian sees the quantized output of the group before. A block
forward that only collects inputs stops as soon as the last layer of the group has received its input.

Targets outside the blocks (lm_head, with quant.lm_head) come last, on the inputs the quantized blocks give
them: the last block's outputs go through the modules after the blocks (the final norm), with no block on the
device (BlockWalk.run_past_blocks), stopping as soon as those layers have their input. The model ends on the
CPU, where the walk leaves it.
"""

from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from qatcli.progress import notify, progress_bar
from qatcli.quant.gptq import HessianAccumulator, gptq_quantize
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, make_layer_quant
from qatcli.quant.replay import FinishedOutputs
from qatcli.quant.targets import per_layer
from qatcli.quant.walk import Activations, BlockWalk, Stop, run_block

if TYPE_CHECKING:
    from qatcli.config import GPTQOptions

# The order in which a Llama-style block feeds its Linear layers; layers matching none come last.
SEQUENTIAL_GROUPS = (r"\.(q|k|v)_proj$", r"\.o_proj$", r"\.(gate|up)_proj$", r"\.down_proj$")


@dataclass
class GPTQStats:
    damp_raised: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None


def _sequential_index(name: str) -> int:
    return next((i for i, p in enumerate(SEQUENTIAL_GROUPS) if re.search(p, name)), len(SEQUENTIAL_GROUPS))


def sequential_groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    groups: list[list[str]] = [[] for _ in range(len(SEQUENTIAL_GROUPS) + 1)]
    for name in names:
        groups[_sequential_index(name)].append(name)
    return [g for g in groups if g]


def _freeze_finished(
    block: nn.Module, prefix: str, names: list[str], done: set[str], finished: FinishedOutputs
) -> None:
    """Replay the submodules of ``block`` whose layers are all quantized. Only called when the groups follow the
    data through the block (every layer matched SEQUENTIAL_GROUPS), so everything before them is quantized too."""
    for child_name, child in block.named_children():
        inside = [n for n in names if n.startswith(f"{prefix}{child_name}.")]
        if inside and done.issuperset(inside):
            finished.freeze(child)


def _keep_last_inputs(
    block: nn.Module,
    prefix: str,
    group: list[str],
    modules: dict[str, nn.Module],
    inputs: Activations,
    finished: FinishedOutputs,
) -> tuple[nn.Module, nn.Module] | None:
    """Before a group's pass: where the group is one layer, in a submodule whose other layers are quantized (o_proj
    in a Llama block's self_attn, down_proj in its mlp), keep the layer's inputs for the passes after, where the
    submodule is computed as the layer on them (FinishedOutputs.shortcut). Returns (submodule, layer)."""
    if len(group) != 1:
        return None
    child_name = group[0][len(prefix) :].split(".")[0]
    child, layer = getattr(block, child_name), modules[group[0]]
    if child is layer or not isinstance(layer, nn.Linear):
        return None
    tokens = sum(hidden.shape[:-1].numel() for hidden, _ in inputs)
    nbytes = tokens * layer.in_features * inputs[0][0].element_size()
    return (child, layer) if finished.keep_inputs(layer, nbytes, inputs[0][0].device) else None


def _collect_hessians(
    block: nn.Module,
    names: list[str],
    modules: dict[str, nn.Module],
    inputs: Activations,
    device: torch.device,
) -> dict[str, HessianAccumulator]:
    """Run the block over the calibration batches and accumulate each named layer's input Hessian.

    Layers that receive the very same input tensor (q/k/v, gate/up) share one accumulator. The first batch runs
    until every layer has its input, which tells which share one; later batches stop once each accumulator has
    its input (at q_proj for q/k/v: neither q nor k is computed).
    """
    owner: dict[str, HessianAccumulator] = {}
    shared_with: dict[str, str] = {}
    reached: list[tuple[str, torch.Tensor]] = []
    expected: list[str] = names  # owner's keys, once the first batch has found them

    def hook(name: str):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in owner and name not in shared_with:
                twin = next((n for n, t in reached if t is x), None)
                if twin is not None:
                    shared_with[name] = twin
                else:
                    owner[name] = HessianAccumulator(x.shape[-1], device)
            if name in owner:
                owner[name].add(x)
            reached.append((name, x))
            if {n for n, _ in reached}.issuperset(expected):
                raise Stop

        return pre_hook

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for hidden, kwargs in inputs:
            reached.clear()
            with contextlib.suppress(Stop):
                run_block(block, hidden, kwargs)
            expected = list(owner)
    finally:
        for handle in handles:
            handle.remove()
        reached.clear()
    return {n: owner[shared_with.get(n, n)] for n in names}


def _outside_hessians(
    walk: BlockWalk, names: list[str], modules: dict[str, nn.Module]
) -> dict[str, HessianAccumulator]:
    """The input Hessians of layers outside the blocks (lm_head), on the last block's outputs carried through the
    modules after the blocks; each pass stops once every named layer has its input (no logits are computed)."""
    hessians: dict[str, HessianAccumulator] = {}
    reached: set[str] = set()

    def hook(name: str):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            hessians.setdefault(name, HessianAccumulator(x.shape[-1], walk.device)).add(x)
            reached.add(name)
            if len(reached) == len(names):
                reached.clear()
                raise Stop

        return pre_hook

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        walk.run_past_blocks()
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    spec: QuantSpec | Mapping[str, QuantSpec],
    options: GPTQOptions,
    clip: str,
    windows: torch.Tensor,
    device: torch.device,
) -> tuple[dict[str, LayerQuant], GPTQStats]:
    """Quantize ``targets`` in place (their weights become the dequantized GPTQ weights).

    ``spec`` is one spec for every layer or each layer's own (quant.targets.layer_specs). ``windows`` are the
    calibration token windows, [n, seqlen]; ``options.batch_size`` of them go through a block at a time. Only
    one block (and the parts outside the blocks) is on ``device`` at a time; the model ends on the CPU.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    specs = per_layer(spec, targets)
    walk = BlockWalk(model, windows, options.batch_size, device)
    modules = dict(model.named_modules())
    layers: dict[str, LayerQuant] = {}
    stats = GPTQStats()

    def quantize_layer(name: str, hessian: HessianAccumulator) -> None:
        layer = modules[name]
        result = gptq_quantize(layer.weight, hessian.H, specs[name], options, clip)
        if result.damp != options.damp:
            stats.damp_raised[name] = result.damp
            notify(f"{name}: Hessian not positive definite with damp {options.damp}; used damp {result.damp}")
        stats.loss[name] = result.loss
        layer.weight.copy_(result.weight.to(layer.weight.dtype))
        layers[name] = make_layer_quant(specs[name], result.scales, result.zeros, result.g_idx, options.act_order)

    outside = [n for n in targets if not n.startswith(f"{walk.prefix}.")]
    with progress_bar() as progress:
        block_task = progress.add_task("gptq blocks", total=len(walk.blocks), unit="block")
        layer_task = progress.add_task("  layers", total=None, unit="layer")
        for index, prefix, block in walk:
            names = [n for n in targets if n.startswith(prefix)]
            progress.reset(layer_task, total=len(names), description=f"  block {index} layers")
            groups = sequential_groups(names, options.true_sequential)
            follows_data = options.true_sequential and all(_sequential_index(n) < len(SEQUENTIAL_GROUPS) for n in names)
            done: set[str] = set()
            needs_outputs = index < len(walk.blocks) - 1 or bool(outside)
            with FinishedOutputs(block) as finished:
                for k, group in enumerate(groups):
                    last = k == len(groups) - 1
                    shortcut = None
                    if follows_data and k > 0 and (needs_outputs or not last):
                        shortcut = _keep_last_inputs(block, prefix, group, modules, walk.inputs, finished)
                    hessians = _collect_hessians(block, group, modules, walk.inputs, device)
                    for name in group:
                        quantize_layer(name, hessians[name])
                        progress.advance(layer_task)
                    del hessians
                    done.update(group)
                    if shortcut is not None:
                        finished.shortcut(*shortcut)
                    if follows_data and not last:
                        _freeze_finished(block, prefix, names, done, finished)
                # what the next block (or lm_head, after the last) reads, while the finished parts replay
                if needs_outputs:
                    walk.outputs()
            progress.advance(block_task)
        if outside:  # lm_head: on what the quantized blocks give it
            progress.reset(layer_task, total=len(outside), description="  outside the blocks")
            hessians = _outside_hessians(walk, outside, modules)
            for name in outside:
                quantize_layer(name, hessians[name])
                progress.advance(layer_task)
            del hessians

    stats.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        stats.peak_cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return layers, stats
