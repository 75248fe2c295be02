"""The calibration walk: windows carried through the decoder blocks one block at a time.

The windows enter the first block; every block sees the outputs of the blocks before it, as they are
after the caller has changed them (quantized, trained). Only the block being worked on is on the device,
next to the activations; the rest of the model waits on the CPU, except the parts outside the blocks
(embeddings, rotary tables), which run once to produce the first block's inputs. When the walk ends, the
whole model is back on the CPU: the caller moves it wherever it needs it next. GPTQ, AWQ and the block-wise
QAT stage all walk the model this way.

Layers after the blocks (lm_head) get their inputs from the last block's outputs: ``run_past_blocks`` runs the
model's own forward with every block replaying what the walk computed, so whatever the model does between its
blocks and lm_head (a final norm) runs as the model defines it, and no block is on the device for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from qatcli.quant.targets import decoder_blocks

Activations = list[tuple[torch.Tensor, dict[str, Any]]]

HOME = torch.device("cpu")  # where the model waits while the walk works on one block


class Stop(Exception):
    """Raised from a hook to end a forward pass once it has produced what was needed."""


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Put every parameter and buffer that is not in a decoder block on ``device``."""
    inside = {id(t) for t in [*blocks.parameters(), *blocks.buffers()]}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside:
                module._buffers[key] = buf.to(device)


def _block_inputs(
    model: nn.Module, first: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The hidden states and keyword arguments that reach the first block, one entry per batch."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(Stop):
                model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@contextlib.contextmanager
def _holding(block: nn.Module, prefix: str, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The block computing with ``weights`` (by full module name) in place of its own, restored after."""
    own: dict[nn.Module, torch.Tensor] = {}
    for name, module in block.named_modules(prefix=prefix.rstrip(".")):
        if name in weights:
            own[module] = module.weight.data
            module.weight.data = weights[name].to(module.weight.device, module.weight.dtype)
    try:
        yield
    finally:
        for module, weight in own.items():
            module.weight.data = weight


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _replaying(blocks: nn.ModuleList, output: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Inside the ``with`` block the blocks compute nothing: each returns its input, the last one ``output``, in
    the form the model's forward expects from them (a tuple or the hidden states alone)."""

    def passing(hidden: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        return (hidden,) if as_tuple else hidden

    def giving(*_args: Any, **_kwargs: Any) -> Any:
        return (output,) if as_tuple else output

    for block in blocks:
        block.forward = passing
    blocks[len(blocks) - 1].forward = giving
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward is back


class BlockWalk:
    """Walk ``windows`` ([n, seqlen] tokens) through the blocks of ``model``, ``batch_size`` windows a batch.

    Iterating yields (index, name prefix, block) with ``inputs`` holding what reaches that block; when the
    caller asks for the next block, the current one (as the caller left it) turns them into the next inputs,
    or the outputs the caller already asked for with ``outputs()`` (it must not change the block after).
    The last block's outputs are computed only where the caller asks for them; ``run_past_blocks`` then
    carries them through the rest of the model. With ``keep_fp``, ``fp_outputs`` holds the block's outputs
    before the caller changed anything, computed from the full-precision stream of activations (the unchanged
    model's own). Where the model's weights are not the full-precision ones already (a run that starts from
    RTN or GPTQ weights), ``fp_weights`` gives them, by module name: the full-precision stream computes with
    these instead.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        batch_size: int,
        device: torch.device,
        keep_fp: bool = False,
        fp_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.prefix, self.blocks = decoder_blocks(model)
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.device = device
        self.keep_fp = keep_fp
        self.fp_weights = fp_weights or {}
        model.to(HOME)
        _move_outside_blocks(model, self.blocks, device)
        with torch.no_grad():
            self.inputs: Activations = _block_inputs(model, self.blocks[0], windows, batch_size, device)
        self.fp_inputs: Activations = list(self.inputs) if keep_fp else []
        self.fp_outputs: list[torch.Tensor] = []
        self._block: nn.Module | None = None
        self._outputs: list[torch.Tensor] | None = None
        self._tuples = False  # whether the blocks return tuples (the hidden states first)
        self.final: list[torch.Tensor] | None = None  # the last block's outputs, where the caller asked for them

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The current block's outputs on its inputs, computed once: they become the next block's inputs."""
        if self._outputs is None:
            assert self._block is not None
            self._outputs = []
            for hidden, kwargs in self.inputs:
                out = self._block(hidden, **kwargs)
                self._tuples = isinstance(out, tuple)
                self._outputs.append(out[0] if self._tuples else out)
        return self._outputs

    def forget_outputs(self) -> None:
        """Drop the current block's outputs, so that ``outputs()`` computes them anew (its weights changed)."""
        self._outputs = None

    @torch.no_grad()
    def run_past_blocks(self) -> None:
        """Run the model over the windows once more, each block replaying the walk's outputs, so that hooks on
        the modules after the blocks (the final norm, lm_head) see what the blocks as the caller left them give;
        a hook may raise Stop to end a window batch's pass there. Only the parts outside the blocks come to the
        device, and they go home after. Needs the last block's outputs (``outputs()`` at the last block)."""
        assert self.final is not None, "run_past_blocks needs the last block's outputs"
        _move_outside_blocks(self.model, self.blocks, self.device)
        try:
            for batch, output in zip(self.windows.split(self.batch_size), self.final, strict=True):
                with _replaying(self.blocks, output, self._tuples), contextlib.suppress(Stop):
                    self.model(batch.to(self.device), use_cache=False)
        finally:
            _move_outside_blocks(self.model, self.blocks, HOME)

    def __iter__(self) -> Iterator[tuple[int, str, nn.Module]]:
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            block.to(self.device)
            self._block, self._outputs = block, None
            if self.keep_fp:
                with torch.no_grad(), _holding(block, f"{self.prefix}.{index}.", self.fp_weights):
                    self.fp_outputs = [run_block(block, hidden, kwargs) for hidden, kwargs in self.fp_inputs]
            yield index, f"{self.prefix}.{index}.", block
            if index < last:
                self.inputs = [(h, kw) for h, (_, kw) in zip(self.outputs(), self.inputs, strict=True)]
                if self.keep_fp:
                    self.fp_inputs = [(h, kw) for h, (_, kw) in zip(self.fp_outputs, self.fp_inputs, strict=True)]
            else:
                self.final = self._outputs
            self._block, self._outputs = None, None
            block.to(HOME)
        _move_outside_blocks(self.model, self.blocks, HOME)
