"""The training losses, computed over chunks of tokens so no full-vocabulary fp32 copy outlives its chunk.

Both losses are a cross-entropy against a target distribution p per token, whose gradient with respect to the
student's logits is softmax(logits) - p. Each chunk's loss and gradient are computed together in the forward
pass and the gradient is written into one buffer of the logits' shape and dtype: the buffer is all the backward
pass needs, so the logits themselves (and the teacher's) can be freed as soon as the loss is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Elements of a chunk's fp32 temporaries ([tokens, vocab]): 2**23 floats is 32 MiB each.
CHUNK_ELEMENTS = 2**23

# (first token, last token + 1) -> (summed loss of those tokens, d loss / d logits of those tokens), both fp32
ChunkLoss = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, chunk_loss: ChunkLoss, count: int
    ) -> torch.Tensor:
        tokens, vocab = logits.shape
        rows = max(1, CHUNK_ELEMENTS // vocab)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            loss, chunk_grad = chunk_loss(start, end)
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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens: distillation from the full-precision model."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])

    def chunk_loss(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        log_s = F.log_softmax(student[start:end].float(), dim=-1)
        log_t = F.log_softmax(teacher[start:end].detach().float(), dim=-1)
        p_t = log_t.exp()
        return (p_t * (log_t - log_s)).sum(), log_s.exp_().sub_(p_t)

    return _ChunkedLoss.apply(student, chunk_loss, student.shape[0])


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the predicted tokens (every position but each window's last)."""
    batch, seqlen, vocab = logits.shape
    flat = logits.reshape(-1, vocab)
    targets = ids.roll(-1, dims=1).reshape(-1)
    predicted = (torch.arange(seqlen, device=ids.device) < seqlen - 1).repeat(batch)

    def chunk_loss(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = F.log_softmax(flat[start:end].float(), dim=-1)
        target, keep = targets[start:end, None], predicted[start:end, None]
        loss = -torch.where(keep, log_p.gather(1, target), 0.0).sum()
        grad = log_p.exp_().scatter_add_(1, target, -torch.ones_like(log_p[:, :1]))
        return loss, grad.masked_fill_(~keep, 0.0)

    return _ChunkedLoss.apply(flat, chunk_loss, batch * (seqlen - 1))
