"""Replaying the outputs of a block's finished submodules across GPTQ's passes over the calibration batches.

True-sequential GPTQ runs a block over every batch once per group of layers (q/k/v, o, gate/up, down) and once
more for the block's outputs. Once every layer of a submodule (a Llama block's self_attn) and every layer before
it are quantized, the submodule's output on a batch no longer changes: it is recorded on the next pass and
returned on the passes after. The replayed output is the very tensor a new forward would compute, so the codes do
not change.

A submodule whose last step is a single layer quantized on its own (o_proj in the attention, down_proj in the
MLP) gets there one pass sooner: the layer's inputs are kept on the pass that collects its Hessian, and from the
next pass on the submodule is computed as that layer on the kept input, without the attention or gate, up and
the activation before it. That holds only where the layer is the submodule's last step; the first batch computes
the submodule in full and checks that the two agree bit for bit, and falls back to the full forward if they do
not. With both, the attention runs in full on one pass per block (o_proj's) instead of four, and the MLP on
one (down_proj's) instead of two.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import torch
from torch import nn

# Keep a layer's inputs only where they take at most this share of the memory free on their device.
KEEP_SHARE = 0.5


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``; 0 where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


class FinishedOutputs:
    """Within a ``with`` block, modules passed to ``freeze`` compute once per batch of ``block``'s inputs.

    A batch is known by the identity of the hidden-state tensor that enters ``block``: the walk keeps the same
    tensor for a batch across all passes over one block.
    """

    def __init__(self, block: nn.Module) -> None:
        self._block = block
        self._batch = 0
        self._frozen: set[nn.Module] = set()
        self._replaced: set[nn.Module] = set()  # modules whose forward is an instance attribute set here
        self._kept: dict[nn.Module, dict[int, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _note_batch(self, _module: nn.Module, args: tuple) -> None:
        self._batch = id(args[0])

    def _replace_forward(self, module: nn.Module, forward: Any) -> None:
        self._replaced.add(module)
        module.forward = forward

    def freeze(self, module: nn.Module) -> None:
        if module in self._frozen:
            return
        self._frozen.add(module)
        recorded: dict[int, Any] = {}
        compute = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._batch not in recorded:
                recorded[self._batch] = compute(*args, **kwargs)
            return recorded[self._batch]

        self._replace_forward(module, forward)

    def keep_inputs(self, layer: nn.Module, nbytes: int, device: torch.device) -> bool:
        """From the next pass on, keep ``layer``'s input on each batch, if ``nbytes`` of them fit on ``device``.
        Call it before the pass's own hooks are registered, so the input is kept before they stop the pass."""
        if nbytes > KEEP_SHARE * free_bytes(device):
            return False
        kept = self._kept[layer] = {}

        def keep(_module: nn.Module, args: tuple) -> None:
            kept.setdefault(self._batch, args[0])

        self._handles.append(layer.register_forward_pre_hook(keep))
        return True

    def shortcut(self, module: nn.Module, last: nn.Module) -> None:
        """From now on compute ``module`` as ``last`` on its kept input (``keep_inputs``), once the first batch
        has shown, computing ``module`` in full, that the two give the same tensor. A module that returns a
        tuple (a Llama attention: its output and None for the attention weights) qualifies where the rest of
        the tuple is None."""
        kept = self._kept.get(last)
        if not kept:
            return
        compute = module.forward
        verdict: bool | None = None  # the first batch's check
        arity = 0  # the tuple's length, where the module returns one

        def forward(*args: Any, **kwargs: Any) -> Any:
            nonlocal verdict, arity
            if verdict:
                out = last(kept[self._batch])
                return (out, *[None] * (arity - 1)) if arity else out
            out = compute(*args, **kwargs)
            if verdict is None:
                first, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
                arity = len(out) if isinstance(out, tuple) else 0
                same = isinstance(first, torch.Tensor) and torch.equal(first, last(kept[self._batch]))
                verdict = same and all(r is None for r in rest)
            return out

        self._replace_forward(module, forward)

    def __enter__(self) -> FinishedOutputs:
        self._handles.append(self._block.register_forward_pre_hook(self._note_batch))
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._replaced:
            del module.forward  # the instance attribute: the class's forward is back
        self._replaced.clear()
        self._frozen.clear()
        self._kept.clear()
