"""Which Linear layers get quantized: by default every Linear inside the decoder blocks.

Embeddings and lm_head sit outside the blocks and stay in full precision.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from qatcli.errors import QatcliError
from qatcli.quant.grid import QuantSpec

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


def find_targets(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Linear]:
    """Linear layers inside the decoder blocks whose names match ``include`` (all if empty) and no ``exclude``.

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
            widths = {m.in_features for m in targets.values()}
            fitting = [g for g in _COMMON_GROUP_SIZES if all(w % g == 0 for w in widths)]
            options = ", ".join(str(g) for g in ["auto", -1, *fitting])
            raise QatcliError(
                f"group size {spec.group_size} does not divide in_features {layer.in_features} of {name}; "
                f"group sizes that fit every quantized layer: {options}"
            )
