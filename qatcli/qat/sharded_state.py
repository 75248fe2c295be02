"""The state of a distributed QAT run, saved with torch.distributed.checkpoint (DCP).

Every process writes its shards of the trainable tensors and of the optimizer's states into ``state-<step>.dcp/``;
process 0 adds the small rest (step, schedule, data position, RNG) as ``extra.pt``, then points
``state.dcp.json`` at that directory (an atomic replace, so an interrupted save leaves the previous state in
force) and removes the older ones. DCP reshards on load: a run saved by N processes resumes on any number of
them, or in one process without torchrun. The run directory must be on a file system that every process (every
node) sees.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from qatcli.outputs import write_json_atomic
from qatcli.qat.distributed import Distributed
from qatcli.run_layout import SHARDED_EXTRA_FILE, SHARDED_POINTER_FILE


def has_sharded_state(workdir: Path) -> bool:
    return (workdir / SHARDED_POINTER_FILE).is_file()


def save_sharded(
    workdir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    group: Distributed,
) -> None:
    """Save ``tensors`` (the trainable ones, sharded or not) and ``optimizer`` of the training ``module`` with DCP,
    and ``extra`` from process 0; every process calls it."""
    name = f"state-{step:06d}.dcp"
    target = workdir / name
    if group.is_main:
        shutil.rmtree(target, ignore_errors=True)  # the remains of a save of this step that was interrupted
    group.barrier()
    dcp.save({"trainable": tensors, "optimizer": get_optimizer_state_dict(module, optimizer)}, checkpoint_id=target)
    if group.is_main:
        torch.save(extra, target / SHARDED_EXTRA_FILE)
        write_json_atomic(workdir / SHARDED_POINTER_FILE, {"step": step, "dir": name})
        for old in workdir.glob("state-*.dcp"):
            if old.name != name:
                shutil.rmtree(old)
    group.barrier()


def load_sharded(
    workdir: Path, tensors: dict[str, torch.Tensor], module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load the saved state into ``tensors`` (in place) and ``optimizer``; return the ``extra`` of the save."""
    target = workdir / json.loads((workdir / SHARDED_POINTER_FILE).read_text())["dir"]
    state = {"trainable": tensors, "optimizer": get_optimizer_state_dict(module, optimizer)}
    with warnings.catch_warnings():  # resuming in one process is meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=target)
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
    return torch.load(target / SHARDED_EXTRA_FILE, map_location="cpu", weights_only=False)
