"""qatcli qat under torchrun: two CPU processes (gloo) train as one process does, resume and export.

Two processes compute each step's loss on two windows each instead of four in one process, so the sums inside the
loss and the gradients are taken in another order, and the gradients are averaged over the processes: every float
may differ from the one-process run in its last bits (float32, relative 6e-8 a rounding). Over the batch's
4 x 64 tokens that gives about 1e-7 relative on the losses (measured 9e-8), so they must agree to 1e-5. AdamW's
update divides the averaged moments by their root, so such differences shrink to below the float32 spacing of the
weights: the latent weights and the scales are checked to 1e-6 (a thousandth of one step of lr 1e-3; measured
equal, bit for bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_export_is_exact, run_cli, tiny_llama_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error
from test_qat import qat_args
from torch import nn
from transformers import LlamaForCausalLM

from qatcli.config import QATConfig
from qatcli.qat.distributed import unsharded_copy
from qatcli.qat.estimators import make_estimator
from qatcli.qat.fake_quant import convert_qat, prepare_qat
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

CPU = torch.device("cpu")
STEPS = ("--steps", "6", "--save-every", "2")


def one_thread(*command: str) -> subprocess.CompletedProcess:
    """Every process on one thread: the float results of a matmul may depend on the thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)


def cli(*args: str) -> subprocess.CompletedProcess:
    return one_thread("-m", "qatcli", *args)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``qatcli`` started by torchrun as two processes on this machine."""
    return one_thread("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qatcli", *args)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path) -> None:
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=0)
    assert_same_weights(one, two)


def assert_same_weights(one: Path, two: Path) -> None:
    for name in ("latent.safetensors", "quant.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def one_process(tiny_model_dir: Path, sotu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same global batch of 4 windows in one process."""
    out = tmp_path_factory.mktemp("one") / "qat"
    result = cli(*qat_args(tiny_model_dir, sotu, out, *STEPS))
    assert result.returncode == 0, result.stderr
    return out


def test_two_processes_train_as_one(one_process: Path, tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    result = torchrun(*qat_args(tiny_model_dir, sotu, out, *STEPS))
    assert result.returncode == 0, result.stderr
    assert_same_training(one_process, out)
    assert json.loads((out / "qatcli.json").read_text())["metrics"]["processes"] == 2
    assert result.stdout.count("qatcli qat ->") == 1  # the table, from process 0 alone
    assert not (tmp_path / "fsdp.run").exists()


def test_two_processes_split_the_block_stage_as_one(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    """Each process walks 2 of every batch of 4 windows and the gradients are averaged: each step is the
    one-process step up to the rounding of the batch's sums (the module's doc), and the next block's inputs of a
    process's windows are the one-process walk's, so the losses of the blocks agree to 1e-5 and the trained
    weights to 1e-6 as in the end-to-end steps (measured: 3e-8 relative, and bit for bit)."""
    blocks = ("--steps", "0", "--block-epochs", "2", "--set", "qat.block.nsamples=16", "--set", "qat.block.seqlen=64")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(*qat_args(tiny_model_dir, sotu, one, *blocks)).returncode == 0
    result = torchrun(*qat_args(tiny_model_dir, sotu, two, *blocks))
    assert result.returncode == 0, result.stderr
    reports = [json.loads((run / "qatcli.json").read_text())["metrics"]["block_loss"] for run in (one, two)]
    assert reports[0]["end"]["1"] < reports[0]["start"]["1"]
    torch.testing.assert_close(reports[1], reports[0], rtol=1e-5, atol=0)
    assert_same_weights(one, two)


@pytest.fixture(scope="module")
def one_process_bf16(tiny_model_dir: Path, sotu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-bf16") / "qat"
    result = cli(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--frozen-dtype", "bfloat16"))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_bf16_frozen_parts_train_as_one_process(
    one_process_bf16: Path, tiny_model_dir: Path, sotu: Path, tmp_path: Path, parallel: str
) -> None:
    """FSDP gathers a block of fp32 latent weights and bf16 norms as bytes, and shards the bf16 root unit."""
    out = tmp_path / parallel
    bf16 = ("--frozen-dtype", "bfloat16")
    result = torchrun(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--parallel", parallel, *bf16))
    assert result.returncode == 0, result.stderr
    assert_same_training(one_process_bf16, out)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_gradient_checkpointing_trains_as_one_process_without_it(
    one_process: Path, tiny_model_dir: Path, sotu: Path, tmp_path: Path, parallel: str
) -> None:
    """Under FSDP a block's weights are gathered again for its recomputation (FSDP's pre-backward hook, outside the
    checkpointed forward); under DDP the recomputed block's gradients reach the all-reduce as without it."""
    out = tmp_path / parallel
    result = torchrun(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--parallel", parallel, "--gradient-checkpointing"))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "qatcli.json").read_text())["recipe"]["qat"]["gradient_checkpointing"] is True
    assert_same_training(one_process, out)


@pytest.mark.parametrize("resume", ["ddp", "one process"])
def test_a_sharded_state_resumes_and_exports(
    one_process: Path, tiny_model_dir: Path, sotu: Path, tmp_path: Path, resume: str
) -> None:
    out = tmp_path / "qat"
    first = torchrun(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--stop-after", "3"))
    assert first.returncode == 0, first.stderr
    workdir = tmp_path / "qat.run"
    assert json.loads((workdir / "state.dcp.json").read_text()) == {"step": 3, "dir": "state-000003.dcp"}
    assert not (workdir / "state.pt").exists() and not out.exists()

    if resume == "ddp":  # FSDP's shards read back into DDP's whole copies: the state is the layout's own
        second = torchrun(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--resume", "--parallel", "ddp"))
    else:
        second = cli(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--resume"))
    assert second.returncode == 0, second.stderr
    assert_same_training(one_process, out)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))

    assert_export_is_exact(out, tmp_path / "gptq")


def test_a_one_process_state_does_not_resume_under_torchrun(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    assert cli(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--stop-after", "2")).returncode == 0
    result = torchrun(*qat_args(tiny_model_dir, sotu, out, *STEPS, "--resume"))
    assert result.returncode != 0
    assert "was saved by one process; continue it without torchrun" in result.stderr


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--batch-size", "3"], "qat.batch_size 3 must be a multiple of the 2 processes"),
        (["--block-epochs", "1", "--set", "qat.block.nsamples=9"], "qat.block.nsamples 9 must be a multiple of the"),
        (["--estimator", "jacobian"], "qat.estimator jacobian: one process only, run without torchrun"),
        (["--eval-every", "2", "--eval-data", "x.txt"], "qat.eval_every: one process only"),
        (["--parallel", "zero3"], "qat.parallel must be one of fsdp, ddp"),
    ],
)
def test_what_torchrun_refuses(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, extra: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the checks come before the process group is joined: torchrun's variables alone trigger them
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    if "--eval-data" in extra:
        extra[extra.index("x.txt")] = str(sotu / "test.txt")
    assert_one_line_error(run_cli(*qat_args(tiny_model_dir, sotu, tmp_path / "o", *extra)), fragment)


def test_the_gathered_model_is_an_ordinary_one_with_tied_embeddings_kept_tied() -> None:
    """What process 0 rebuilds from the gathered state: the test model above unties its embeddings; smollm2 ties
    them, and the copy must share one tensor again."""
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    layers = quantize_rtn(find_targets(model, [], []), QuantSpec(2, 32, True), "minmax")
    fakes = prepare_qat(model, layers, make_estimator(QATConfig(), 0))
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    plain, grids = unsharded_copy(model, fakes, state)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert all(type(plain.get_submodule(name)) is nn.Linear for name in layers)
    expected = convert_qat(model, fakes)
    assert all(torch.equal(grids[n].scales, expected[n].scales) for n in expected)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
