"""Which Linear layers get quantized, and each one's grid.

By default every Linear inside the decoder blocks; lm_head (outside the blocks) only where the recipe asks
(``quant.lm_head``); the input embeddings never. Each layer's grid is the recipe's bits, group size and sym,
unless a ``quant.dynamic`` rule (a regular expression searched in the layer's name, the first that matches
wins) overrides some of them: ``layer_specs`` is the one place that decides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qatcli.errors import QatcliError
from qatcli.quant.grid import QuantSpec

if TYPE_CHECKING:
    from qatcli.config import QuantConfig

_COMMON_GROUP_SIZES = (32, 64, 128, 256)
# What group size auto tries, largest first: the sizes GPU kernels (Marlin, ExLlamaV2, vLLM) are built for.
AUTO_GROUP_SIZES = (128, 64, 32)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer blocks, with its qualified name."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == n_layers:
            return name, module
    raise QatcliError(f"cannot find the decoder blocks of {type(model).__name__} (a ModuleList of {n_layers})")


def output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """lm_head (the output embeddings) with its qualified name; refused where it is not a Linear layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not isinstance(head, nn.Linear) or name is None:
        raise QatcliError(f"quant.lm_head: {type(model).__name__} has no Linear lm_head to quantize")
    return name, head


def untie_lm_head(model: nn.Module) -> str | None:
    """Give lm_head its own copy of a weight it shares with the input embeddings, so that quantizing it leaves
    the embeddings as they are. Returns the name of the embeddings' weight it was tied to (None: not tied)."""
    _, head = output_head(model)
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or head.weight.data_ptr() != weight.data_ptr():
        return None
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return next(n for n, m in model.named_modules() if m is embeddings) + ".weight"


def find_targets(
    model: nn.Module, include: list[str], exclude: list[str], lm_head: bool = False
) -> dict[str, nn.Linear]:
    """Linear layers inside the decoder blocks whose names match ``include`` (all if empty) and no ``exclude``,
    and lm_head after them where ``lm_head`` is set (the patterns do not apply to it).

    Patterns are regular expressions searched in the layer's qualified name.
    """
    prefix, _ = decoder_blocks(model)
    try:
        inc = [re.compile(p) for p in include]
        exc = [re.compile(p) for p in exclude]
    except re.error as err:
        raise QatcliError(f"invalid layer pattern: {err}") from err
    targets = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and name.startswith(prefix + ".")):
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        targets[name] = module
    if not targets:
        raise QatcliError("no Linear layer matches the include/exclude patterns: nothing to quantize")
    if lm_head:
        name, head = output_head(model)
        targets[name] = head
    return targets


def resolve_group_size(group_size: int | str, targets: Mapping[str, nn.Linear]) -> int:
    """The group size to quantize ``targets`` with: ``auto`` becomes the largest of 128, 64 and 32 that
    divides every layer's in_features, or -1 (one group per row) when none does; an integer stays as it is.
    """
    if group_size != "auto":
        return int(group_size)
    widths = {layer.in_features for layer in targets.values()}
    return next((g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in widths)), -1)


def check_group_size(targets: Mapping[str, nn.Linear], spec: QuantSpec) -> None:
    """Refuse a group size that does not divide a layer's in_features, naming the sizes that would work."""
    for name, layer in targets.items():
        if not spec.fits(layer.in_features):
            raise QatcliError(
                f"group size {spec.group_size} does not divide in_features {layer.in_features} of {name}; "
                f"group sizes that fit every quantized layer: {_fitting(targets)}"
            )


def rule_for(name: str, dynamic: Mapping[str, Any]) -> str | None:
    """The first ``dynamic`` rule (a regular expression searched in the layer name) that matches ``name``."""
    return next((pattern for pattern in dynamic if re.search(pattern, name)), None)


def spec_fields(name: str, default: Mapping[str, Any], dynamic: Mapping[str, Any]) -> dict[str, Any]:
    """bits, group_size and sym of layer ``name``: ``default``'s, overridden by the rule that applies to it."""
    pattern = rule_for(name, dynamic)
    fields = {k: default[k] for k in ("bits", "group_size", "sym") if k in default}
    return {**fields, **(dynamic[pattern] if pattern is not None else {})}


@dataclass
class QuantPlan:
    """The grids of a model's quantized layers: the recipe's default spec, each layer's own spec, and the dynamic
    rules with their group size ``auto`` resolved (what a checkpoint records)."""

    default: QuantSpec
    specs: dict[str, QuantSpec]
    dynamic: dict[str, dict[str, Any]]

    @property
    def mixed(self) -> bool:
        return any(spec != self.default for spec in self.specs.values())


def _fitting(targets: Mapping[str, nn.Linear]) -> str:
    widths = {m.in_features for m in targets.values()}
    return ", ".join(str(g) for g in ["auto", -1, *(g for g in _COMMON_GROUP_SIZES if all(w % g == 0 for w in widths))])


def plan_quantization(targets: Mapping[str, nn.Linear], quant: QuantConfig) -> QuantPlan:
    """Each target's spec: quant.bits / group_size / sym, overridden by the first quant.dynamic rule that matches.

    Group size ``auto`` resolves as it always has for quant.group_size (over every target) and, in a rule, over
    the layers that rule applies to. A group size that does not divide a layer's in_features is refused, naming
    the layer and where the size came from.
    """
    try:
        rules = {pattern: re.compile(pattern) for pattern in quant.dynamic}
    except re.error as err:
        raise QatcliError(f"quant.dynamic: invalid layer pattern: {err}") from err
    matched = {name: next((p for p, rx in rules.items() if rx.search(name)), None) for name in targets}
    default = QuantSpec(quant.bits, resolve_group_size(quant.group_size, targets), quant.sym)
    check_group_size(
        {n: t for n, t in targets.items() if "group_size" not in quant.dynamic.get(matched[n], {})}, default
    )
    resolved: dict[str, dict[str, Any]] = {}
    for pattern, overrides in quant.dynamic.items():
        own = {n: t for n, t in targets.items() if matched[n] == pattern}
        rule = dict(overrides)
        if "group_size" in rule:
            rule["group_size"] = resolve_group_size(rule["group_size"], own)
        resolved[pattern] = rule
    specs = {}
    for name, layer in targets.items():
        rule = resolved.get(matched[name], {})
        spec = QuantSpec(
            rule.get("bits", default.bits), rule.get("group_size", default.group_size), rule.get("sym", default.sym)
        )
        if not spec.fits(layer.in_features):
            own = {n: t for n, t in targets.items() if matched[n] == matched[name]}
            raise QatcliError(
                f"quant.dynamic rule '{matched[name]}': group size {spec.group_size} does not divide in_features "
                f"{layer.in_features} of {name}; group sizes that fit the layers it applies to: {_fitting(own)}"
            )
        specs[name] = spec
    return QuantPlan(default, specs, resolved)


def layer_specs(targets: Mapping[str, nn.Linear], quant: QuantConfig) -> dict[str, QuantSpec]:
    """The spec of each target, by name (see plan_quantization)."""
    return plan_quantization(targets, quant).specs


def per_layer(specs: QuantSpec | Mapping[str, QuantSpec], names: Any) -> dict[str, QuantSpec]:
    """One spec for every layer in ``names``, or each layer's own from a mapping (which must hold them all)."""
    if isinstance(specs, QuantSpec):
        return dict.fromkeys(names, specs)
    return {name: specs[name] for name in names}
