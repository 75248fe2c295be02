"""qatcli compare on a tiny Llama: two cells, an interrupted run, the rerun that reuses and resumes, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file
from test_cli import assert_one_line_error

from qatcli import cli
from qatcli.errors import QatcliError
from qatcli.pipeline.matrix import cell_recipe, expand
from qatcli.qat.trainer import Trainer
from qatcli.recipe import load_recipe

RTN, QAT = "rtn-w2-g32", "qat-ste-rtn-w2-g32-s4"


def write_recipe(path: Path, model: Path, sotu: Path, out: Path, methods: str) -> Path:
    path.write_text(
        f"""
model: {model}
output: {out}
device: cpu
quant: {{bits: 2, group_size: 32, sym: true}}
qat: {{data: {sotu / "valid.txt"}, steps: 4, batch_size: 4, seqlen: 64, lr: 1.0e-3, scale_lr: 1.0e-3,
      warmup_steps: 1, save_every: 1, loss: ce}}
eval: {{data: {sotu / "test.txt"}, seqlen: 64, max_windows: 4}}
compare:
  bits: [2]
  methods:
{methods}
"""
    )
    return path


TWO_CELLS = """    - method: rtn
    - {method: qat, estimator: ste, init: rtn}"""


def compare_in_process(*args: str, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """cli.main in this interpreter (so that monkeypatching reaches it), as a CompletedProcess."""
    try:
        code = cli.main(["compare", *args]) or 0  # typer returns 130 for Ctrl-C rather than raising it
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["qatcli", "compare", *args], code, captured.out, captured.err)


def interrupt_at_step(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Ctrl-C (SIGINT to this process) during QAT training, as ``step`` ends (from the on_step hook)."""
    train = Trainer.train

    def interrupted(self: Trainer, stop_after: int | None = None, on_step=None, **kwargs) -> None:
        def hook(record: dict) -> None:
            if record["step"] == step:
                os.kill(os.getpid(), signal.SIGINT)

        train(self, stop_after, hook, **kwargs)

    monkeypatch.setattr(Trainer, "train", interrupted)


def test_interrupted_compare_resumes_and_reuses_finished_cells(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    out = tmp_path / "cmp"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sotu, out, TWO_CELLS)
    rtn_result, qat_dir = out / "cells" / RTN / "result.json", out / "cells" / QAT

    interrupt_at_step(2, monkeypatch)
    first = compare_in_process(str(recipe), capsys=capsys)
    assert first.returncode == 130, first.stderr
    assert f"interrupted in {QAT}" in first.stderr
    assert rtn_result.is_file() and (out / "fp.json").is_file()
    assert (qat_dir / "checkpoint.run" / "state.pt").is_file()
    assert not (qat_dir / "result.json").exists() and not (qat_dir / "checkpoint").exists()
    assert not (out / "compare.json").exists()
    rtn_stamp = rtn_result.stat().st_mtime_ns
    monkeypatch.undo()

    second = compare_in_process(str(recipe), capsys=capsys)
    assert second.returncode == 0, second.stderr
    assert "resuming at step 2 of 4" in second.stderr
    assert rtn_result.stat().st_mtime_ns == rtn_stamp  # not quantized, exported or evaluated again
    summary = json.loads((out / "compare.json").read_text())
    status = {r["cell"]: r["status"] for r in summary["rows"]}
    assert status == {"fp": "reused", RTN: "reused", QAT: "resumed"}
    steps = [json.loads(line)["step"] for line in (qat_dir / "checkpoint" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not (qat_dir / "checkpoint.run").exists()
    resumed = {name: load_file(qat_dir / "checkpoint" / name) for name in ("latent.safetensors", "quant.safetensors")}

    rows = {r["cell"]: r for r in summary["rows"]}
    fp, rtn, qat = rows["fp"], rows[RTN], rows[QAT]
    assert (summary["windows"], summary["seqlen"]) == (4, 64)
    assert all((r["windows"], r["seqlen"]) == (4, 64) for r in rows.values())
    assert rtn["ppl"] > fp["ppl"] and qat["ppl"] != rtn["ppl"]
    assert rtn["ppl_ratio"] == pytest.approx(rtn["ppl"] / fp["ppl"])
    assert rtn["quantized_bytes"] == qat["quantized_bytes"] < fp["quantized_bytes"]
    assert (qat_dir / "gptq" / "quantize_config.json").is_file() and qat["export_bytes"] > 0
    assert qat["quantize_seconds"] > 0 and (qat["estimator"], qat["init"], qat["steps"]) == ("ste", "rtn", 4)
    for name in ("fp", RTN, QAT):
        assert name in second.stdout
    with (out / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["cell"] for r in table] == ["fp", RTN, QAT]
    assert float(table[1]["ppl"]) == pytest.approx(rtn["ppl"])
    with Image.open(out / "compare.png") as image:
        assert image.format == "PNG" and image.width > 800

    # The real command line, a third time: every cell is reused, nothing is written into the cells.
    qat_stamp = (qat_dir / "result.json").stat().st_mtime_ns
    third = run_cli("compare", str(recipe))
    assert third.returncode == 0, third.stderr
    assert [r["status"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["reused"] * 3
    assert rtn_result.stat().st_mtime_ns == rtn_stamp and (qat_dir / "result.json").stat().st_mtime_ns == qat_stamp

    # Other evaluation settings: the checkpoints are kept, exported and evaluated again on the new windows.
    fourth = compare_in_process(str(recipe), "--max-windows", "2", capsys=capsys)
    assert fourth.returncode == 0, fourth.stderr
    rows = {r["cell"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert [r["status"] for r in rows.values()] == ["new", "re-evaluated", "re-evaluated"]
    assert all(r["windows"] == 2 for r in rows.values())
    assert rows[QAT]["quantize_seconds"] == qat["quantize_seconds"]

    # Other QAT settings: only the QAT cell is made again.
    changed = compare_in_process(str(recipe), "--max-windows", "2", "--set", "qat.lr=0.002", capsys=capsys)
    assert changed.returncode == 0, changed.stderr
    assert f"{QAT}: its settings changed" in changed.stderr
    assert [r["status"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["reused", "reused", "new"]

    fresh = compare_in_process(str(recipe), "--max-windows", "2", "--force", capsys=capsys)
    assert fresh.returncode == 0, fresh.stderr
    assert [r["status"] for r in json.loads((out / "compare.json").read_text())["rows"]] == ["new"] * 3
    # the cell interrupted and resumed above equals this uninterrupted one, tensor for tensor
    for name, tensors in resumed.items():
        again = load_file(qat_dir / "checkpoint" / name)
        assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors), name


@pytest.mark.parametrize(
    ("methods", "fragment"),
    [
        ("    - method: hqq", "compare.methods[0].method must be one of rtn, gptq, awq, qat, got 'hqq'"),
        ("    - {method: awq}", "awq cells need calibration data"),
        ("    - {method: rtn, estimator: ste}", "compare.methods[0].estimator applies to method qat only"),
        ("    - {method: rtn, bits: [3, 5]}", "compare.methods[0].bits must hold 2, 3, 4, 8, got 5"),
        ("    - method: rtn\n    - {method: rtn, bits: 2}", "lists the cell 'rtn-w2-g32' twice"),
        ("    - {method: rtn, group_size: 48}", "group size 48"),
        ("    - {method: gptq}", "gptq cells need calibration data"),
        ("    - {method: qat, estimator: lsq}", "unknown estimator 'lsq' (known: "),
        ("    - {method: qat, init: nowhere}", "init must be fp, rtn, gptq or a qatcli checkpoint, got 'nowhere'"),
        ("    - {method: qat, block_epochs: [0, -2]}", "compare.methods[0].block_epochs must be auto or 0 or more"),
        ("    - {method: gptq, block_epochs: 2}", "compare.methods[0].block_epochs applies to method qat only"),
        ("    []", "the recipe has no compare.methods"),
    ],
)
def test_bad_compare_input_is_one_line_error(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], methods: str, fragment: str
) -> None:
    out = tmp_path / "cmp"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sotu, out, methods)
    result = compare_in_process(str(recipe), capsys=capsys)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not (out / "cells").exists()


def test_compare_never_takes_over_another_directory(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sotu, out, TWO_CELLS)
    for extra in ([], ["--force"]):
        result = compare_in_process(str(recipe), *extra, capsys=capsys)
        assert_one_line_error(result, "holds something other than a qatcli compare run")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_one_line_error(compare_in_process(str(tmp_path / "none.yaml"), capsys=capsys), "recipe file")


def test_cells_with_and_without_the_block_stage(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "compare:\n  methods:\n    - {method: qat, bits: 2, group_size: 64, steps: 30, block_epochs: [0, 2]}\n"
    )
    recipe = load_recipe(path, {})
    cells = expand(recipe)
    assert [c.name for c in cells] == ["qat-ste-fp-w2-g64-s30-b0", "qat-ste-fp-w2-g64-s30-b2"]
    assert [cell_recipe(recipe, c, tmp_path).qat.block.epochs for c in cells] == [0, 2]


def test_block_only_cells_and_entries_that_would_train_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("compare:\n  methods:\n    - {method: qat, bits: [3, 2], group_size: 64, steps: 0}\n")
    recipe = load_recipe(path, {})
    cells = expand(recipe)
    assert [c.name for c in cells] == ["qat-ste-fp-w3-g64-s0", "qat-ste-fp-w2-g64-s0"]
    assert [
        (r.qat.steps, r.qat.block.epochs_for(r.quant.bits)) for r in (cell_recipe(recipe, c, tmp_path) for c in cells)
    ] == [(0, 2), (0, 2)]
    for entry, message in (
        ("{method: qat, bits: [2, 4], steps: 0}", "no block stage at 4 bits"),  # auto epochs are 0 at 4 bits
        ("{method: qat, bits: 2, steps: 0, block_epochs: [0, 2]}", "no block stage at 2 bits"),
        ("{method: qat, bits: 2, steps: -1}", r"steps must be 0 or more"),
    ):
        path.write_text(f"compare:\n  methods:\n    - {entry}\n")
        with pytest.raises(QatcliError, match=message):
            load_recipe(path, {})


def test_demo_recipe_cells() -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml", {})
    names = [cell.name for cell in expand(recipe)]
    assert names == ["rtn-w4-g64", "rtn-w3-g64", "rtn-w2-g64", "gptq-w3-g64", "qat-ste-fp-w3-g64-s20"]
    # Everything it reads is generated from the model itself: it runs from a fresh clone with nothing beside it.
    assert {recipe.eval.data, recipe.calib.data, recipe.qat.data} == {"generated:50"}


def test_qat_cells_carry_their_recorded_landscape(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    methods = "    - {method: qat, estimator: [ste, fourier], steps: 2}"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sotu, out, methods)
    result = compare_in_process(str(recipe), "--set", "qat.record_every=1", capsys=capsys)
    assert result.returncode == 0, result.stderr
    rows = {r["cell"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    for name in ("qat-ste-fp-w2-g32-s2", "qat-fourier-fp-w2-g32-s2"):
        attached = json.loads((out / rows[name]["landscape"]["file"]).read_text())
        checkpoint = out / "cells" / name / "checkpoint" / "metrics.jsonl"
        recorded = [json.loads(line) for line in checkpoint.read_text().splitlines()]
        assert attached["records"] == [r for r in recorded if "landscape" in r] and len(attached["records"]) == 2
        assert rows[name]["landscape"]["last"] == attached["records"][-1]["landscape"]
        assert (out / "cells" / name / "landscape.png").stat().st_size > 10_000
    assert (out / "compare_landscape.png").stat().st_size > 10_000


def test_compare_refuses_a_compressed_tensors_export(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sotu, out, "    - method: rtn")
    result = compare_in_process(str(recipe), "--set", "export.format=compressed-tensors", capsys=capsys)
    assert result.returncode == 2
    assert_one_line_error(result, "compare evaluates each cell's GPTQ-format export")
    assert not (out / "cells").exists()


def test_compare_reports_each_domain_and_trains_on_a_mix(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model_dir, sotu, out, "    - method: rtn\n    - {method: qat, steps: 2}"
    )
    domains = f"eval.data=[{sotu / 'test.txt'},code:test]"
    mix = f"qat.data={sotu / 'valid.txt'}:0.5,{sotu / 'train.txt'}:0.5"
    result = compare_in_process(str(recipe), "--set", domains, "--set", mix, capsys=capsys)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "compare.json").read_text())["rows"]
    for row in rows:
        assert list(row["domains"]) == [str(sotu / "test.txt"), "code:test"]
        nll = [d["nll"] for d in row["domains"].values()]
        assert row["ppl"] == pytest.approx(math.exp(sum(nll) / 2), rel=1e-12)
    header = (out / "compare.csv").read_text().splitlines()[0]
    assert f"ppl {sotu / 'test.txt'}" in header and "ppl code:test" in header
    assert "geo mean" in result.stdout
