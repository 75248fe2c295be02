"""Device selection, seeding and peak memory."""

from __future__ import annotations

import os
import random
import resource

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


def peak_memory_mib(device: torch.device) -> dict[str, float | None]:
    """The process's peak resident memory, and the peak CUDA allocation on ``device`` since its last reset."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mib": None if cuda is None else round(cuda, 1),
    }
