"""AWQ (Lin et al.): per-channel scales searched on calibration activations, folded into the model, then RTN."""

from __future__ import annotations

from qatcli.methods.base import Job, PTQMethod, Quantized, register


@register
class AWQ(PTQMethod):
    name = "awq"
    options = "awq"
    needs_calibration = True
    walks = True
    qat_init = False  # its scales are folded into the model: a QAT start would need the folded base model
    summary = "activation-aware channel scales, then round to nearest (needs calib.data)"

    def quantize(self, job: Job) -> Quantized:
        from qatcli.quant.awq import quantize_awq

        r = job.recipe
        assert job.windows is not None
        layers, awq = quantize_awq(job.model, job.targets, job.specs, r.awq, r.quant.clip, job.windows, job.device)
        metrics = {
            "awq_alpha": awq.alpha,
            "awq_loss": sum(awq.loss.values()),
            "awq_rtn_loss": sum(awq.rtn_loss.values()),
            "awq_skipped": awq.skipped,
            "quantize_peak_cuda_mib": None if awq.peak_cuda_mib is None else round(awq.peak_cuda_mib, 1),
        }
        return Quantized(layers, r.awq.quantization_fields(), metrics)
