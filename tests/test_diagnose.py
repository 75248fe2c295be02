"""qatcli diagnose: the basin measurements on a two-parameter toy loss with a known answer, and the command
on a tiny Llama against a direct computation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_cli import assert_one_line_error

from qatcli.data.sources import TrainBatches
from qatcli.data.tokens import TokenSource
from qatcli.diagnose.geometry import hessian_distance, inward_component, segment_profile
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.models.loading import load_model, load_tokenizer, resolve_model
from qatcli.qat.losses import ce_loss

CPU = torch.device("cpu")

# A narrow valley (curvature 100 across, 0.5 along, turned by 30 degrees) around w_fp = (0.3, 0.45), on the
# integer grid: rounding lands on (0, 0), outside the valley, while another grid point lies inside it.
THETA, NARROW, WIDE = math.pi / 6, 100.0, 0.5
W_FP = torch.tensor([[0.3, 0.45]], dtype=torch.float64)
ROTATION = torch.tensor([[math.cos(THETA), -math.sin(THETA)], [math.sin(THETA), math.cos(THETA)]], dtype=torch.float64)
A = ROTATION @ torch.diag(torch.tensor([NARROW, WIDE], dtype=torch.float64)) @ ROTATION.T


def toy_loss(point: dict[str, torch.Tensor]) -> float:
    d = point["w"] - W_FP
    return float((d @ A @ d.T).squeeze())


def toy_loss_and_grad(point: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    d = point["w"] - W_FP
    return toy_loss(point), {"w": 2 * d @ A}


def test_rounding_out_of_a_narrow_basin_shows_in_every_measurement() -> None:
    fp, rtn = {"w": W_FP}, {"w": torch.round(W_FP)}
    ts = [0.25 * i for i in range(7)]  # 0 .. 1.5
    profile = segment_profile(toy_loss, fp, rtn, ts)
    assert profile[0] == 0 and all(b > a for a, b in itertools.pairwise(profile))  # the rise
    assert profile[4] == pytest.approx(toy_loss(rtn)) and toy_loss(rtn) > 20
    inward = inward_component(toy_loss_and_grad, fp, rtn)
    assert inward.cosine > 0.5 and inward.projected > 0  # descent from w_q leads back towards w_fp
    # the Hessian of this quadratic loss is 2A; tr(dW (A) dW^T) is the loss itself
    assert hessian_distance(fp, rtn, {"w": A})["w"] == pytest.approx(toy_loss(rtn))

    # a few straight-through steps from the fp weights bring the quantized point back into the valley
    latent = W_FP.clone()
    for _ in range(60):
        quantized = torch.round(latent)
        _, grad = toy_loss_and_grad({"w": quantized})
        latent = latent - 5e-4 * grad["w"]
    assert toy_loss({"w": torch.round(latent)}) < 0.05 * toy_loss(rtn)


def test_diagnose_matches_eval_at_both_ends_of_each_segment(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    data = ["--data", str(sotu / "test.txt"), "--seqlen", "64", "--max-windows", "6"]
    rtn, qat = tmp_path / "rtn", tmp_path / "qat"
    assert run_cli("ptq", str(tiny_model_dir), "--bits", "3", "--group-size", "32", "-o", str(rtn)).returncode == 0
    made = run_cli(
        "qat",
        str(tiny_model_dir),
        "--bits",
        "3",
        "--group-size",
        "32",
        "--data",
        str(sotu / "valid.txt"),
        "--steps",
        "3",
        "--seqlen",
        "64",
        "--block-epochs",
        "0",
        "-o",
        str(qat),
    )
    assert made.returncode == 0, made.stderr
    assert run_cli("export", str(qat), "-o", str(tmp_path / "qat-gptq")).returncode == 0
    models = [str(rtn), str(qat), str(tmp_path / "qat-gptq")]
    out = tmp_path / "d.json"
    result = run_cli(
        "diagnose",
        str(tiny_model_dir),
        *models,
        *data,
        "--points",
        "4",
        "--json",
        str(out),
        "--png",
        str(tmp_path / "d.png"),
    )
    assert result.returncode == 0, result.stderr
    evaluated = run_cli("eval", str(tiny_model_dir), *models, *data, "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    nll = {row["name"]: row["nll"] for row in json.loads((tmp_path / "e.json").read_text())}

    diagnosis = json.loads(out.read_text())
    by_name = {r["name"]: r for r in diagnosis["results"]}
    assert [p["t"] for p in by_name[str(rtn)]["profile"]] == [0.0, 0.5, 1.0, 1.5]
    for name, r in by_name.items():
        assert r["profile"][0]["loss"] == pytest.approx(nll[str(tiny_model_dir)], rel=1e-6)  # t = 0: fp
        assert r["loss_quantized"] == pytest.approx(nll[name], rel=1e-5)  # t = 1: the quantized model
        assert r["profile"][2]["loss"] == pytest.approx(r["loss_quantized"], rel=1e-9)
        assert r["hessian_distance"] > 0 and -1 <= r["inward_cosine"] <= 1
    assert by_name[str(qat)]["loss_latent"] is not None and by_name[str(rtn)]["loss_latent"] is None
    # the export holds the same quantized weights as its checkpoint
    assert by_name[str(tmp_path / "qat-gptq")]["loss_quantized"] == pytest.approx(by_name[str(qat)]["loss_quantized"])
    assert (tmp_path / "d.png").stat().st_size > 10_000

    assert_one_line_error(run_cli("diagnose", str(tiny_model_dir), *data), "nothing to diagnose")
    assert_one_line_error(run_cli("diagnose", str(tiny_model_dir), str(tmp_path), *data), "neither a qatcli checkpoint")


def test_the_landscape_recorded_during_qat_matches_a_direct_computation(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    out = tmp_path / "qat"
    args = ["--bits", "2", "--group-size", "32", "--data", str(sotu / "valid.txt"), "--seqlen", "64"]
    args += ["--steps", "4", "--block-epochs", "0", "--lr", "1e-3", "--set", "qat.record_every=2"]
    made = run_cli("qat", str(tiny_model_dir), *args, "-o", str(out))
    assert made.returncode == 0, made.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recorded = {r["step"]: r["landscape"] for r in records if "landscape" in r}
    assert sorted(recorded) == [2, 4] and recorded[2]["codes_changed"] is None
    assert 0 <= recorded[4]["codes_changed"] <= 1
    plain = run_cli("qat", str(tiny_model_dir), *args[:-2], "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    for name in ("latent.safetensors", "quant.safetensors"):  # recording leaves the training unchanged
        assert (out / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()

    # the same probe batch, and the final checkpoint's three points, computed directly
    ref = resolve_model(str(tiny_model_dir))
    tokens = TokenSource(load_tokenizer(ref), ref, 0, CPU).tokens(str(sotu / "valid.txt"), "train")
    probe = TrainBatches(tokens, 64, 4, 0 + 2).next_batch()
    fp_model = load_model(ref, CPU)
    latent_model, _, _, layers = load_checkpoint(out, CPU, fake_quant=False)
    names = sorted(layers)
    with torch.no_grad():
        loss = {
            "fp": float(ce_loss(fp_model(probe).logits, probe)),
            "latent": float(ce_loss(latent_model(probe).logits, probe)),
        }
    fp = {n: fp_model.get_submodule(n).weight.detach().clone() for n in names}
    latent = {n: latent_model.get_submodule(n).weight.detach().clone() for n in names}
    quantized = {n: layers[n].fake_quant(latent[n]) for n in names}
    latent_to_grid = sum(float((latent[n] - quantized[n]).pow(2).sum()) for n in names)

    def loss_and_grad(point: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        for n in names:
            weight = latent_model.get_submodule(n).weight
            weight.data.copy_(point[n])
            weight.requires_grad_(True)
        value = ce_loss(latent_model(probe).logits, probe)
        value.backward()
        return float(value.detach()), {n: latent_model.get_submodule(n).weight.grad for n in names}

    quantized_loss, _ = loss_and_grad(quantized)
    last = recorded[4]
    assert last["loss_fp"] == pytest.approx(loss["fp"], rel=1e-5)
    assert last["loss_latent"] == pytest.approx(loss["latent"], rel=1e-5)
    assert last["loss_quantized"] == pytest.approx(quantized_loss, rel=1e-5)
    assert last["inward_cosine"] == pytest.approx(inward_component(loss_and_grad, fp, quantized).cosine, abs=1e-4)
    assert last["latent_to_grid"] == pytest.approx(latent_to_grid**0.5, rel=1e-4)

    shown = run_cli("diagnose", str(out), "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png"))
    assert shown.returncode == 0, shown.stderr
    assert json.loads((tmp_path / "r.json").read_text())["records"] == [r for r in records if "landscape" in r]
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_the_block_stage_records_reach_the_checkpoint_and_diagnose(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    out = tmp_path / "qat"
    args = ["--bits", "2", "--group-size", "32", "--data", str(sotu / "valid.txt"), "--steps", "0"]
    args += ["--block-epochs", "1", "--set", "qat.block.nsamples=8", "--set", "qat.block.seqlen=64"]
    made = run_cli("qat", str(tiny_model_dir), *args, "--set", "qat.record_every=1", "-o", str(out))
    assert made.returncode == 0, made.stderr
    records = [json.loads(line) for line in (out / "block_metrics.jsonl").read_text().splitlines()]
    # 8 windows in batches of 4: two steps a block
    assert [(r["block"], r["step"]) for r in records] == [(b, s) for b in (0, 1) for s in (0, 1, 2)]
    assert not (out / "metrics.jsonl").exists()
    shown = run_cli("diagnose", str(out), "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png"))
    assert shown.returncode == 0, shown.stderr
    assert "block stage" in shown.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["block_records"] == records and result["records"] == []
    assert (tmp_path / "r.png").stat().st_size > 10_000
