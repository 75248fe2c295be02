"""The basin measurements recorded during QAT, every ``qat.record_every`` steps.

On a fixed probe batch: L(Q(w_t)) and L(w_t), the distance |w_t - Q(w_t)| of the latent weights from their
grid points, the inward cosine at Q(w_t) (the descent direction dL/dW_q against the way back to the fp
weights), and the fraction of codes that changed since the last record. The full-precision loss on the same
batch is measured once, so that the run can report the first recorded step at which the quantized model came
within ``eps`` of it.

The loss is the caller's: the token cross-entropy of the whole model in the end-to-end stage (metrics.jsonl),
one block's output MSE against the full-precision block in the block stage (block_metrics.jsonl).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qatcli.qat.fake_quant import FakeQuantLinear


@contextmanager
def _mode(fakes: dict[str, FakeQuantLinear], mode: str) -> Iterator[None]:
    for fake in fakes.values():
        fake.mode = mode
    try:
        yield
    finally:
        for fake in fakes.values():
            fake.mode, fake.probe_weight = "train", None


class LandscapeRecorder:
    """``loss`` computes the loss of ``module`` (whose quantized layers are ``fakes``) on the probe batch."""

    def __init__(
        self,
        module: nn.Module,
        fakes: dict[str, FakeQuantLinear],
        fp: dict[str, torch.Tensor],
        loss: Callable[[], torch.Tensor],
    ) -> None:
        self.module, self.fakes, self.fp, self.loss = module, fakes, fp, loss
        self.previous_codes: dict[str, torch.Tensor] | None = None
        with torch.no_grad(), _mode(fakes, "latent"):
            saved = {name: f.weight.detach().clone() for name, f in fakes.items()}
            for name, f in fakes.items():
                f.weight.copy_(fp[name].to(f.weight.device))
            self.fp_loss = self._loss()
            for name, f in fakes.items():
                f.weight.copy_(saved[name])

    def _loss(self) -> float:
        return float(self.loss())

    def record(self) -> dict[str, Any]:
        """The measurements at the current weights (the caller's autograd state is left untouched)."""
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            quantized_loss = self._loss()
            with _mode(self.fakes, "latent"):
                latent_loss = self._loss()
        with _mode(self.fakes, "probe"):
            self.loss().backward()
            dot = grad_sq = back_sq = 0.0
            gap_sq = 0.0
            for name, fake in self.fakes.items():
                assert fake.probe_weight is not None and fake.probe_weight.grad is not None
                wq, grad = fake.probe_weight.detach(), fake.probe_weight.grad
                back = self.fp[name].to(wq.device) - wq
                dot += float((-grad * back).sum())
                grad_sq += float(grad.pow(2).sum())
                back_sq += float(back.pow(2).sum())
                gap_sq += float((fake.weight.detach() - wq).pow(2).sum())
        codes = {name: fake.codes() for name, fake in self.fakes.items()}
        changed = None
        if self.previous_codes is not None:
            moved = sum(int((codes[n] != self.previous_codes[n]).sum()) for n in codes)
            changed = moved / sum(c.numel() for c in codes.values())
        self.previous_codes = codes
        self.module.train(was_training)
        denominator = (grad_sq * back_sq) ** 0.5
        return {
            "loss_quantized": quantized_loss,
            "loss_latent": latent_loss,
            "loss_fp": self.fp_loss,
            "latent_to_grid": gap_sq**0.5,
            "inward_cosine": dot / denominator if denominator else 0.0,
            "codes_changed": changed,
        }
