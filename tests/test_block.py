"""The block-wise QAT stage: it lowers each block's loss, resumes exactly, works with every estimator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_cli import assert_one_line_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from qatcli.config import QATConfig
from qatcli.data.sources import calibration_windows
from qatcli.qat.block import block_state_file, train_blocks
from qatcli.quant.grid import QuantSpec
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

CPU = torch.device("cpu")


def _stage(model_dir: Path, text: Path, workdir: Path, estimator: str = "ste", bits: int = 2):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = torch.tensor(tokenizer(text.read_text())["input_ids"])
    layers = quantize_rtn(find_targets(model, [], []), QuantSpec(bits, 32), "minmax")
    qat = QATConfig(estimator=estimator)
    qat.block.nsamples, qat.block.seqlen, qat.block.batch_size, qat.block.lr = 16, 64, 4, 1e-3
    windows = calibration_windows(tokens, qat.block.nsamples, qat.block.seqlen, 0)
    workdir.mkdir(exist_ok=True)
    layers, report = train_blocks(model, layers, windows, qat, 3, 0, CPU, workdir)
    return model, layers, report


@pytest.mark.parametrize("estimator", ["ste", "fourier", "jacobian"])
def test_block_stage_lowers_every_blocks_loss_below_its_rtn_start(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, estimator: str
) -> None:
    _, layers, report = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "run", estimator)
    assert set(report.start) == set(report.end) == {0, 1}
    for index in report.start:
        assert report.end[index] < report.start[index], (index, report.start[index], report.end[index])
    assert all(lq.scales.dtype == torch.float16 and bool((lq.scales > 0).all()) for lq in layers.values())


def test_block_stage_resumed_after_a_block_equals_an_uninterrupted_one(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    whole, whole_layers, _ = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "a")
    # stopped after block 0: its state file holds block 0 only
    block_state_file(tmp_path / "b", 0).parent.mkdir(parents=True)
    shutil.copy(block_state_file(tmp_path / "a", 0), block_state_file(tmp_path / "b", 0))
    resumed, resumed_layers, report = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "b")
    assert set(report.end) == {1}  # block 0 came from the saved state, block 1 was trained
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, lq in whole_layers.items():
        assert torch.equal(lq.scales, resumed_layers[name].scales), name


def test_block_only_qat_through_the_cli(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = ["qat", str(tiny_model_dir), "--bits", "2", "--group-size", "32", "--data", str(sotu / "valid.txt")]
    args += ["--steps", "0", "--block-epochs", "1", "--set", "qat.block.nsamples=8", "--set", "qat.block.seqlen=64"]
    result = run_cli(*args, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "qatcli.json").is_file() and not out.with_name("q.run").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--block-epochs", "-1"], "qat.block.epochs must be auto or 0 or more"),
        (["--block-epochs", "lots"], "qat.block.epochs must be"),
        (["--set", "qat.block.loss=huber"], "qat.block.loss must be one of"),
        (["--train", "biases"], "qat.train must be one of"),
        (["--steps", "0", "--block-epochs", "0"], "nothing would be trained"),
        (["--set", "qat.block.lr=0"], "qat.block.lr must be positive"),
    ],
)
def test_bad_block_knobs_are_one_line_errors(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, extra: list[str], fragment: str
) -> None:
    args = ["qat", str(tiny_model_dir), "--bits", "2", "--data", str(sotu / "valid.txt"), "-o", str(tmp_path / "q")]
    assert_one_line_error(run_cli(*args, *extra), fragment)
