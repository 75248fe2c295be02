"""Round-to-nearest: each layer's own weights define its grid."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatcli.methods.base import PTQMethod, Quantized, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qatcli.config import Recipe
    from qatcli.quant.grid import QuantSpec


@register
class RTN(PTQMethod):
    name = "rtn"
    keeps_fp_weights = True
    summary = "round to nearest on each layer's own grid (min/max or MSE-searched ranges), no data"

    def quantize(
        self,
        recipe: Recipe,
        model: nn.Module,
        targets: dict[str, nn.Linear],
        specs: dict[str, QuantSpec],
        windows: torch.Tensor | None,
        device: torch.device,
    ) -> Quantized:
        from qatcli.quant.rtn import quantize_rtn

        return Quantized(quantize_rtn(targets, specs, recipe.quant.clip))
