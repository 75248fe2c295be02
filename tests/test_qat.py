"""qatcli qat through the command line: training, export equality, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_cli import assert_one_line_error

from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.export import export_gptq
from qatcli.formats.packed_model import load_gptq_model

CPU = torch.device("cpu")


def qat_args(model: Path, sotu: Path, out: Path, *extra: str) -> list[str]:
    return [
        "qat",
        str(model),
        "--bits",
        "2",
        "--group-size",
        "32",
        "--data",
        str(sotu / "valid.txt"),
        "--seqlen",
        "64",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--scale-lr",
        "1e-3",
        "-o",
        str(out),
        *extra,
    ]


def test_qat_trains_and_exports_exactly(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    result = run_cli(
        *qat_args(
            tiny_model_dir,
            sotu,
            out,
            "--estimator",
            "fourier",
            "--steps",
            "8",
            "--eval-data",
            str(sotu / "test.txt"),
            "--max-windows",
            "8",
        )
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "qatcli.json").read_text())
    assert meta["method"] == "qat" and meta["qat"]["estimator"] == {"name": "fourier", "amplitudes": [0.21]}
    assert meta["metrics"]["steps"] == 8 and meta["metrics"]["eval"]["ppl"] < meta["metrics"]["eval"]["ppl_before"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert not (tmp_path / "qat.run").exists()

    exported = tmp_path / "gptq"
    exported.mkdir()
    export_gptq(out, exported, dtype="float32")
    reference, _, _, _ = load_checkpoint(out, CPU)
    packed, _, _ = load_gptq_model(exported, CPU)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(
    "estimator",
    [
        ("--estimator", "ste"),
        # B is refreshed at steps 0, 2, 4: the stop after step 3 falls between refreshes
        ("--estimator", "jacobian", "--set", "qat.jacobian.update_every=2", "--variance-reduction"),
    ],
)
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, estimator: tuple[str, ...]
) -> None:
    common = (*estimator, "--steps", "6", "--save-every", "2", "--loss", "ce")
    straight = tmp_path / "straight"
    assert run_cli(*qat_args(tiny_model_dir, sotu, straight, *common)).returncode == 0

    resumed = tmp_path / "resumed"
    first = run_cli(*qat_args(tiny_model_dir, sotu, resumed, *common, "--stop-after", "3"))
    assert first.returncode == 0, first.stderr
    assert not resumed.exists() and (tmp_path / "resumed.run" / "state.pt").is_file()
    again = run_cli(*qat_args(tiny_model_dir, sotu, resumed, *common))
    assert_one_line_error(again, "pass --resume to continue it or --force")
    second = run_cli(*qat_args(tiny_model_dir, sotu, resumed, *common, "--resume"))
    assert second.returncode == 0, second.stderr

    for name in ("model.safetensors", "quant.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--estimator", "magic"], "unknown estimator 'magic'"),
        (["--estimator", "fourier", "--amplitude", "0.3"], "fourier amplitudes must be non-negative"),
        (["--init", "nowhere"], "--init must be fp, rtn, gptq or a qatcli checkpoint"),
        (["--init", "gptq"], "--init gptq needs calibration data"),
        (["--loss", "mse"], "qat.loss must be one of kd, ce"),
        (["--steps", "0"], "qat.steps must be positive"),
        (["--resume"], "nothing to resume"),
        (["--estimator", "jacobian", "--set", "qat.jacobian.blend=2"], "jacobian: blend must be in"),
        (["--set", "qat.jacobian.nope=1"], "unknown key 'qat.jacobian.nope'"),
        (["--set", "blend"], "--set takes KEY=VALUE"),
    ],
)
def test_bad_qat_input(tiny_model_dir: Path, sotu: Path, tmp_path: Path, extra: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli(*qat_args(tiny_model_dir, sotu, tmp_path / "o", *extra)), fragment)
    assert list(tmp_path.iterdir()) == []
