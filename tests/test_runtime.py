"""The C heap's policy for training: freed weight-sized blocks stay in the process for the next step."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from qatcli.runtime import keep_freed_memory


class _MallInfo2(ctypes.Structure):
    _names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    _fields_ = [(name, ctypes.c_size_t) for name in _names]


def _glibc() -> ctypes.CDLL:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's heap policy is Linux-only")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    return libc


def test_freed_tensor_memory_is_kept_in_the_heap() -> None:
    libc = _glibc()
    keep_freed_memory()
    size = 24 << 20  # a smollm2 MLP weight is 3.5 MiB; the policy holds up to glibc's 32 MiB threshold
    mapped_before = libc.mallinfo2().hblkhd
    block = torch.empty(size // 4)
    assert libc.mallinfo2().hblkhd - mapped_before < size  # served from the heap, not a fresh mapping
    free_before = libc.mallinfo2().fordblks
    del block
    assert libc.mallinfo2().fordblks - free_before >= size  # kept for the next step, not handed back
