"""AWQ (Lin et al.): per-channel scales searched on calibration activations, folded into the model, then RTN."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatcli.methods.base import PTQMethod, Quantized, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qatcli.config import Recipe
    from qatcli.quant.grid import QuantSpec


@register
class AWQ(PTQMethod):
    name = "awq"
    options = "awq"
    needs_calibration = True
    walks = True
    qat_init = False  # its scales are folded into the model: a QAT start would need the folded base model
    summary = "activation-aware channel scales, then round to nearest (needs calib.data)"

    def quantize(
        self,
        recipe: Recipe,
        model: nn.Module,
        targets: dict[str, nn.Linear],
        specs: dict[str, QuantSpec],
        windows: torch.Tensor | None,
        device: torch.device,
    ) -> Quantized:
        from qatcli.quant.awq import quantize_awq

        assert windows is not None
        layers, awq = quantize_awq(model, targets, specs, recipe.awq, recipe.quant.clip, windows, device)
        metrics = {
            "awq_alpha": awq.alpha,
            "awq_loss": sum(awq.loss.values()),
            "awq_rtn_loss": sum(awq.rtn_loss.values()),
            "awq_skipped": awq.skipped,
            "quantize_peak_cuda_mib": None if awq.peak_cuda_mib is None else round(awq.peak_cuda_mib, 1),
        }
        return Quantized(layers, recipe.awq.quantization_fields(), metrics)
