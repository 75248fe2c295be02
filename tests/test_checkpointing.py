"""Per-block gradient checkpointing (qat.gradient_checkpointing) recomputes the blocks and changes nothing else.

The recomputation runs the very ops of the forward pass on the same inputs, with the RNG state restored, so on
the CPU every float is the same: the losses, gradients and trained weights are compared bit for bit, with each
estimator (jacobian calibrates its layers through the model, which must not be recomputed).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from qatcli.config import QATConfig
from qatcli.data.mix import MixedTokens, MixPart
from qatcli.qat.checkpointing import checkpointed_blocks
from qatcli.qat.estimators import Estimator, make_estimator
from qatcli.qat.fake_quant import FakeQuantLinear, prepare_qat
from qatcli.qat.losses import StudentLoss
from qatcli.qat.trainer import Trainer
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets
from qatcli.run_layout import METRICS_FILE

CPU = torch.device("cpu")
VOCAB = 300


Student = tuple[LlamaForCausalLM, nn.Module, dict[str, FakeQuantLinear], Estimator, QATConfig]


def student(estimator: str) -> Student:
    """A tiny random Llama with fake-quantized 2-bit layers, its full-precision teacher, their estimator and the
    recipe's qat section."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB)).eval()
    teacher = copy.deepcopy(model)
    qat = QATConfig(estimator=estimator, batch_size=2, seqlen=32, lr=1e-3, scale_lr=1e-3, save_every=100)
    layers = quantize_rtn(find_targets(model, [], []), QuantSpec(2, 32), "minmax")
    rule = make_estimator(qat, 0)
    return model, teacher, prepare_qat(model, layers, rule), rule, qat


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("estimator", ["ste", "fourier", "jacobian"])
def test_gradients_are_the_same_and_the_blocks_run_twice(estimator: str) -> None:
    ids = tokens()[:64].reshape(2, 32)
    grads, calls = [], []
    for enabled in (False, True):
        model, teacher, fakes, _, _ = student(estimator)
        mlp_runs: list[None] = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, runs=mlp_runs: runs.append(None))
        with checkpointed_blocks(model, enabled):
            loss = StudentLoss(model, teacher, "kd", CPU)(ids)
            loss.backward()
        grads.append({"loss": loss.detach(), **{n: f.weight.grad for n, f in fakes.items()}})
        grads[-1].update({f"{n}.scales": f.scales.grad for n, f in fakes.items()})
        calls.append(len(mlp_runs))
    assert calls == [1, 2]  # the first block's MLP ran once more, in the backward pass
    for name, value in grads[0].items():
        assert torch.equal(grads[1][name], value), name
    assert "forward" not in vars(model.model.layers[0])  # the block's own forward is back


@pytest.mark.parametrize("estimator", ["ste", "fourier", "jacobian"])
def test_training_steps_are_the_same(estimator: str, tmp_path: Path) -> None:
    runs = []
    for enabled in (False, True):
        model, teacher, fakes, rule, qat = student(estimator)
        qat.steps, qat.gradient_checkpointing = 3, enabled
        workdir = tmp_path / str(enabled)
        workdir.mkdir()
        mlp_runs: list[None] = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, runs=mlp_runs: runs.append(None))
        Trainer(model, fakes, rule, teacher, MixedTokens([tokens()], [MixPart("t", 1.0)]), qat, 0, CPU, workdir).train()
        losses = [json.loads(line)["loss"] for line in (workdir / METRICS_FILE).read_text().splitlines()]
        weights = {n: (f.weight.detach().clone(), f.scales.detach().clone()) for n, f in fakes.items()}
        runs.append((losses, weights, len(mlp_runs)))
    (losses, trained, calls), (checkpointed_losses, checkpointed, checkpointed_calls) = runs
    assert checkpointed_calls == calls + 3  # one recomputation a step; jacobian's calibration is not recomputed
    assert checkpointed_losses == losses and len(losses) == 3
    for name, (weight, scales) in trained.items():
        assert torch.equal(checkpointed[name][0], weight) and torch.equal(checkpointed[name][1], scales), name
