"""A causal LM's output layer applied a chunk of tokens at a time: no batch-sized full-vocabulary logits.

A forward pass multiplies every position's final hidden state by the vocabulary matrix: [batch, seqlen, vocab]
floats, 2 GiB in fp32 for 4 x 512 tokens of gemma3-270m's 262k vocabulary, and as much again for each fp32
temporary the loss makes of them. Perplexity and the QAT losses need the logits of a few positions at a time only,
so ``forward_hidden`` runs the model with ``logits_to_keep=1`` (its forward computes the last position's logits
only), keeps the final hidden states its base model returns (a forward hook), and returns them with the output
layer (``OutputHead``: lm_head's weight, its bias, and the final soft-capping of Gemma 2 and 3) that the caller
applies to ``chunk_rows(vocab)`` positions at a time.

The model's own logits of the last position check every call that ``OutputHead`` computes what the model's forward
does; a model whose forward does something else to its logits (a logit scale, say) fails that check once and from
then on gets its full logits from its forward (``forward_hidden`` returns them instead). A fake-quantized lm_head
(QAT with quant.lm_head) is not run for that check (its forward records its input): there the base model runs
alone and the head is lm_head with the config's soft-capping.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Elements of a chunk's fp32 temporaries ([tokens, vocab]): 2**23 floats is 32 MiB each.
CHUNK_ELEMENTS = 2**23

# Models whose forward the output head did not reproduce: they get their logits from their forward.
_FULL_LOGITS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: the chunk's [tokens, vocab] logits hold about CHUNK_ELEMENTS floats."""
    return max(1, CHUNK_ELEMENTS // vocab)


@dataclass
class OutputHead:
    """logits = lm_head(hidden), soft-capped (tanh(logits / cap) * cap) where the config says so."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.weight, self.bias, self.softcap)


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> torch.Tensor:
    """The logits of ``hidden`` rows, computed as the transformers models do (Gemma 2/3 for the soft-capping).
    A head held in a narrower dtype than the hidden states (QAT's qat.frozen_dtype) computes in its own, as its
    module does there: an fp32 copy of the vocabulary matrix for every chunk would outweigh what it saves."""
    dtype = weight.dtype if weight.element_size() < hidden.element_size() else hidden.dtype
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _head_module(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _head_weight(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias ``head`` multiplies ``hidden`` by, obtained once for the whole batch, or None for a
    layer of unknown kind. A fake-quantized layer (``weight_for``) gives its weight in its current mode and sees
    its input as its forward would; a GPTQ-packed one (``dequantized_weight``) dequantizes once."""
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if hasattr(head, "weight_for"):
        return head.weight_for(hidden), bias
    if hasattr(head, "dequantized_weight"):
        return head.dequantized_weight(), bias
    if type(head) is nn.Linear:
        return head.weight, bias
    return None


def _checkable(head: nn.Module) -> bool:
    """Whether computing the last position's logits through the model's own head has no side effect: not for a
    fake-quantized head, whose forward records its input (estimators that calibrate) or its probe weight."""
    return not hasattr(head, "weight_for")


def forward_hidden(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, OutputHead] | torch.Tensor:
    """The final hidden states [batch, seqlen, hidden] of ``ids`` with the output head that turns them into the
    model's logits; or, for a model that head does not describe, the model's full logits [batch, seqlen, vocab]."""
    head_module = _head_module(model)
    base = getattr(model, "base_model", model)
    if (
        model in _FULL_LOGITS
        or head_module is None
        or base is model
        or "logits_to_keep" not in inspect.signature(model.forward).parameters
    ):
        return model(ids, use_cache=False).logits
    check = _checkable(head_module)
    if check:
        hidden, logits = _run_keeping_hidden(model, base, ids)
        if hidden is None:
            _FULL_LOGITS.add(model)
            return model(ids, use_cache=False).logits
    else:  # the base model alone: the head's forward is not run at all
        hidden, logits = _last_hidden(base(input_ids=ids, use_cache=False)), None
    weights = _head_weight(head_module, hidden)
    if weights is None:
        _FULL_LOGITS.add(model)
        return model(ids, use_cache=False).logits
    head = OutputHead(*weights, getattr(getattr(model, "config", None), "final_logit_softcapping", None))
    if logits is not None and not _same_logits(head, hidden, logits):
        _FULL_LOGITS.add(model)
        return model(ids, use_cache=False).logits
    return hidden, head


def _last_hidden(output: object) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]  # type: ignore[index]


def _run_keeping_hidden(
    model: nn.Module, base: nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The model's forward computing the last position's logits only, and the final hidden states its base model
    returned (None where the base model ran other than once)."""
    captured: list[torch.Tensor] = []
    handle = base.register_forward_hook(lambda module, args, output: captured.append(_last_hidden(output)))
    try:
        logits = model(ids, use_cache=False, logits_to_keep=1).logits
    finally:
        handle.remove()
    return (captured[0] if len(captured) == 1 else None), logits


@torch.no_grad()
def _same_logits(head: OutputHead, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``head`` gives the model's own logits of the last position (to float rounding)."""
    ours = head(hidden[:, -1:].detach()).float()
    theirs = logits.detach().float()
    if ours.shape != theirs.shape:
        return False
    return bool((ours - theirs).norm() <= 1e-3 * theirs.norm() + 1e-6)


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The next-token NLL of every position but each window's last: [batch, seqlen - 1] fp32, the logits
    computed ``chunk_rows`` tokens at a time (see the module docstring)."""
    batch, seqlen = ids.shape
    targets = ids[:, 1:].reshape(-1)
    result = forward_hidden(model, ids)
    if isinstance(result, torch.Tensor):  # full logits: still one chunk at a time through the fp32 NLL
        flat = result[:, :-1].reshape(-1, result.shape[-1])
        rows_of = lambda start, end: flat[start:end]  # noqa: E731
        vocab = result.shape[-1]
    else:
        hidden, head = result
        flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        rows_of = lambda start, end: head(flat_hidden[start:end])  # noqa: E731
        vocab = head.vocab
    nll = torch.empty(targets.numel(), dtype=torch.float32, device=ids.device)
    rows = chunk_rows(vocab)
    for start in range(0, targets.numel(), rows):
        end = min(start + rows, targets.numel())
        nll[start:end] = F.cross_entropy(rows_of(start, end).float(), targets[start:end], reduction="none")
    return nll.view(batch, seqlen - 1)
