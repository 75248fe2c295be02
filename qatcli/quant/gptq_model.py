"""GPTQ over a whole model, one decoder block at a time.

The calibration windows enter the first block; every block is quantized on the outputs of the blocks
before it, already quantized. Only the block being worked on is on the device, next to the calibration
activations; the rest of the model waits on the CPU.

Within a block, ``true_sequential`` quantizes the layers in the order data reaches them (q/k/v, then o,
then gate/up, then down), so each group's Hessian sees the quantized output of the group before. A block
forward that only collects inputs stops as soon as the last layer of the group has received its input.
"""

from __future__ import annotations

import contextlib
import re
import resource
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qatcli.quant.gptq import HessianAccumulator, gptq_quantize
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, make_layer_quant
from qatcli.quant.targets import decoder_blocks
from qatcli.report.progress import progress_bar, stderr_console

if TYPE_CHECKING:
    from qatcli.recipe import GPTQOptions

# The order in which a Llama-style block feeds its Linear layers; layers matching none come last.
SEQUENTIAL_GROUPS = (r"\.(q|k|v)_proj$", r"\.o_proj$", r"\.(gate|up)_proj$", r"\.down_proj$")


class _Stop(Exception):
    """Raised from a hook to end a forward pass once it has produced what was needed."""


@dataclass
class GPTQStats:
    damp_raised: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None


def sequential_groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    groups: list[list[str]] = [[] for _ in range(len(SEQUENTIAL_GROUPS) + 1)]
    for name in names:
        index = next((i for i, p in enumerate(SEQUENTIAL_GROUPS) if re.search(p, name)), len(SEQUENTIAL_GROUPS))
        groups[index].append(name)
    return [g for g in groups if g]


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Put every parameter and buffer that is not in a decoder block on ``device``."""
    inside = {id(t) for t in [*blocks.parameters(), *blocks.buffers()]}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside:
                module._buffers[key] = buf.to(device)


def _block_inputs(
    model: nn.Module, first: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The hidden states and keyword arguments that reach the first block, one entry per batch."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(_Stop):
                model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _collect_hessians(
    block: nn.Module,
    names: list[str],
    modules: dict[str, nn.Module],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    device: torch.device,
) -> dict[str, HessianAccumulator]:
    """Run the block over the calibration batches and accumulate each named layer's input Hessian.

    Layers that receive the very same input tensor (q/k/v, gate/up) share one accumulator.
    """
    owner: dict[str, HessianAccumulator] = {}
    shared_with: dict[str, str] = {}
    reached: list[tuple[str, torch.Tensor]] = []

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
            if len(reached) == len(names):
                raise _Stop

        return pre_hook

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for hidden, kwargs in inputs:
            reached.clear()
            with contextlib.suppress(_Stop):
                _run_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        reached.clear()
    return {n: owner[shared_with.get(n, n)] for n in names}


@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    spec: QuantSpec,
    options: GPTQOptions,
    clip: str,
    windows: torch.Tensor,
    device: torch.device,
) -> tuple[dict[str, LayerQuant], GPTQStats]:
    """Quantize ``targets`` in place (their weights become the dequantized GPTQ weights).

    ``windows`` are the calibration token windows, [n, seqlen]; ``options.batch_size`` of them go through a
    block at a time.
    """
    prefix, blocks = decoder_blocks(model)
    model.to("cpu")
    _move_outside_blocks(model, blocks, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs = _block_inputs(model, blocks[0], windows, options.batch_size, device)
    modules = dict(model.named_modules())
    layers: dict[str, LayerQuant] = {}
    stats = GPTQStats()

    with progress_bar() as progress:
        block_task = progress.add_task("gptq blocks", total=len(blocks), unit="block")
        layer_task = progress.add_task("  layers", total=None, unit="layer")
        for index, block in enumerate(blocks):
            block.to(device)
            names = [n for n in targets if n.startswith(f"{prefix}.{index}.")]
            progress.reset(layer_task, total=len(names), description=f"  block {index} layers")
            for group in sequential_groups(names, options.true_sequential):
                hessians = _collect_hessians(block, group, modules, inputs, device)
                for name in group:
                    layer = modules[name]
                    result = gptq_quantize(layer.weight, hessians[name].H, spec, options, clip)
                    if result.damp != options.damp:
                        stats.damp_raised[name] = result.damp
                        stderr_console.print(
                            f"[yellow]{name}: Hessian not positive definite with damp "
                            f"{options.damp}; used damp {result.damp}"
                        )
                    stats.loss[name] = result.loss
                    layer.weight.copy_(result.weight.to(layer.weight.dtype))
                    layers[name] = make_layer_quant(spec, result.scales, result.zeros, result.g_idx, options.act_order)
                    progress.advance(layer_task)
                del hessians
            inputs = [(_run_block(block, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
            block.to("cpu")
            progress.advance(block_task)

    stats.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        stats.peak_cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
    model.to(device)
    return layers, stats
