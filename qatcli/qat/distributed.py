"""QAT over several processes started by torchrun: the process group, the student's sharding and the data split.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with them ``qatcli qat`` joins a process group (nccl on CUDA,
gloo on the CPU) and each process computes on cuda:LOCAL_RANK (or the CPU). Every process draws the same global
batch of qat.batch_size windows and computes the loss of its own batch_size / world_size of them; FSDP and DDP
average the gradients over the processes, so every update is the one-process update of the whole batch, to float
rounding. Only process 0 prints, writes files and, at the end, holds the whole trained model.

FSDP2 (``fully_shard``) and DTensor are imported where they are used: they need torch 2.6, and one-process runs
work with older versions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qatcli.config import QATConfig
from qatcli.errors import QatcliError
from qatcli.progress import silence
from qatcli.qat.fake_quant import FakeQuantLinear
from qatcli.quant.grid import to_fp16_grid
from qatcli.quant.layer import LayerQuant, make_layer_quant
from qatcli.quant.targets import decoder_blocks
from qatcli.runtime import resolve_device

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_world_size() -> int | None:
    """The number of processes torchrun started this one among; None outside torchrun."""
    if not all(v in os.environ for v in LAUNCHER_VARIABLES):
        return None
    return int(os.environ["WORLD_SIZE"])


def distributed_problems(qat: QATConfig, world_size: int, block_stage: bool) -> list[str]:
    """What a run over ``world_size`` processes cannot do (one line each); ``block_stage``: whether it runs."""
    problems = []
    sizes = [("qat.batch_size", qat.batch_size)]
    if block_stage:  # every batch of the stage, its last (nsamples % batch_size windows) too, splits evenly
        sizes += [("qat.block.batch_size", qat.block.batch_size), ("qat.block.nsamples", qat.block.nsamples)]
    for key, size in sizes:
        if size % world_size:
            problems.append(f"under torchrun, {key} {size} must be a multiple of the {world_size} processes")
    alone = [
        label
        for label, used in (
            ("qat.estimator jacobian", qat.estimator == "jacobian"),
            ("qat.variance_reduction", qat.variance_reduction),
            ("qat.eval_every", qat.eval_every > 0),
            ("qat.record_every", qat.record_every > 0),
        )
        if used
    ]
    if alone:
        problems.append(f"{', '.join(alone)}: one process only, run without torchrun")
    return problems


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group, and how the student is split (qat.parallel)."""

    rank: int
    world_size: int
    device: torch.device
    parallel: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch: the rank-th of world_size equal slices of its rows."""
        rows = batch.shape[0] // self.world_size
        return batch[self.rank * rows : (self.rank + 1) * rows]

    def mean(self, value: float) -> float:
        """``value`` averaged over the processes (the loss of the global batch from each process's share)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether any process says yes: a Ctrl-C that reached some processes stops all at the same step."""
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    @torch.no_grad()
    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """The gradients of ``params`` averaged over the processes, in place: every process then takes the same
        step (the block stage, whose blocks are not wrapped in FSDP or DDP)."""
        for p in params:
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    @torch.no_grad()
    def broadcast(self, module: nn.Module) -> None:
        """Process 0's parameters and buffers on every process. GPTQ runs whole on every process, and on GPUs its
        last bits may differ between processes; the shards must all come from one model."""
        for t in [*module.parameters(), *module.buffers()]:
            moved = t.data.to(self.device)
            dist.broadcast(moved, src=0)
            if moved is not t.data:
                t.data.copy_(moved)

    def wrap(self, module: nn.Module, model: nn.Module) -> nn.Module:
        """``module`` (the training loss, holding ``model``) made distributed: FSDP2 with one unit per decoder
        block and the rest (embeddings, norm, lm_head) in the root unit, or DDP."""
        if self.parallel == "ddp":
            module.to(self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(module, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        _, blocks = decoder_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module

    def gather(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of ``model``'s state dict whole, on process 0's CPU; empty on the other processes."""
        state = {}
        for name, t in model.state_dict().items():
            whole = full_value(t)
            if self.is_main:
                state[name] = whole.detach().cpu()
            del whole
        return state


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (an FSDP parameter, its gradient norm) as one ordinary tensor, gathered from every process;
    any other tensor as it is."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def join(device_name: str, qat: QATConfig) -> tuple[Distributed | None, torch.device]:
    """The process group torchrun's environment describes (None outside torchrun) and this process's device."""
    device = resolve_device(device_name)
    world_size = launched_world_size()
    if world_size is None:
        return None, device
    if device.type == "cuda":
        if device.index is not None:
            raise QatcliError(
                f"device '{device_name}': under torchrun each process takes cuda:LOCAL_RANK; set device to auto or cuda"
            )
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if rank != 0:
        silence()
        logging.getLogger().setLevel(logging.WARNING)
    return Distributed(rank, world_size, device, qat.parallel), device


def leave(group: Distributed | None) -> None:
    if group is not None and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first(group: Distributed | None) -> Iterator[None]:
    """Process 0 does the work first, then the others: what it converts or samples once into the cache
    (a model alias, generated data), they read."""
    if group is not None and not group.is_main:
        group.barrier()
    yield
    if group is not None and group.is_main:
        group.barrier()


def unsharded_copy(
    model: nn.Module, fakes: dict[str, FakeQuantLinear], state: dict[str, torch.Tensor]
) -> tuple[nn.Module, dict[str, LayerQuant]]:
    """A plain model holding the gathered ``state`` of ``model`` on the CPU, with ordinary Linear layers (the
    trained latent weights) where ``fakes`` are, and the grid each of them learned."""
    layers = {}
    for name, fake in fakes.items():
        scales, zeros, g_idx = (state.pop(f"{name}.{key}") for key in ("scales", "zeros", "g_idx"))
        layers[name] = make_layer_quant(fake.spec, to_fp16_grid(scales), zeros, g_idx, fake.act_order)
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict(state, assign=True)
    # buffers outside the state dict (rotary tables) are never sharded: every process holds them whole
    for name, buf in model.named_buffers():
        if name not in state:
            owner, _, key = name.rpartition(".")
            plain.get_submodule(owner)._buffers[key] = buf.detach().cpu().clone()
    plain.tie_weights()
    return plain.eval(), layers
