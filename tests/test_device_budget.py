"""GPTQ, AWQ and the block-wise QAT stage hold one decoder block at a time on the device, never the whole model.

There is no GPU here, so the device is a stand-in (tests/standin_device.py): the real code runs with
``device=cpu:0`` and computes on the CPU, while a torch function mode tracks which storages went to the device,
the ways they get onto a GPU (``.to``, factories given the device, ops on tensors there), answers ``.device`` for
them as a GPU would, refuses ops that mix the two devices, and counts the bytes alive there. Three checks:

- at every module call, the model's parameters and buffers on the device belong to one block at most (the rest
  of what is there lies outside the blocks: embeddings, final norm, lm_head, rotary tables), and every block
  was there in turn;
- the peak of everything on the device (weights, activations, Hessians) is the same for a model of 2 blocks and
  one of 4 equal blocks: it does not grow with the depth, so the whole model never has to fit on the device;
- when the call returns, nothing of the model is on the device (the caller moves it where it needs it), and the
  results are the bit-identical results of the same call on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama_config
from standin_device import STANDIN, StandInDevice
from torch import nn
from transformers import LlamaForCausalLM

from qatcli.config import AWQOptions, GPTQOptions, QATConfig
from qatcli.qat.block import train_blocks
from qatcli.quant.awq import quantize_awq
from qatcli.quant.gptq_model import quantize_gptq
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, apply_fake_quant
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import decoder_blocks, find_targets, untie_lm_head

CPU = torch.device("cpu")
VOCAB = 300


def tiny(layers: int) -> LlamaForCausalLM:
    """A random tiny Llama whose lm_head shares the embeddings' weight, as smollm2's does."""
    config = tiny_llama_config(VOCAB)
    config.num_hidden_layers, config.tie_word_embeddings = layers, True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def windows(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 32), generator=torch.Generator().manual_seed(seed))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@contextmanager
def watching(model: nn.Module, device: StandInDevice) -> Iterator[set[int]]:
    """At every module call, check that the model's tensors on the device belong to one block at most; yields the
    set of the blocks seen there."""
    _, blocks = decoder_blocks(model)
    seen: set[int] = set()

    def check(_module: nn.Module, _args: Any) -> None:
        there = {i for i, block in enumerate(blocks) if any(device.holds(t) for t in _tensors(block))}
        assert len(there) <= 1, f"blocks {sorted(there)} are on the device together"
        seen.update(there)

    handle = nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield seen
    finally:
        handle.remove()


Run = Callable[[nn.Module, torch.device], dict[str, LayerQuant]]


def on_the_device(run: Run, layers: int) -> tuple[dict[str, torch.Tensor], int]:
    """The codes ``run`` gives a fresh tiny model of ``layers`` blocks with the stand-in device, and the peak bytes
    there (after every check of the module docstring but the equality with the CPU's results)."""
    model = tiny(layers)
    with StandInDevice() as device, watching(model, device) as seen:
        quantized = run(model, STANDIN)
        assert seen == set(range(layers))  # every block went to the device
        assert not any(device.holds(t) for t in _tensors(model)), "the model was left on the device"
    return codes(model, quantized), device.peak


def codes(model: nn.Module, layers: dict[str, LayerQuant]) -> dict[str, torch.Tensor]:
    return {name: lq.codes(model.get_submodule(name).weight.detach()) for name, lq in layers.items()}


def gptq(model: nn.Module, device: torch.device) -> dict[str, LayerQuant]:
    targets = find_targets(model, [], [], lm_head=True)  # lm_head's input comes through the final norm
    untie_lm_head(model)
    return quantize_gptq(model, targets, QuantSpec(4, 32), GPTQOptions(batch_size=2), "minmax", windows(), device)[0]


def awq(model: nn.Module, device: torch.device) -> dict[str, LayerQuant]:
    targets = find_targets(model, [], [])
    return quantize_awq(model, targets, QuantSpec(3, 32), AWQOptions(batch_size=2), "minmax", windows(), device)[0]


def block_stage(workdir: Path) -> Run:
    def run(model: nn.Module, device: torch.device) -> dict[str, LayerQuant]:
        layers = quantize_rtn(find_targets(model, [], []), QuantSpec(2, 32), "minmax")
        fp_weights = apply_fake_quant(model, layers)  # a start from RTN: the fp stream computes with these
        qat = QATConfig()
        qat.block.batch_size = 2
        return train_blocks(model, layers, windows(4), qat, 1, 0, device, workdir, fp_weights, save=False)[0]

    return run


@pytest.mark.parametrize("method", ["gptq", "awq", "block"])
def test_one_block_at_a_time_on_the_device(method: str, tmp_path: Path) -> None:
    run = {"gptq": gptq, "awq": awq, "block": block_stage(tmp_path)}[method]
    result, peak = on_the_device(run, layers=2)
    _, deeper_peak = on_the_device(run, layers=4)
    assert deeper_peak == peak  # the same on the device for twice the blocks
    model = tiny(2)
    on_cpu = codes(model, run(model, CPU))
    assert result.keys() == on_cpu.keys()
    for name, value in on_cpu.items():
        assert torch.equal(result[name], value), name
    print(f"{method}: at most {peak / 2**10:.0f} KiB on the device for 2 blocks and for 4")


def test_the_stand_in_device_sees_a_whole_model_on_it() -> None:
    """The checks above would fail for code that holds the whole model on the device (as these calls once ended)."""
    model = tiny(2)
    device = StandInDevice()
    with device, pytest.raises(AssertionError, match="on the device together"), watching(model, device):
        model.to(STANDIN)(windows(1))
