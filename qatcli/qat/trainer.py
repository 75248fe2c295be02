"""The QAT training loop: AdamW on latent weights and scales, warmup + cosine, clipping, accumulation.

Only the quantized layers train (their latent weights and scales); embeddings, norms and lm_head stay as
in the base model. The run's state (trainable tensors, optimizer, schedule, estimator, RNG, data position) is
saved atomically every ``save_every`` steps, so an interrupted run resumes exactly where it stopped: as state.pt
in one process, with torch.distributed.checkpoint under torchrun (qatcli/qat/sharded_state.py).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcli.config import QATConfig
from qatcli.data.mix import MixedTokens
from qatcli.errors import QatcliError, TrainingDiverged
from qatcli.outputs import atomic_file
from qatcli.progress import progress_bar
from qatcli.qat.checkpointing import checkpointed_blocks
from qatcli.qat.distributed import Distributed, full_value
from qatcli.qat.estimators import Estimator
from qatcli.qat.fake_quant import FakeQuantLinear
from qatcli.qat.losses import StudentLoss
from qatcli.qat.sharded_state import has_sharded_state, load_sharded, save_sharded
from qatcli.qat.variance_reduction import GradientCorrection
from qatcli.run_layout import METRICS_FILE, STATE_FILE


def has_state(workdir: Path) -> bool:
    """Whether a run saved end-to-end state in ``workdir`` (in one process or under torchrun)."""
    return (workdir / STATE_FILE).is_file() or has_sharded_state(workdir)


class InterruptedAtStep(Exception):
    """Ctrl-C came during training: the step under way was finished and the state saved at ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


@contextmanager
def _sigint_after_the_step() -> Iterator[Callable[[], bool]]:
    """Make the first Ctrl-C a request, answered once the current step is done (a second one stops at once)."""
    requested = False

    def handler(_signum: int, _frame: Any) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains the fake-quantized layers of ``model`` as the recipe's qat section says.

    Batches of ``qat.batch_size`` windows of ``qat.seqlen`` tokens come from ``data`` in a seeded order, each
    source in its weight; estimators that calibrate get windows of the same tokens in another seeded order.
    ``teacher`` (the full-precision model) is needed by the kd loss only. With ``group`` (under torchrun) the loss
    is wrapped in FSDP or DDP, each process computes its rows of every batch, and process 0 alone writes the
    metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        fakes: dict[str, FakeQuantLinear],
        estimator: Estimator,
        teacher: nn.Module | None,
        data: MixedTokens,
        qat: QATConfig,
        seed: int,
        device: torch.device,
        workdir: Path,
        group: Distributed | None = None,
        bos: int | None = None,
    ) -> None:
        self.model, self.fakes, self.estimator = model, fakes, estimator
        self.bos = bos  # the token every training window starts with, or None
        self.data, self.qat, self.seed, self.device, self.workdir = data, qat, seed, device, workdir
        self.group = group
        self.is_main = group is None or group.is_main
        self.batches = data.batches(qat.seqlen, qat.batch_size, seed, bos)
        for p in model.parameters():
            p.requires_grad_(False)
        for f in fakes.values():
            # qat.train = scales: the latent weights stay as the block stage (or the init) left them (E2E-QP)
            f.weight.requires_grad_(qat.train != "scales")
            f.scales.requires_grad_(True)
        self.loss = StudentLoss(model, teacher, qat.loss, device)
        if group is not None:  # FSDP replaces the layers' parameters by their shards: read them after it
            self.loss = group.wrap(self.loss, model)
        weights = [] if qat.train == "scales" else [f.weight for f in fakes.values()]
        scales = [f.scales for f in fakes.values()]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": weights, "lr": qat.lr, "weight_decay": qat.weight_decay},
                {"params": scales, "lr": qat.scale_lr, "weight_decay": 0.0},
            ]
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, qat.steps, qat.warmup_steps, qat.min_lr_ratio)
        )
        beta1 = self.optimizer.defaults["betas"][0]
        self.correction = GradientCorrection(weights + scales, qat.vr_gamma, beta1) if qat.variance_reduction else None
        estimator.setup(self.calibrate)
        self.step = 0
        self.skipped = 0  # batches skipped for a loss or gradient that was not finite
        self.saved_step: int | None = None

    def calibrate(self, batches: int) -> None:
        """Forward passes over training windows drawn apart from the training order (for estimators that calibrate)."""
        windows = self.data.batches(self.qat.seqlen, self.qat.batch_size, self.seed + 1, self.bos)
        with torch.no_grad():
            for _ in range(batches):
                self.model(windows.next_batch().to(self.device), use_cache=False)

    def _trainable(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, fake in self.fakes.items():
            out[f"{name}.weight"] = fake.weight.detach()
            out[f"{name}.scales"] = fake.scales.detach()
        return out

    def _small_state(self) -> dict[str, Any]:
        """The state besides the trainable tensors and the optimizer's."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "estimator": self.estimator.state_dict(),
            "correction": None if self.correction is None else self.correction.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def save_state(self) -> None:
        if self.group is not None:
            save_sharded(
                self.workdir, self.step, self._trainable(), self.loss, self.optimizer, self._small_state(), self.group
            )
        else:
            state = {
                "trainable": {k: v.cpu() for k, v in self._trainable().items()},
                "optimizer": self.optimizer.state_dict(),
                **self._small_state(),
            }
            with atomic_file(self.workdir / STATE_FILE) as tmp:
                torch.save(state, tmp)
        self.saved_step = self.step

    def load_state(self) -> None:
        if has_sharded_state(self.workdir):
            state = load_sharded(self.workdir, self._trainable(), self.loss, self.optimizer)
        elif self.group is not None:
            raise QatcliError(
                f"--resume: the run in {self.workdir} was saved by one process; continue it without torchrun"
            )
        else:
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
        self.skipped = state.get("skipped", 0)
        self.saved_step = self.step
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop the records of steps after the saved state: the resumed run writes them again."""
        path = self.workdir / METRICS_FILE
        if self.is_main and path.is_file():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in lines))

    def _diverged(self, loss: float, grad_norm: float | None) -> bool:
        """Whether this step must not update: its loss or gradient is not finite. Raises once skips run out."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return False
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped >= self.qat.skip_nonfinite:
            what = f"the loss is {loss:g}" if grad_norm is None else f"the gradient norm is {grad_norm:g}"
            saved = "no state was saved before it" if self.saved_step is None else f"step {self.saved_step} is saved"
            raise TrainingDiverged(
                f"step {self.step + 1}: {what}: training stopped before that update, {saved}; lower the learning "
                "rates, or skip such batches with --set qat.skip_nonfinite=N"
            )
        self.skipped += 1
        return True

    def _step(self) -> tuple[float, float, int]:
        """One optimizer step: its loss, gradient norm and number of tokens (a skipped step updates nothing)."""
        total, tokens = 0.0, 0
        self.estimator.before_step(self.step)
        # the training passes alone: the estimator's calibration, the evaluation and the landscape probe run as they are
        with checkpointed_blocks(self.model, self.qat.gradient_checkpointing):
            for _ in range(self.qat.grad_accum):
                ids = self.batches.next_batch()
                if self.group is not None:
                    ids = self.group.local_rows(ids)
                loss = self.loss(ids.to(self.device)) / self.qat.grad_accum
                loss.backward()
                total += float(loss.detach())
                tokens += ids.numel()
        if self.group is not None:  # the whole batch's loss and tokens, the same on every process
            total, tokens = self.group.mean(total), tokens * self.group.world_size
        skip = self._diverged(total, None)  # before the correction keeps this step's gradients
        grad_norm = math.nan
        if not skip:
            if self.correction is not None:
                self.correction.apply()
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(params, self.qat.clip_grad)))
            skip = self._diverged(total, grad_norm)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return total, grad_norm, tokens

    def train(
        self,
        stop_after: int | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        evaluate: Callable[[], dict[str, Any]] | None = None,
        record_landscape: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Train until ``qat.steps`` (or ``stop_after`` more steps), saving state every ``qat.save_every``.

        Ctrl-C lets the step under way finish, saves the state as ``--stop-after`` would have, and raises
        InterruptedAtStep; a second Ctrl-C raises KeyboardInterrupt at once (the last saved state stays).

        With ``evaluate`` (the perplexity of the model as it computes now), every ``qat.eval_every`` steps'
        record carries ``eval_ppl`` (with several domains their geometric mean, and ``eval_domains``); with
        ``record_landscape``, every ``qat.record_every`` steps' record carries
        ``landscape``. Their time is left out of the step's time and the token rate.
        """
        steps = self.qat.steps
        self.model.train()
        last = steps if stop_after is None else min(steps, self.step + stop_after)
        with (
            _sigint_after_the_step() as sigint,
            progress_bar() as progress,
            (self.workdir / METRICS_FILE).open("a") if self.is_main else nullcontext() as log,
        ):
            task = progress.add_task("qat", total=steps, completed=self.step, unit="step")
            t_start, tokens_done = time.perf_counter(), 0
            while self.step < last:
                t0 = time.perf_counter()
                loss, grad_norm, tokens = self._step()
                tokens_done += tokens
                record: dict[str, Any] = {
                    "step": self.step,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "step_seconds": time.perf_counter() - t0,
                    "tokens_per_second": tokens_done / (time.perf_counter() - t_start),
                }
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    record["skipped"] = True
                t_extra = time.perf_counter()
                every = self.qat.eval_every
                if evaluate is not None and every and (self.step % every == 0 or self.step == steps):
                    self.model.eval()
                    record |= evaluate()
                    self.model.train()
                every = self.qat.record_every
                if record_landscape is not None and every and (self.step % every == 0 or self.step == steps):
                    record["landscape"] = record_landscape()
                t_start += time.perf_counter() - t_extra
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                speed = record["tokens_per_second"]
                progress.update(task, advance=1, description=f"qat loss {loss:.4f} {speed:.0f} tok/s")
                if on_step is not None:
                    on_step(record)
                # every process stops at the same step, wherever the Ctrl-C reached
                stop_requested = sigint() if self.group is None else self.group.any(sigint())
                if self.step % self.qat.save_every == 0 or self.step == last or stop_requested:
                    self.save_state()
                if stop_requested and self.step < last:
                    raise InterruptedAtStep(self.step)
        self.model.eval()
