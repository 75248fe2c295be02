"""qatcli qat through the command line: training, export equality, resume, and bad input."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_export_is_exact, run_cli, tiny_llama_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error
from transformers import LlamaForCausalLM

from qatcli.evaluation import head
from qatcli.qat import losses
from qatcli.qat.trainer import lr_factor

CPU = torch.device("cpu")


def straightforward_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")


def straightforward_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("loss", ["kd", "ce"])
def test_chunked_losses_equal_the_straightforward_formulas(loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 512 * 7)  # chunks of 7 tokens, the last one shorter
    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config())
    teacher = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_logits = teacher(ids).logits

    def loss_and_grads(chunked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        student.zero_grad()
        logits = student(ids).logits
        if loss == "kd":
            value = (losses.kd_loss if chunked else straightforward_kd)(logits, teacher_logits)
        else:
            value = (losses.ce_loss if chunked else straightforward_ce)(logits, ids)
        (value / 2).backward()  # an upstream gradient that is not 1, as with gradient accumulation
        return value.detach(), [p.grad.clone() for p in student.parameters()]

    got, got_grads = loss_and_grads(chunked=True)
    expected, expected_grads = loss_and_grads(chunked=False)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    factors = [lr_factor(step, 10, 2, 0.1) for step in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))


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
        "--block-epochs",  # the end-to-end steps alone; tests/test_block.py covers the block stage
        "0",
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
    assert "without the block stage, from the MSE grid, collapses" in result.stderr  # 2 bits, e2e only, mse
    meta = json.loads((out / "qatcli.json").read_text())
    assert meta["method"] == "qat" and meta["qat"]["estimator"] == {"name": "fourier", "amplitudes": [0.21]}
    assert meta["metrics"]["steps"] == 8 and meta["metrics"]["eval"]["ppl"] < meta["metrics"]["eval"]["ppl_before"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert not (tmp_path / "qat.run").exists()

    assert_export_is_exact(out, tmp_path / "gptq")


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

    for name in ("latent.safetensors", "quant.safetensors"):
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
        (["--steps", "-1"], "qat.steps must be 0 or more"),
        (["--resume"], "nothing to resume"),
        (["--estimator", "jacobian", "--set", "qat.jacobian.blend=2"], "jacobian: blend must be in"),
        (["--set", "qat.jacobian.nope=1"], "unknown key 'qat.jacobian.nope'"),
        (["--set", "blend"], "--set takes KEY=VALUE"),
    ],
)
def test_bad_qat_input(tiny_model_dir: Path, sotu: Path, tmp_path: Path, extra: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli(*qat_args(tiny_model_dir, sotu, tmp_path / "o", *extra)), fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("estimator", ["ste", "fourier", "jacobian"])
def test_init_gptq_starts_every_estimator_from_the_gptq_model(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, estimator: str
) -> None:
    calib = ["--calib-data", str(sotu / "train.txt"), "--nsamples", "8", "--calib-seqlen", "64"]
    evaluation = ["--eval-data", str(sotu / "test.txt"), "--max-windows", "4", "--eval-seqlen", "64"]
    ptq = run_cli(
        "ptq",
        str(tiny_model_dir),
        "--method",
        "gptq",
        "--bits",
        "2",
        "--group-size",
        "32",
        *calib,
        *evaluation,
        "-o",
        str(tmp_path / "gptq"),
    )
    assert ptq.returncode == 0, ptq.stderr
    gptq_ppl = json.loads((tmp_path / "gptq" / "qatcli.json").read_text())["metrics"]["eval"]["ppl"]

    out = tmp_path / "qat"
    extra = ["--init", "gptq", "--estimator", estimator, "--steps", "2", "--block-epochs", "1"]
    extra += ["--set", "qat.block.nsamples=4", "--set", "qat.block.seqlen=32"]
    result = run_cli(*qat_args(tiny_model_dir, sotu, out, *extra, *calib, *evaluation))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "qatcli.json").read_text())
    assert meta["qat"]["init"] == "gptq" and meta["qat"]["estimator"]["name"] == estimator
    ev = meta["metrics"]["eval"]
    assert ev["ppl_before"] == pytest.approx(gptq_ppl, rel=1e-6)  # training started from the GPTQ model
    assert ev["ppl_after_blocks"] is not None and ev["ppl"] != ev["ppl_before"]


def test_eval_every_records_the_curve_without_changing_the_run(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    domains = f"{sotu / 'test.txt'},code:test"
    evaluation = ["--eval-data", domains, "--max-windows", "2", "--eval-seqlen", "64"]
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    for out, extra in ((plain, []), (curved, ["--eval-every", "2"])):
        result = run_cli(*qat_args(tiny_model_dir, sotu, out, "--steps", "4", *evaluation, *extra))
        assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (curved / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_ppl" in r] == [2, 4]
    final = json.loads((curved / "qatcli.json").read_text())["metrics"]["eval"]["ppl"]
    assert records[-1]["eval_ppl"] == pytest.approx(final, rel=1e-9)  # the recorded curve ends at the result
    ev = json.loads((curved / "qatcli.json").read_text())["metrics"]["eval"]
    assert records[-1]["eval_domains"] == {spec: d["ppl"] for spec, d in ev["domains"].items()}
    assert list(ev["domains_before"]) == [str(sotu / "test.txt"), "code:test"]  # each domain at the start too
    assert json.loads((plain / "qatcli.json").read_text())["metrics"]["eval"]["ppl"] == final


def test_compiled_kernels_train_as_plain_pytorch_does(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    """--fused on a model below auto's threshold: the block stage and the steps give what plain PyTorch gives (the
    forward is the same to the bit; the backward's scale-gradient sums and fourier's cos differ in the last bits)."""
    evaluation = ["--eval-data", str(sotu / "test.txt"), "--max-windows", "2", "--eval-seqlen", "64"]
    stage = ["--block-epochs", "1", "--set", "qat.block.nsamples=8", "--set", "qat.block.seqlen=64"]
    ppl = {}
    for name in ("fused", "no-fused"):
        out = tmp_path / name
        result = run_cli(
            *qat_args(
                tiny_model_dir, sotu, out, "--estimator", "fourier", "--steps", "3", *stage, *evaluation, f"--{name}"
            )
        )
        assert result.returncode == 0, result.stderr
        assert "kernels unavailable" not in result.stderr
        meta = json.loads((out / "qatcli.json").read_text())
        assert meta["recipe"]["qat"]["fused"] is (name == "fused")
        ppl[name] = meta["metrics"]["eval"]["ppl"]
    assert ppl["fused"] == pytest.approx(ppl["no-fused"], rel=1e-3)


def test_a_diverging_run_stops_with_its_last_good_state(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    blow_up = ["--lr", "1e30", "--scale-lr", "1e30", "--set", "qat.warmup_steps=0", "--save-every", "1"]
    result = run_cli(*qat_args(tiny_model_dir, sotu, out, "--steps", "6", *blow_up))
    assert result.returncode == 1
    assert_one_line_error(result, "step 2: the loss is nan: training stopped before that update, step 1 is saved")
    assert not out.exists()  # nothing written from a broken model
    state = torch.load(tmp_path / "qat.run" / "state.pt", weights_only=False)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["trainable"].values())

    skip = ["--set", "qat.skip_nonfinite=9", "--force"]
    skipping = run_cli(*qat_args(tiny_model_dir, sotu, out, "--steps", "6", *blow_up, *skip))
    assert skipping.returncode == 1 and not out.exists()
    assert_one_line_error(skipping, "scales or weights that are not finite and positive: nothing was written")


def test_a_diverging_block_stage_stops_and_keeps_its_finished_blocks(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    out = tmp_path / "qat"
    extra = ["--steps", "0", "--block-epochs", "1", "--set", "qat.block.nsamples=4", "--set", "qat.block.seqlen=32"]
    extra += ["--set", "qat.block.lr=1e30", "--set", "qat.block.scale_lr=1e30"]
    result = run_cli(*qat_args(tiny_model_dir, sotu, out, *extra))
    assert result.returncode == 1
    assert_one_line_error(result, "the loss is nan: the block stage stopped before that update")
    assert not out.exists() and (tmp_path / "qat.run" / "blocks").is_dir()


def test_resume_refuses_other_settings_or_data_and_takes_harmless_changes(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    data = tmp_path / "train.txt"
    data.write_text((sotu / "valid.txt").read_text())
    out = tmp_path / "qat"

    def qat(*extra: str) -> subprocess.CompletedProcess:
        return run_cli(*qat_args(tiny_model_dir, sotu, out, "--data", str(data), *extra))

    assert qat("--steps", "6", "--stop-after", "3").returncode == 0
    for extra, fragment in [
        (["--bits", "3"], "quant.bits (2 -> 3)"),
        (["--lr", "0.002", "--estimator", "fourier"], "qat.estimator (ste -> fourier); qat.lr (0.001 -> 0.002)"),
        (["--steps", "2"], "the run is at step 3, past --steps 2"),
    ]:
        assert_one_line_error(qat("--steps", "6", "--resume", *extra), fragment)
    data.write_text((sotu / "valid.txt").read_text()[:-2000])
    assert_one_line_error(qat("--steps", "6", "--resume"), "the training data")
    data.write_text((sotu / "valid.txt").read_text())
    harmless = ["--save-every", "2", "--gradient-checkpointing", "--eval-data", str(sotu / "test.txt")]
    done = qat("--steps", "8", "--resume", *harmless)
    assert done.returncode == 0, done.stderr
    assert "resuming at step 3 of 8" in done.stderr and (out / "qatcli.json").is_file()
