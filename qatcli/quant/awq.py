"""AWQ (activation-aware weight quantization, Lin et al., MLSys 2024): the per-channel scale search and its fold.

A few input channels of a Linear carry activations far larger than the rest; their weights matter most to the
output. AWQ multiplies those weight columns by s > 1 before quantizing (their relative rounding error shrinks)
and divides the op that produces the channels (an RMSNorm, or the Linear before) by s, so that the
full-precision model computes exactly the same function. s = x_mean^alpha per input channel, x_mean the mean
|activation| over the calibration tokens; alpha is searched on a grid of ``n_grid`` values in [0, 1), keeping
the one whose quantized output is closest (MSE) to the full-precision output. alpha = 0 is s = 1, plain RTN, so
the search never does worse than RTN on the calibration activations.

The Llama-style scaling groups of AutoAWQ (awq/models/llama.py), per decoder block:

  input_layernorm          -> q_proj, k_proj, v_proj   output compared: self_attn's
  self_attn.v_proj         -> o_proj                   o_proj's; only where v_proj's outputs are o_proj's
                                                       inputs one for one: with grouped-query attention (fewer
                                                       key/value heads than heads) the group is skipped, as
                                                       AutoAWQ skips it (it compares the two weight shapes)
  post_attention_layernorm -> gate_proj, up_proj       mlp's
  mlp.up_proj              -> down_proj                down_proj's

Blocks are walked with the calibration walk GPTQ uses (quant/walk.py). Each block is searched on the outputs of
the blocks before it as they are in the quantized model: already scaled and quantized (as GPTQ here does it).
AutoAWQ instead feeds each block the full-precision model's activations (its next inputs are computed before
the block is scaled and quantized); ``AWQOptions.fp_inputs`` does that. Within a block, as in AutoAWQ, every
group is searched with the block's other layers in full precision, and the groups are folded one after another
(the fold does not change the block's full-precision function, so the order does not matter).

The quantization inside the search is the project's grid (quant/grid.py) with the recipe's ``clip`` choice,
the very grid the final layers get. AutoAWQ's separate clipping search (auto_clip) is not done: ``clip="mse"``
is this project's clipping search, which shrinks each group's range to minimise the weights' own rounding
error, sum |w - w_q|^2.4; auto_clip instead shrinks a symmetric range [-m, m] per group (down to half) to
minimise the group's output error on sampled calibration tokens, and skips q/k. After the search every target
layer gets its grid from its scaled weights exactly as RTN computes one (its latent weight is the scaled
weight W * s, not a grid point). Each layer is quantized on its own spec (quant.dynamic), in the search as after
it. Targets outside the blocks (lm_head, with quant.lm_head) have no scaling group (AutoAWQ searches none for
lm_head): they get their RTN grid.
"""

from __future__ import annotations

import contextlib
import math
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qatcli.errors import QatcliError
from qatcli.progress import progress_bar
from qatcli.quant.grid import QuantSpec, default_g_idx, fake_quantize, group_qparams
from qatcli.quant.layer import LayerQuant, fake_quantized, make_layer_quant
from qatcli.quant.targets import decoder_blocks, per_layer
from qatcli.quant.walk import Activations, BlockWalk, Stop, run_block

if TYPE_CHECKING:
    from qatcli.config import AWQOptions

# AutoAWQ's floors: a scale is at least this before normalisation, and this is added to w_mean (duo scaling).
_MIN_SCALE = 1e-4
# A block's output after the fold may differ from before by float rounding only; more means the block's ops do
# not scale as a Llama block's do (a norm computing with 1 + weight, say), and the fold would be wrong.
_FOLD_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ScalingGroup:
    """Names inside a block: the op whose output channels are divided by s, the Linear layers that read those
    channels (their input columns are multiplied by s), and the module whose output the search compares."""

    prev: str
    layers: tuple[str, ...]
    inspect: str


LLAMA_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass
class AWQStats:
    """What the search chose and measured, by group (named after the op the scales are folded into)."""

    alpha: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)  # output MSE at the chosen alpha
    rtn_loss: dict[str, float] = field(default_factory=dict)  # output MSE at alpha 0 (s = 1: plain RTN)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it was not searched
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None


def _module(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def block_groups(
    block: nn.Module, prefix: str, targets: dict[str, nn.Linear]
) -> tuple[list[ScalingGroup], dict[str, str]]:
    """The scaling groups of ``block`` that can be folded, and those that cannot with the reason.

    A group needs its modules, at least one quantized layer, and a previous op whose every output channel is
    one input channel of the layers: an RMSNorm-like weight of that length, or a Linear with that many outputs.
    """
    groups: list[ScalingGroup] = []
    skipped: dict[str, str] = {}
    for group in LLAMA_GROUPS:
        prev = _module(block, group.prev)
        layers = [_module(block, name) for name in group.layers]
        if prev is None or not all(isinstance(layer, nn.Linear) for layer in layers):
            continue
        key = prefix + group.prev
        widths = sorted({layer.in_features for layer in layers})
        weight = getattr(prev, "weight", None)
        if not any(prefix + name in targets for name in group.layers):
            skipped[key] = "none of its layers is quantized"
        elif len(widths) != 1:
            skipped[key] = f"its layers read different widths {widths}"
        elif isinstance(prev, nn.Linear) and prev.out_features != widths[0]:
            skipped[key] = (
                f"{group.prev} has {prev.out_features} outputs, {group.layers[0]} {widths[0]} inputs "
                "(grouped-query attention)"
            )
        elif not isinstance(prev, nn.Linear) and not (
            isinstance(weight, torch.Tensor) and tuple(weight.shape) == (widths[0],)
        ):
            skipped[key] = f"{group.prev} has no per-channel weight to fold the scales into"
        else:
            groups.append(group)
    return groups, skipped


@torch.no_grad()
def fold_scales(prev: nn.Module, layers: list[nn.Module], scales: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``scales`` and multiply the ``layers``' input columns by them.

    ``prev`` is a norm (its weight, and bias if any, per channel) or a Linear (its rows and bias): the ops
    after it compute exactly what they computed before, up to float rounding.
    """
    s = scales.to(device=prev.weight.device, dtype=prev.weight.dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1))
    else:
        prev.weight.div_(s)
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s)
    for layer in layers:
        layer.weight.mul_(s.to(layer.weight.device).view(1, -1))


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s = x_mean^alpha (divided by w_mean^(1 - alpha) with duo scaling), normalised to max(s) min(s) = 1."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + _MIN_SCALE)
    s = s.clamp_min(_MIN_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _grid_quantized(w: torch.Tensor, spec: QuantSpec, clip: str) -> torch.Tensor:
    """The quantized value of ``w`` on the grid RTN gives it (its own per-group range, ``clip``)."""
    scales, zeros = group_qparams(w, spec, clip)
    return fake_quantize(w, scales, zeros, default_g_idx(w.shape[1], spec.group_size, w.device), spec.maxq)


def _w_mean(layers: list[nn.Module], specs: list[QuantSpec]) -> torch.Tensor:
    """AutoAWQ's w_mean: each weight over its quantization group's largest |weight| (each layer's own groups),
    averaged per input column over the rows of all ``layers``."""
    relative = []
    for layer, spec in zip(layers, specs, strict=True):
        w = layer.weight.detach().float()
        grouped = w.abs().reshape(-1, spec.effective_group_size(w.shape[1]))
        relative.append((grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape))
    return torch.cat(relative).mean(0)


def _call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _collect(
    block: nn.Module, inspect: nn.Module, first: nn.Module, inputs: Activations
) -> tuple[torch.Tensor, list[tuple[tuple, dict[str, Any]]]]:
    """The mean |x| per input channel of ``first`` and what ``inspect`` is called with, per calibration batch.

    A block forward stops as soon as ``first`` has its input.
    """
    calls: list[tuple[tuple, dict[str, Any]]] = []
    sums: list[torch.Tensor] = []
    tokens = 0

    def capture(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))

    def measure(_module: nn.Module, args: tuple) -> None:
        nonlocal tokens
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        sums.append(flat.abs().sum(0, dtype=torch.float64))
        tokens += flat.shape[0]
        raise Stop

    handles = [
        inspect.register_forward_pre_hook(capture, with_kwargs=True),
        first.register_forward_pre_hook(measure),
    ]
    try:
        for hidden, kwargs in inputs:
            with contextlib.suppress(Stop):
                run_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return (torch.stack(sums).sum(0) / tokens).float(), calls


def _output_mse(module: nn.Module, calls: list[tuple[tuple, dict[str, Any]]], reference: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for (args, kwargs), ref in zip(calls, reference, strict=True):
        total += float((_call(module, args, kwargs) - ref).double().pow(2).sum())
        count += ref.numel()
    return total / count


@dataclass
class GroupChoice:
    """The search's result for one group: alpha, its scales, and the output MSE there and at alpha 0 (RTN)."""

    alpha: float
    scales: torch.Tensor
    loss: float
    rtn_loss: float


def search_group(
    block: nn.Module,
    prefix: str,
    group: ScalingGroup,
    targets: dict[str, nn.Linear],
    specs: Mapping[str, QuantSpec],
    clip: str,
    options: AWQOptions,
    inputs: Activations,
) -> GroupChoice:
    """The alpha whose scaled and quantized layers give ``group.inspect`` the output closest to its own.

    For each alpha the group's quantized layers compute with Q(W * s) / s (the same product as X / s times
    Q(W * s), what the folded model computes), the others as they are; the weights are restored after.
    """
    inspect = block.get_submodule(group.inspect)
    layers = [block.get_submodule(name) for name in group.layers]
    x_mean, calls = _collect(block, inspect, layers[0], inputs)
    reference = [_call(inspect, args, kwargs) for args, kwargs in calls]
    # a layer left out of quantization keeps its weights; for w_mean it counts on the default of its group
    layer_specs = [specs.get(prefix + name, next(iter(specs.values()))) for name in group.layers]
    w_mean = _w_mean(layers, layer_specs).to(x_mean.device) if options.duo_scaling else None
    quantized = [prefix + name in targets for name in group.layers]
    originals = [layer.weight.detach().clone() for layer in layers]
    best: GroupChoice | None = None
    rtn_loss = math.nan
    try:
        for step in range(options.n_grid):
            alpha = step / options.n_grid
            s = awq_scales(x_mean, w_mean, alpha)
            for layer, original, is_target, spec in zip(layers, originals, quantized, layer_specs, strict=True):
                if is_target:
                    scaled = _grid_quantized(original.float() * s.view(1, -1), spec, clip) / s.view(1, -1)
                    layer.weight.copy_(scaled.to(layer.weight.dtype))
            loss = _output_mse(inspect, calls, reference)
            if step == 0:
                rtn_loss = loss
            if best is None or (math.isfinite(loss) and not loss >= best.loss):
                best = GroupChoice(alpha, s, loss, rtn_loss)
    finally:
        for layer, original in zip(layers, originals, strict=True):
            layer.weight.copy_(original)
    assert best is not None
    return best


def _relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).norm() / before.norm().clamp_min(1e-30))


def _grids(
    names: list[str], targets: dict[str, nn.Linear], specs: Mapping[str, QuantSpec], clip: str
) -> dict[str, LayerQuant]:
    """Each named layer's grid from its (scaled) weight, computed exactly as RTN computes it."""
    layers = {}
    for name in names:
        weight, spec = targets[name].weight.detach(), specs[name]
        scales, zeros = group_qparams(weight, spec, clip)
        layers[name] = make_layer_quant(spec, scales, zeros, default_g_idx(weight.shape[1], spec.group_size))
    return layers


def check_awq_model(model: nn.Module, targets: dict[str, nn.Linear]) -> None:
    """Refuse a model in which no block has a scaling group AWQ knows (a block that is not Llama-style)."""
    prefix, blocks = decoder_blocks(model)
    if not any(block_groups(block, f"{prefix}.{i}.", targets)[0] for i, block in enumerate(blocks)):
        names = ", ".join(f"{g.prev} -> {'/'.join(g.layers)}" for g in LLAMA_GROUPS)
        raise QatcliError(
            f"awq finds none of its scaling groups ({names}) in the blocks of {type(model).__name__}: "
            "it knows Llama-style blocks only"
        )


@torch.no_grad()
def quantize_awq(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    spec: QuantSpec | Mapping[str, QuantSpec],
    options: AWQOptions,
    clip: str,
    windows: torch.Tensor,
    device: torch.device,
) -> tuple[dict[str, LayerQuant], AWQStats]:
    """Search and fold the AWQ scales of every block, then give every target its grid.

    The model is left with the folded full-precision weights (norms and previous Linear layers divided by s,
    the quantized layers' columns multiplied by s): the latent weights the grids were computed from.
    ``windows`` are the calibration token windows, [n, seqlen]. Only one block (and the parts outside the blocks)
    is on ``device`` at a time; the model ends on the CPU.
    """
    check_awq_model(model, targets)
    specs = per_layer(spec, targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walk = BlockWalk(model, windows, options.batch_size, device, keep_fp=options.fp_inputs)
    layers: dict[str, LayerQuant] = {}
    stats = AWQStats()

    with progress_bar() as progress:
        block_task = progress.add_task("awq blocks", total=len(walk.blocks), unit="block")
        group_task = progress.add_task("  groups", total=None, unit="group")
        for index, prefix, block in walk:
            inputs = walk.fp_inputs if options.fp_inputs else walk.inputs
            groups, skipped = block_groups(block, prefix, targets)
            stats.skipped.update(skipped)
            progress.reset(group_task, total=len(groups), description=f"  block {index} groups")
            hidden, kwargs = inputs[0]
            before = run_block(block, hidden, kwargs)
            for group in groups:
                choice = search_group(block, prefix, group, targets, specs, clip, options, inputs)
                prev = block.get_submodule(group.prev)
                fold_scales(prev, [block.get_submodule(name) for name in group.layers], choice.scales)
                key = prefix + group.prev
                stats.alpha[key], stats.loss[key], stats.rtn_loss[key] = choice.alpha, choice.loss, choice.rtn_loss
                progress.advance(group_task)
            change = _relative_change(before, run_block(block, hidden, kwargs))
            if change > _FOLD_TOLERANCE:
                raise QatcliError(
                    f"awq: folding the scales changed the output of block {index} by {change:.1e} (relative): "
                    f"its ops do not scale as a Llama block's do"
                )
            block_layers = _grids([n for n in targets if n.startswith(prefix)], targets, specs, clip)
            layers.update(block_layers)
            if not options.fp_inputs and index < len(walk.blocks) - 1:  # the next block reads its quantized outputs
                with fake_quantized(model, block_layers):
                    walk.outputs()
            progress.advance(block_task)
    layers.update(_grids([n for n in targets if n not in layers], targets, specs, clip))  # lm_head: RTN's grid

    stats.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        stats.peak_cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return layers, stats
