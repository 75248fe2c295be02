"""Device selection, seeding and peak memory."""

from __future__ import annotations

import os
import random
import resource
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
