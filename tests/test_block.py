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
from qatcli.qat.block import block_loss, block_records, block_state_file, train_blocks
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import apply_fake_quant
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

CPU = torch.device("cpu")


def _stage(
    model_dir: Path,
    text: Path,
    workdir: Path,
    estimator: str = "ste",
    bits: int = 2,
    start: str = "fp",
    record_every: int = 0,
    lr: float = 1e-3,
    loss: str = "mse",
):
    """The block stage on an RTN grid; ``start`` rtn: the latent weights start on the grid points (fp ones given)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = torch.tensor(tokenizer(text.read_text())["input_ids"])
    layers = quantize_rtn(find_targets(model, [], []), QuantSpec(bits, 32), "minmax")
    fp_weights = None
    if start != "fp":
        fp_weights = apply_fake_quant(model, layers)
    qat = QATConfig(estimator=estimator, record_every=record_every)
    qat.block.loss = loss
    qat.block.nsamples, qat.block.seqlen, qat.block.batch_size, qat.block.lr = 16, 64, 4, lr
    windows = calibration_windows(tokens, qat.block.nsamples, qat.block.seqlen, 0)
    workdir.mkdir(exist_ok=True)
    layers, report = train_blocks(model, layers, windows, qat, 3, 0, CPU, workdir, fp_weights)
    return model, layers, report


def test_a_start_from_the_grid_points_trains_towards_the_full_precision_blocks(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    # Q(w_fp) and Q(Q(w_fp)) are the same model, so both starts see the same first loss against the fp targets
    _, _, from_fp = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "fp")
    _, _, from_grid = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "rtn", start="rtn")
    assert from_grid.start[0] == pytest.approx(from_fp.start[0], rel=1e-5)
    assert from_grid.start[0] > 1e-3  # the targets are not the start model's own outputs


def test_the_block_stage_records_each_blocks_landscape(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "run", record_every=5)
    records = block_records(tmp_path / "run")
    steps = 3 * 4  # 3 epochs of 16 windows in batches of 4
    assert [(r["block"], r["step"]) for r in records] == [(b, s) for b in (0, 1) for s in (0, 5, 10, steps)]
    first = {r["block"]: r["landscape"] for r in records if r["step"] == 0}
    # block 0 sees the fp model's own inputs, so its fp weights give its targets exactly
    assert first[0]["loss_fp"] < 1e-10 < first[0]["loss_quantized"]
    assert first[1]["loss_fp"] > 0  # block 1's inputs come through the quantized block 0
    assert first[0]["codes_changed"] is None and first[0]["latent_to_grid"] > 0  # latent starts at the fp weights
    assert all(0 <= r["landscape"]["codes_changed"] <= 1 for r in records if r["step"] > 0)
    last = {r["block"]: r["landscape"] for r in records if r["step"] == steps}
    assert all(last[b]["loss_quantized"] < first[b]["loss_quantized"] for b in (0, 1))


@pytest.mark.parametrize("estimator", ["ste", "fourier", "jacobian"])
def test_block_stage_lowers_every_blocks_loss_below_its_rtn_start(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, estimator: str
) -> None:
    _, layers, report = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "run", estimator)
    assert set(report.start) == set(report.end) == {0, 1}
    for index in report.start:
        assert report.end[index] < report.start[index], (index, report.start[index], report.end[index])
    assert all(lq.scales.dtype == torch.float16 and bool((lq.scales > 0).all()) for lq in layers.values())


def test_channel_mse_weighs_a_channel_of_massive_activations_as_any_other() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 16, generator=gen)
    out = target + 0.1 * torch.randn(2, 8, 16, generator=gen)
    massive = torch.ones(16)
    massive[3] = 1e3  # one channel a thousand times larger, in the output and its target alike
    plain, scaled = block_loss(out, target, "channel_mse"), block_loss(out * massive, target * massive, "channel_mse")
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)
    assert block_loss(out * massive, target * massive, "mse") > 1e3 * block_loss(out, target, "mse")
    assert block_loss(target, target, "channel_mse").item() == 0.0


@pytest.mark.parametrize("loss", ["token_mse", "channel_mse"])
def test_block_stage_lowers_every_blocks_loss_with_the_other_losses(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, loss: str
) -> None:
    _, _, report = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "run", loss=loss)
    assert all(report.end[index] < report.start[index] for index in report.start), report


def test_a_block_that_training_makes_worse_keeps_its_start(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    model, layers, report = _stage(tiny_model_dir, sotu / "valid.txt", tmp_path / "run", lr=0.5)
    assert report.kept_start, report  # a learning rate this large undoes what rounding got right
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    start_layers = quantize_rtn(find_targets(fresh, [], []), QuantSpec(2, 32), "minmax")
    prefix = "model.layers.{}."
    for index in report.start:
        assert report.end[index] <= report.start[index]
    for index in report.kept_start:
        assert report.end[index] == pytest.approx(report.start[index], rel=1e-6)
        for name, lq in layers.items():
            if name.startswith(prefix.format(index)):
                assert torch.equal(lq.scales, start_layers[name].scales.half()), name
                assert torch.equal(model.get_submodule(name).weight, fresh.get_submodule(name).weight), name
                saved = torch.load(block_state_file(tmp_path / "run", index), weights_only=True)[name]
                assert torch.equal(saved["scales"], lq.scales) and torch.equal(
                    saved["weight"], model.get_submodule(name).weight
                )


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
