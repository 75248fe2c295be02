"""The Python API runs the commands' own functions: the same checkpoint, the same numbers, the same errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

import qatcli
from qatcli.errors import QatcliError


def test_quantize_evaluate_export_match_the_command_line(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    data = {"data": str(sotu / "test.txt"), "seqlen": 64, "max_windows": 3}
    made = qatcli.quantize(str(tiny_model_dir), method="gptq", output=str(tmp_path / "api"), bits=3, group_size=32,
                           calib_data=str(sotu / "valid.txt"), nsamples=8, seqlen=64)  # fmt: skip
    assert made is not None and made.meta["method"] == "gptq" and made.meta["quantization"]["bits"] == 3
    args = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--calib-data", str(sotu / "valid.txt")]
    cli = run_cli("ptq", str(tiny_model_dir), *args, "--nsamples", "8", "--seqlen", "64", "-o", str(tmp_path / "cli"))
    assert cli.returncode == 0, cli.stderr
    for name in ("quant.safetensors", "latent.safetensors"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()

    export = qatcli.export(tmp_path / "api", tmp_path / "api-gptq")
    assert export == tmp_path / "api-gptq" and (export / "quantize_config.json").is_file()
    rows = qatcli.evaluate([str(tmp_path / "api"), str(export)], **data)
    shown = run_cli("eval", str(tmp_path / "cli"), "--data", data["data"], "--seqlen", "64", "--max-windows", "3",
                    "--json", str(tmp_path / "e.json"))  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert rows[0]["ppl"] == json.loads((tmp_path / "e.json").read_text())[0]["ppl"]
    assert rows[1]["format"] == "gptq" and rows[1]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-2)


def test_qat_from_a_recipe_object_and_errors(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    recipe = qatcli.build_recipe(
        None, {"qat.block.epochs": 0}, model=str(tiny_model_dir), bits=2, group_size=32, data=str(sotu / "valid.txt"),
        seqlen=64, steps=2, output=str(tmp_path / "q"),
    )  # fmt: skip
    made = qatcli.quantize(None, recipe, method="qat")
    assert made is not None and made.meta["method"] == "qat" and made.meta["qat"]["steps"] == 2
    with pytest.raises(QatcliError, match="already exists"):  # nothing is overwritten without force
        qatcli.quantize(None, recipe, method="qat")
    with pytest.raises(QatcliError, match="neither a flag of qatcli ptq"):
        qatcli.quantize(str(tiny_model_dir), bogus=1)
    with pytest.raises(QatcliError, match="method must be one of"):
        qatcli.quantize(str(tiny_model_dir), method="hqq")
