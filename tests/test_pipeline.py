"""The pipeline layer through the command line: QAT from every init, eval of exports on generated data, input
errors gathered before any work, a real SIGINT, and the import structure (no command imports another)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import default_sigint, run_cli
from safetensors.torch import load_file
from test_qat import qat_args

from qatcli.config import Recipe


def qat_cmd(model: Path, sotu: Path, out: Path, *extra: str) -> list[str]:
    """test_qat's short run at 3 bits, 2 steps, without the block stage (tests/test_block.py has it)."""
    return qat_args(model, sotu, out, "--bits", "3", "--steps", "2", "--block-epochs", "0", *extra)


def test_qat_starts_from_a_checkpoint(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    start = tmp_path / "rtn"
    made = run_cli("ptq", str(tiny_model_dir), "--bits", "3", "--group-size", "32", "-o", str(start))
    assert made.returncode == 0, made.stderr
    out = tmp_path / "qat"
    result = run_cli(*qat_cmd(tiny_model_dir, sotu, out, "--init", str(start)))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "qatcli.json").read_text())
    assert meta["qat"]["init"] == str(start)
    assert meta["base_model"]["spec"] == str(tiny_model_dir)
    wrong = run_cli(*qat_cmd(tiny_model_dir, sotu, tmp_path / "q2", "--init", str(start), "--bits", "2"))
    assert wrong.returncode == 2 and "the recipe asks for" in wrong.stderr


def test_eval_of_an_export_samples_its_recorded_base_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt, export = tmp_path / "rtn", tmp_path / "gptq"
    assert run_cli("ptq", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "-o", str(ckpt)).returncode == 0
    assert run_cli("export", str(ckpt), "-o", str(export)).returncode == 0
    qcfg = json.loads((export / "config.json").read_text())["quantization_config"]
    assert qcfg["meta"]["qatcli_base_model"] == str(tiny_model_dir)
    json_path = tmp_path / "rows.json"
    args = ["eval", str(ckpt), str(export), "--data", "generated:5:64", "--json", str(json_path)]
    result = run_cli(*args, "--seqlen", "32", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    rows = json.loads(json_path.read_text())
    assert [r["windows"] for r in rows] == [rows[0]["windows"]] * 2
    # the same windows: the checkpoint (fp32 dense parts) and its export (fp16 dense parts) agree closely
    assert rows[1]["ppl"] == pytest.approx(rows[0]["ppl"], rel=0.01)


def test_input_errors_are_reported_together_before_any_work(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    args = ["ptq", str(tmp_path / "no-model"), "--method", "gptq", "--calib-data", str(tmp_path / "none.txt")]
    result = run_cli(*args, "-o", str(taken))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 problems" in lines[0], result.stderr
    for fragment in ("no-model", "none.txt", "taken"):
        assert fragment in lines[0]


def test_sigint_finishes_the_step_and_resume_equals_an_uninterrupted_run(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    steps = "300"
    whole = run_cli(*qat_cmd(tiny_model_dir, sotu, tmp_path / "whole", "--steps", steps))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "qat"
    args = qat_cmd(tiny_model_dir, sotu, out, "--steps", steps, "--save-every", "10000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qatcli", *args], stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    metrics = out.with_name("qat.run") / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "qat ended or never started training"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted after step" in stderr and "Traceback" not in stderr
    step = int(stderr.split("interrupted after step")[1].split(",")[0])
    assert 2 <= step < int(steps)
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step} of {steps}" in resumed.stderr
    for name in ("latent.safetensors", "quant.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, int(steps) + 1))  # each step once, across the interruption


def test_the_design_card_commands_run_as_typed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`qatcli ptq MODEL -o X` and `qatcli qat MODEL --bits 2 --estimator fourier -o X` need nothing else:
    group size auto, data-free training text, the block stage at 2 bits, then the end-to-end steps."""
    ptq = run_cli("ptq", str(tiny_model_dir), "-o", str(tmp_path / "ptq"))
    assert ptq.returncode == 0, ptq.stderr
    args = ["qat", str(tiny_model_dir), "--bits", "2", "--estimator", "fourier", "-o", str(tmp_path / "qat")]
    qat = run_cli(*args, cache=tmp_path / "cache")
    assert qat.returncode == 0, qat.stderr
    meta = json.loads((tmp_path / "qat" / "qatcli.json").read_text())
    assert meta["quantization"]["group_size"] == 64 and meta["recipe"]["qat"]["data"].startswith("generated:")
    assert meta["qat"]["block"]["epochs"] == 2 and meta["metrics"]["steps"] == Recipe().qat.steps
    losses = meta["metrics"]["block_loss"]
    assert all(losses["end"][k] < losses["start"][k] for k in losses["start"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, seed: int
) -> None:
    steps = 40
    args = ["--steps", str(steps), "--save-every", "3"]
    whole = run_cli(*qat_cmd(tiny_model_dir, sotu, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "qat"
    kill_after = random.Random(seed).randrange(2, steps - 2)  # records written, so anywhere inside a save period
    proc = subprocess.Popen([sys.executable, "-m", "qatcli", *qat_cmd(tiny_model_dir, sotu, out, *args)])
    metrics = out.with_name("qat.run") / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= kill_after):
        assert proc.poll() is None and time.monotonic() < deadline, "qat ended before it could be killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    resumed = run_cli(*qat_cmd(tiny_model_dir, sotu, out, *args), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("latent.safetensors", "quant.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, steps + 1))
