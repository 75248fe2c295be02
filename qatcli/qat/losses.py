"""The training losses, computed over chunks of tokens so no full-vocabulary fp32 copy outlives its chunk.

Both losses are a cross-entropy against a target distribution p per token, whose gradient with respect to the
student's logits is softmax(logits) - p. Each chunk's loss and gradient are computed together in the forward
pass, so the logits of a chunk (and the teacher's) are freed as soon as its loss is computed.

``model_ce_loss`` and ``model_kd_loss`` take the model itself: its final hidden states come from one forward pass
and the output layer is applied to one chunk of tokens at a time (qatcli/evaluation/head.py), its gradient with
respect to the hidden states (and to lm_head's weight, where that trains) accumulated chunk by chunk, so no
[tokens, vocab] tensor of the whole batch ever exists. ``ce_loss`` and ``kd_loss`` take logits a forward pass
already made whole; their gradient with respect to those logits is one buffer of the logits' shape.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from qatcli.evaluation.head import OutputHead, chunk_rows, forward_hidden, head_logits

# (first token, last token + 1, the student's logits of those tokens) -> (summed loss of those tokens,
# d loss / d logits of those tokens), both fp32
ChunkLoss = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _ChunkedLoss(torch.autograd.Function):
    """The loss of whole logits [tokens, vocab]; its gradient is one buffer of their shape."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, chunk_loss: ChunkLoss, count: int
    ) -> torch.Tensor:
        tokens, vocab = logits.shape
        rows = chunk_rows(vocab)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            loss, chunk_grad = chunk_loss(start, end, logits[start:end])
            total += loss
            if grad is not None:
                grad[start:end] = chunk_grad / count
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # in place: the buffer exists for this one backward (a second one fails autograd's version check)
        return grad.mul_(grad_output.to(grad.dtype)), None, None


class _ChunkedHeadLoss(torch.autograd.Function):
    """The loss of logits = head(hidden) [tokens, vocab], computed ``chunk_rows(vocab)`` tokens at a time.

    Each chunk's logits are made under a local autograd graph (the head's matmul and soft-capping, as the model's
    forward computes them, autocast included), and that graph gives, at once, the chunk's share of the gradients
    with respect to the hidden states, the head's weight and bias; the chunk is then freed. Backward only scales
    the accumulated gradients by its incoming gradient.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        softcap: float | None,
        chunk_loss: ChunkLoss,
        count: int,
    ) -> torch.Tensor:
        inputs = (hidden, weight, bias)
        needs = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in enumerate(inputs)]
        grads = [torch.zeros_like(t) if need else None for t, need in zip(inputs, needs, strict=True)]
        tokens = hidden.shape[0]
        rows = chunk_rows(weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            chunk = [hidden[start:end].detach(), weight.detach(), None if bias is None else bias.detach()]
            with torch.enable_grad():
                for i, need in enumerate(needs):
                    if need:
                        chunk[i].requires_grad_(True)
                logits = head_logits(chunk[0], chunk[1], chunk[2], softcap)
            loss, grad_logits = chunk_loss(start, end, logits.detach())
            total += loss
            wanted = [i for i, need in enumerate(needs) if need]
            if wanted:
                got = torch.autograd.grad(logits, [chunk[i] for i in wanted], grad_logits.to(logits.dtype))
                for i, g in zip(wanted, got, strict=True):
                    if i == 0:
                        grads[0][start:end] = g
                    else:
                        grads[i] += g
        ctx.needs = needs
        ctx.count = count
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return total / count

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        # in place: the buffers exist for this one backward (a second one fails autograd's version check)
        grads = [next(saved).mul_(grad_output.to(torch.float32) / ctx.count) if need else None for need in ctx.needs]
        return (*grads, None, None, None)


def _kd_chunk(teacher_rows: Callable[[int, int], torch.Tensor]) -> ChunkLoss:
    """KL(teacher || student) of a chunk: sum over its tokens of sum_v p_t (log p_t - log p_s), and its gradient."""

    def chunk_loss(start: int, end: int, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s = F.log_softmax(student.float(), dim=-1)
        log_t = F.log_softmax(teacher_rows(start, end).detach().float(), dim=-1)
        p_t = log_t.exp()
        return (p_t * (log_t - log_s)).sum(), log_s.exp_().sub_(p_t)

    return chunk_loss


def _ce_chunk(targets: torch.Tensor, predicted: torch.Tensor | None = None) -> ChunkLoss:
    """Cross-entropy of a chunk against ``targets`` (token ids), counting only the ``predicted`` rows."""

    def chunk_loss(start: int, end: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = F.log_softmax(logits.float(), dim=-1)
        target = targets[start:end, None]
        picked = log_p.gather(1, target)
        grad = log_p.exp_().scatter_add_(1, target, -torch.ones_like(log_p[:, :1]))
        if predicted is None:
            return -picked.sum(), grad
        keep = predicted[start:end, None]
        return -torch.where(keep, picked, 0.0).sum(), grad.masked_fill_(~keep, 0.0)

    return chunk_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens: distillation from the full-precision model."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return _ChunkedLoss.apply(student, _kd_chunk(lambda start, end: teacher[start:end]), student.shape[0])


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the predicted tokens (every position but each window's last)."""
    batch, seqlen, vocab = logits.shape
    flat = logits.reshape(-1, vocab)
    targets = ids.roll(-1, dims=1).reshape(-1)
    predicted = (torch.arange(seqlen, device=ids.device) < seqlen - 1).repeat(batch)
    return _ChunkedLoss.apply(flat, _ce_chunk(targets, predicted), batch * (seqlen - 1))


def _head_loss(hidden: torch.Tensor, head: OutputHead, chunk_loss: ChunkLoss, count: int) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedHeadLoss.apply(flat, head.weight, head.bias, head.softcap, chunk_loss, count)


def model_ce_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``ce_loss`` of ``model`` on ``ids``, the logits made a chunk of tokens at a time (the same value)."""
    result = forward_hidden(model, ids)
    if isinstance(result, torch.Tensor):
        return ce_loss(result, ids)
    hidden, head = result
    batch, seqlen = ids.shape
    targets = ids[:, 1:].reshape(-1)
    return _head_loss(hidden[:, :-1], head, _ce_chunk(targets), batch * (seqlen - 1))


def model_kd_loss(model: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``kd_loss`` of ``model`` against ``teacher`` on ``ids``, both models' logits made a chunk at a time.

    The teacher may sit on another device (the CPU, say) and hold other dtypes: each chunk of its logits comes
    to the student's device."""
    # the teacher first: its activations are gone before the student's are kept for backward
    with torch.no_grad():
        taught = forward_hidden(teacher, ids.to(next(teacher.parameters()).device))
    if isinstance(taught, torch.Tensor):
        flat_teacher = taught.reshape(-1, taught.shape[-1])
        teacher_rows = lambda start, end: flat_teacher[start:end].to(ids.device)  # noqa: E731
    else:
        t_hidden, t_head = taught
        t_flat = t_hidden.reshape(-1, t_hidden.shape[-1])
        teacher_rows = lambda start, end: t_head(t_flat[start:end]).to(ids.device)  # noqa: E731
    result = forward_hidden(model, ids)
    if isinstance(result, torch.Tensor):
        student = result.reshape(-1, result.shape[-1])
        return _ChunkedLoss.apply(student, _kd_chunk(teacher_rows), ids.numel())
    hidden, head = result
    return _head_loss(hidden, head, _kd_chunk(teacher_rows), ids.numel())


class StudentLoss(nn.Module):
    """The training loss of a batch as a module's forward, so that FSDP and DDP wrap the whole computation.

    The student is its one submodule. The teacher is held aside, not registered as a submodule, so that FSDP does
    not shard it and DDP does not synchronize it: every process keeps its own frozen copy.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, loss: str, device: torch.device) -> None:
        super().__init__()
        if loss == "kd" and teacher is None:
            raise ValueError("the kd loss needs the full-precision teacher model")
        self.model = model
        object.__setattr__(self, "teacher", teacher)
        self.loss = loss
        self.device = device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            # both losses make the logits a chunk of tokens at a time
            if self.loss == "ce":
                return model_ce_loss(self.model, ids)
            return model_kd_loss(self.model, self.teacher, ids)
