"""Round-to-nearest: each layer's own weights define its grid; the latent weights stay as they are."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from qatcli.progress import progress_bar
from qatcli.quant.grid import QuantSpec, default_g_idx, group_qparams
from qatcli.quant.layer import LayerQuant, make_layer_quant
from qatcli.quant.targets import per_layer


def quantize_rtn(
    targets: dict[str, nn.Linear], spec: QuantSpec | Mapping[str, QuantSpec], clip: str
) -> dict[str, LayerQuant]:
    """Each layer's grid from its own weights: min/max ranges, or the MSE-searched ones (``clip``).

    ``spec`` is one spec for every layer or each layer's own (quant.targets.layer_specs).
    """
    specs = per_layer(spec, targets)
    layers = {}
    with progress_bar() as progress:
        task = progress.add_task("rtn", total=len(targets), unit="layer")
        for name, layer in targets.items():
            scales, zeros = group_qparams(layer.weight.detach(), specs[name], clip)
            g_idx = default_g_idx(layer.in_features, specs[name].group_size)
            layers[name] = make_layer_quant(specs[name], scales, zeros, g_idx)
            progress.advance(task)
    return layers
