"""The QAT training loop: AdamW on latent weights and scales, warmup + cosine, clipping, accumulation.

Only the quantized layers train (their latent weights and scales); embeddings, norms and lm_head stay as
in the base model. The run's state (trainable tensors, optimizer, schedule, RNG, data position) is saved
atomically every ``save_every`` steps, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qatcli.data.sources import TrainBatches
from qatcli.qat.estimators import Estimator
from qatcli.qat.fake_quant import FakeQuantLinear
from qatcli.qat.variance_reduction import GradientCorrection
from qatcli.report.progress import progress_bar

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainSettings:
    """The training options; each field has the name of its key in the recipe's qat section."""

    steps: int
    lr: float
    scale_lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    clip_grad: float
    grad_accum: int
    loss: str  # "ce" | "kd"
    save_every: int
    variance_reduction: bool = False
    vr_gamma: float = 0.025


def lr_factor(step: int, s: TrainSettings) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    span = max(s.steps - s.warmup_steps, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged: distillation from the full-precision model."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        fakes: dict[str, FakeQuantLinear],
        estimator: Estimator,
        teacher: nn.Module | None,
        batches: TrainBatches,
        settings: TrainSettings,
        device: torch.device,
        workdir: Path,
    ) -> None:
        self.model, self.fakes, self.estimator, self.teacher = model, fakes, estimator, teacher
        self.batches, self.s, self.device, self.workdir = batches, settings, device, workdir
        for p in model.parameters():
            p.requires_grad_(False)
        weights = [f.weight for f in fakes.values()]
        scales = [f.scales for f in fakes.values()]
        for p in weights + scales:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": weights, "lr": settings.lr, "weight_decay": settings.weight_decay},
                {"params": scales, "lr": settings.scale_lr, "weight_decay": 0.0},
            ]
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, settings))
        beta1 = self.optimizer.defaults["betas"][0]
        self.correction = (
            GradientCorrection(weights + scales, settings.vr_gamma, beta1) if settings.variance_reduction else None
        )
        self.step = 0

    def _trainable(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, fake in self.fakes.items():
            out[f"{name}.weight"] = fake.weight.detach()
            out[f"{name}.scales"] = fake.scales.detach()
        return out

    def save_state(self) -> None:
        state = {
            "step": self.step,
            "trainable": {k: v.cpu() for k, v in self._trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "estimator": self.estimator.state_dict(),
            "correction": None if self.correction is None else self.correction.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        tmp = self.workdir / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.workdir / STATE_FILE)

    def load_state(self) -> None:
        state = torch.load(self.workdir / STATE_FILE, map_location="cpu", weights_only=False)
        current = self._trainable()
        with torch.no_grad():
            for key, tensor in state["trainable"].items():
                current[key].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self.estimator.load_state_dict(state["estimator"])
        if self.correction is not None:
            self.correction.load_state_dict(state["correction"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            logits = self.model(ids, use_cache=False).logits
            if self.s.loss == "ce":
                return ce_loss(logits, ids)
            with torch.no_grad():
                teacher_logits = self.teacher(ids, use_cache=False).logits
            return kd_loss(logits, teacher_logits)

    def train(self, stop_after: int | None = None, on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Train until ``steps`` (or ``stop_after`` more steps), saving state as configured."""
        self.model.train()
        last = self.s.steps if stop_after is None else min(self.s.steps, self.step + stop_after)
        metrics_path = self.workdir / METRICS_FILE
        with progress_bar() as progress, metrics_path.open("a") as log:
            task = progress.add_task("qat", total=self.s.steps, completed=self.step, unit="step")
            t_start, tokens_done = time.perf_counter(), 0
            while self.step < last:
                t0 = time.perf_counter()
                total = 0.0
                self.estimator.before_step(self.step)
                for _ in range(self.s.grad_accum):
                    ids = self.batches.next_batch().to(self.device)
                    loss = self._loss(ids) / self.s.grad_accum
                    loss.backward()
                    total += float(loss.detach())
                    tokens_done += ids.numel()
                if self.correction is not None:
                    self.correction.apply()
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.s.clip_grad))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                elapsed = time.perf_counter() - t_start
                record = {
                    "step": self.step,
                    "loss": total,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "step_seconds": time.perf_counter() - t0,
                    "tokens_per_second": tokens_done / elapsed,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                progress.update(
                    task, advance=1, description=f"qat loss {total:.4f} {record['tokens_per_second']:.0f} tok/s"
                )
                if on_step is not None:
                    on_step(record)
                if self.step % self.s.save_every == 0 or self.step == last:
                    self.save_state()
        self.model.eval()
