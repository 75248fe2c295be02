"""Device selection, seeding, the C heap's policy and peak memory."""

from __future__ import annotations

import ctypes
import os
import random
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from qatcli.errors import QatcliError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise QatcliError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QatcliError(f"device '{name}' requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise QatcliError(f"unsupported device '{name}' (use auto, cpu, cuda or cuda:N)")
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    A training step on the CPU allocates and frees the same weight-sized tensors every step (gradients and, in
    QAT, each fake-quantized weight). By default glibc maps each of them fresh or trims the heap after the
    step, so every step pays the kernel's page faults and zeroing again: about 2% of a smollm2-135m QAT step
    (docs/results.md, step time). Peak memory is unchanged; the process just keeps what it peaked at.
    Elsewhere than glibc on Linux this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: bigger blocks are still mapped each time
    except (OSError, AttributeError):  # not glibc (musl, say): nothing to tune
        pass


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator; with ``deterministic``, also make torch refuse nondeterministic kernels."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# The command's peak CUDA allocation before the last reset of torch's counter (GPTQ and AWQ reset it to measure
# their own), in bytes.
_carried_cuda_peak = 0


def start_peak_memory(device: torch.device) -> None:
    """Start measuring the command's peak device memory: call it before the model is loaded."""
    global _carried_cuda_peak
    _carried_cuda_peak = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def keeping_peak_memory(device: torch.device) -> Iterator[None]:
    """Around a call that resets torch's peak counter for a measurement of its own: the command's peak so far
    still counts in ``peak_memory_mib``."""
    global _carried_cuda_peak
    if device.type == "cuda":
        _carried_cuda_peak = max(_carried_cuda_peak, torch.cuda.max_memory_allocated(device))
    yield


def peak_memory_mib(device: torch.device) -> dict[str, float | None]:
    """The process's peak resident memory, and the peak CUDA allocation on ``device`` since start_peak_memory."""
    cuda = None
    if device.type == "cuda":
        cuda = max(_carried_cuda_peak, torch.cuda.max_memory_allocated(device)) / 2**20
    return {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mib": None if cuda is None else round(cuda, 1),
    }
