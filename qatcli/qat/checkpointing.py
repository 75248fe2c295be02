"""Per-block gradient checkpointing (qat.gradient_checkpointing): each decoder block keeps only its input for the
backward pass and runs its forward again there, so what a block keeps for backward otherwise (the activations
inside it, and each quantized layer's fake-quantized weight) lives for one block's backward, not the whole step.

The block's forward is checkpointed, not its call: hooks on the block stay outside, so under FSDP the block's
weights are gathered for the recomputation by FSDP's own pre-backward hook. torch.utils.checkpoint restores the
RNG state and autocast for the recomputation, which therefore computes the very tensors of the forward pass: the
losses and gradients are those of a step without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qatcli.quant.targets import decoder_blocks


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing to recompute for
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the ``with`` block (where ``enabled``), the decoder blocks of ``model`` recompute their forward in
    the backward pass."""
    if not enabled:
        yield
        return
    _, blocks = decoder_blocks(model)
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward is back
