"""A second device on a machine that has none: tensors "on" ``STANDIN`` are CPU tensors that the mode tracks.

The code under test runs unchanged with ``device=STANDIN`` (``cpu:0``) and computes on the CPU, with the CPU's
results. Inside ``StandInDevice`` a tensor is on the stand-in device when its storage got there the ways it gets
onto a real accelerator: ``.to(STANDIN)`` (a copy), a factory given ``device=STANDIN``, or any op with an operand
there (its new outputs are there too); ``.to("cpu")`` and ``.cpu()`` copy it back. ``tensor.device`` answers
``STANDIN`` for such a tensor, so code that places tensors ``.to(x.device)`` behaves as on a GPU, and an op that
mixes the two devices (0-dim and empty operands apart) raises, as CUDA would. The mode counts the bytes of the storages
alive there, the way torch.cuda.memory_allocated counts, and their peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

STANDIN = torch.device("cpu", 0)
HOME = torch.device("cpu")
_DEVICE_GETTER = torch.Tensor.device.__get__
# Calls that take tensors from two devices on a GPU too: copies, indexing with index tensors on the CPU, and
# nn.Module.to's steps (a parameter given its moved data).
_CROSSING = (
    torch.Tensor.copy_,
    torch.Tensor.__setitem__,
    torch.Tensor.__getitem__,
    torch.Tensor.data.__set__,
    torch._has_compatible_shallow_copy_type,
)


class DeviceMismatch(RuntimeError):
    """An op whose operands are on the stand-in device and on the CPU: on a GPU it would fail."""


class StandInDevice(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # data pointer -> bytes, of the storages on the device
        self.allocated = 0
        self.peak = 0

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is on the stand-in device."""
        with torch._C.DisableTorchFunction():
            try:
                return t.untyped_storage().data_ptr() in self._live
            except (RuntimeError, NotImplementedError):  # no storage (a sparse or meta tensor)
                return False

    def _place(self, t: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in self._live:
            return
        self._live[ptr] = size
        self.allocated += size
        self.peak = max(self.peak, self.allocated)
        weakref.finalize(storage, self._free, ptr)  # the storage's memory is released: off the device

    def _free(self, ptr: int) -> None:
        self.allocated -= self._live.pop(ptr, 0)

    def _moved(self, t: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Tensor.to: a copy where the device changes, ``t`` itself where nothing does."""
        kwargs = dict(kwargs)
        copy = kwargs.pop("copy", False)
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if target is not None:
            device = STANDIN if self.holds(target) else HOME
        if device is not None and device not in (STANDIN, HOME):
            return t.to(*args, **kwargs, copy=copy)
        here = self.holds(t)
        there = here if device is None else device == STANDIN
        format = {} if memory_format is None else {"memory_format": memory_format}
        out = t.to(dtype or t.dtype, non_blocking, copy=copy or here != there, **format)
        if there and not (here and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()):
            self._place(out)
        return out

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func == _DEVICE_GETTER:
            return STANDIN if self.holds(args[0]) else func(*args)
        if func is torch.Tensor.to:
            return self._moved(args[0], args[1:], kwargs)
        if func is torch.Tensor.cpu:
            return args[0].to(HOME, copy=True) if self.holds(args[0]) else func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        there = [self.holds(t) for t in tensors]
        if any(there) and func not in _CROSSING:
            # a 0-dim operand may be on the CPU; an empty one has no storage to track
            stray = [t for t, on in zip(tensors, there, strict=True) if not on and t.dim() > 0 and t.numel() > 0]
            if stray:
                name = getattr(func, "__name__", str(func))
                raise DeviceMismatch(f"{name}: operands on {STANDIN} and on the CPU ({tuple(stray[0].shape)})")
        out = func(*args, **kwargs)
        device = kwargs.get("device")
        if device is None and not any(there):
            return out
        if device is not None and torch.device(device) != STANDIN:
            return out
        with torch._C.DisableTorchFunction():
            inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                with torch._C.DisableTorchFunction():
                    new = t.untyped_storage().data_ptr() not in inputs
                if new:  # an in-place op's or a view's storage stays where it is
                    self._place(t)
        return out
