"""An independent loader reads the export: transformers + optimum + GPTQModel on the CPU.

transformers hands GPTQ checkpoints to optimum, which builds GPTQModel's quantized Linear layers and loads
the packed tensors itself; nothing of qatcli is involved in that path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from transformers import AutoModelForCausalLM

from qatcli.formats.export import export_gptq
from qatcli.formats.packed_model import load_gptq_model
from qatcli.quant.grid import QuantSpec


@pytest.mark.parametrize(
    ("bits", "sym", "act_order"),
    [(2, True, False), (3, True, True), (4, True, False), (8, True, False), (4, False, False)],
)
def test_transformers_with_gptqmodel_matches_qatcli(
    tiny_model_dir: Path, tmp_path: Path, bits: int, sym: bool, act_order: bool
) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", QuantSpec(bits, 32, sym), "gptq", act_order)
    out = tmp_path / "gptq"
    out.mkdir()
    export_gptq(ckpt, out, dtype="float16")

    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    q_proj = theirs.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("gptqmodel"), type(q_proj)
    ours, _, _ = load_gptq_model(out, torch.device("cpu"))

    ids = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        their_logits = theirs(ids).logits.float()
        our_logits = ours(ids).logits
    rel = float((their_logits - our_logits).norm() / our_logits.norm())
    print(f"bits={bits} sym={sym} act_order={act_order}: relative logits error {rel:.2e}")
    assert rel <= 1e-2


@pytest.mark.parametrize("bits", [2, 4])
def test_layers_left_dense_load_dense(odd_width_model_dir: Path, tmp_path: Path, bits: int) -> None:
    ckpt = make_checkpoint(odd_width_model_dir, tmp_path / "ckpt", QuantSpec(bits, -1), "rtn")
    out = tmp_path / "gptq"
    out.mkdir()
    report = export_gptq(ckpt, out)
    assert report.dense
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(theirs.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    ours, _, _ = load_gptq_model(out, torch.device("cpu"))
    ids = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        their_logits = theirs(ids).logits.float()
        our_logits = ours(ids).logits
    assert float((their_logits - our_logits).norm() / our_logits.norm()) <= 1e-2
