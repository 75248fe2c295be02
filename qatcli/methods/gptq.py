"""GPTQ (Frantar et al.): second-order error feedback from calibration Hessians, one decoder block at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatcli.methods.base import PTQMethod, Quantized, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qatcli.config import Recipe
    from qatcli.quant.grid import QuantSpec


@register
class GPTQ(PTQMethod):
    name = "gptq"
    options = "gptq"
    needs_calibration = True
    walks = True
    summary = "error feedback through each layer's calibration Hessian (needs calib.data)"

    def quantize(
        self,
        recipe: Recipe,
        model: nn.Module,
        targets: dict[str, nn.Linear],
        specs: dict[str, QuantSpec],
        windows: torch.Tensor | None,
        device: torch.device,
    ) -> Quantized:
        from qatcli.quant.gptq_model import quantize_gptq

        assert windows is not None
        layers, stats = quantize_gptq(model, targets, specs, recipe.gptq, recipe.quant.clip, windows, device)
        metrics = {
            "gptq_loss": sum(stats.loss.values()),
            "damp_raised": stats.damp_raised,
            "quantize_peak_cuda_mib": None if stats.peak_cuda_mib is None else round(stats.peak_cuda_mib, 1),
        }
        return Quantized(layers, recipe.gptq.quantization_fields(), metrics)
