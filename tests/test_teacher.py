"""The kd teacher in another dtype and on another device than the student."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from conftest import run_cli, tiny_llama_config
from test_qat import qat_args
from transformers import LlamaForCausalLM

from qatcli.qat.losses import model_kd_loss


def test_a_bf16_teacher_gives_nearly_the_fp32_teachers_loss() -> None:
    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config())
    teacher = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    exact = model_kd_loss(student, teacher, ids)
    half = model_kd_loss(student, copy.deepcopy(teacher).to(torch.bfloat16), ids)
    assert half.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the teacher's logits move by about 2^-8 of their size
    torch.testing.assert_close(half, exact, rtol=2e-2, atol=0)
    half.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_qat_takes_a_bf16_teacher_on_the_cpu(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    extra = ("--steps", "3", "--teacher-dtype", "bfloat16", "--teacher-device", "cpu")
    result = run_cli(*qat_args(tiny_model_dir, sotu, out, *extra))
    assert result.returncode == 0, result.stderr
    recipe = json.loads((out / "qatcli.json").read_text())["recipe"]["qat"]
    assert (recipe["teacher_dtype"], recipe["teacher_device"]) == ("bfloat16", "cpu")
