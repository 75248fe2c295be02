"""Replaying the outputs of a block's finished submodules across GPTQ's passes over the calibration batches.

True-sequential GPTQ runs a block over every batch once per group of layers (q/k/v, o, gate/up, down) and once
more for the block's outputs. Once every layer of a submodule (a Llama block's self_attn) and every layer before
it are quantized, the submodule's output on a batch no longer changes: it is recorded on the next pass and
returned on the passes after, so the attention runs twice instead of four times. The replayed output is the very
tensor a new forward would compute, so the codes do not change.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from torch import nn


class FinishedOutputs:
    """Within a ``with`` block, modules passed to ``freeze`` compute once per batch of ``block``'s inputs.

    A batch is known by the identity of the hidden-state tensor that enters ``block``: the walk keeps the same
    tensor for a batch across all passes over one block.
    """

    def __init__(self, block: nn.Module) -> None:
        self._block = block
        self._batch = 0
        self._recorded: dict[nn.Module, dict[int, Any]] = {}

    def _note_batch(self, _module: nn.Module, args: tuple) -> None:
        self._batch = id(args[0])

    def freeze(self, module: nn.Module) -> None:
        if module in self._recorded:
            return
        recorded = self._recorded[module] = {}
        compute = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._batch not in recorded:
                recorded[self._batch] = compute(*args, **kwargs)
            return recorded[self._batch]

        module.forward = forward

    def __enter__(self) -> FinishedOutputs:
        self._handle = self._block.register_forward_pre_hook(self._note_batch)
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _value: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._handle.remove()
        for module in self._recorded:
            del module.forward  # the instance attribute: the class's forward is back
        self._recorded.clear()
