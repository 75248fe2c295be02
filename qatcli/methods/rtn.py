"""Round-to-nearest: each layer's own weights define its grid."""

from __future__ import annotations

from qatcli.methods.base import Job, PTQMethod, Quantized, register


@register
class RTN(PTQMethod):
    name = "rtn"
    keeps_fp_weights = True
    summary = "round to nearest on each layer's own grid (min/max or MSE-searched ranges), no data"

    def quantize(self, job: Job) -> Quantized:
        from qatcli.quant.rtn import quantize_rtn

        return Quantized(quantize_rtn(job.targets, job.specs, job.recipe.quant.clip))
