"""Round-to-nearest: each layer's own weights define its grid; the latent weights stay as they are."""

from __future__ import annotations

from torch import nn

from qatcli.quant.grid import QuantSpec, default_g_idx, group_qparams
from qatcli.quant.layer import LayerQuant, make_layer_quant
from qatcli.report.progress import progress_bar


def quantize_rtn(targets: dict[str, nn.Linear], spec: QuantSpec, clip: str) -> dict[str, LayerQuant]:
    """Each layer's grid from its own weights: min/max ranges, or the MSE-searched ones (``clip``)."""
    layers = {}
    with progress_bar() as progress:
        task = progress.add_task("rtn", total=len(targets), unit="layer")
        for name, layer in targets.items():
            scales, zeros = group_qparams(layer.weight.detach(), spec, clip)
            g_idx = default_g_idx(layer.in_features, spec.group_size)
            layers[name] = make_layer_quant(spec, scales, zeros, g_idx)
            progress.advance(task)
    return layers
