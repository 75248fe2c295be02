"""GPTQ (Frantar et al.): second-order error feedback from calibration Hessians, one decoder block at a time."""

from __future__ import annotations

from qatcli.methods.base import Job, PTQMethod, Quantized, register


@register
class GPTQ(PTQMethod):
    name = "gptq"
    options = "gptq"
    needs_calibration = True
    walks = True
    summary = "error feedback through each layer's calibration Hessian (needs calib.data)"

    def quantize(self, job: Job) -> Quantized:
        from qatcli.quant.gptq_model import quantize_gptq

        r = job.recipe
        assert job.windows is not None
        layers, stats = quantize_gptq(job.model, job.targets, job.specs, r.gptq, r.quant.clip, job.windows, job.device)
        metrics = {
            "gptq_loss": sum(stats.loss.values()),
            "damp_raised": stats.damp_raised,
            "quantize_peak_cuda_mib": None if stats.peak_cuda_mib is None else round(stats.peak_cuda_mib, 1),
        }
        return Quantized(layers, r.gptq.quantization_fields(), metrics)
