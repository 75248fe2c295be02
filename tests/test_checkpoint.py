"""Checkpoints store what differs from the base model: small, exact on reload, bound to their base by a hash."""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tokenizer, tiny_llama_config
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from typer.testing import CliRunner

import qatcli
from qatcli.config import GPTQOptions
from qatcli.errors import QatcliError
from qatcli.formats import checkpoint
from qatcli.formats.checkpoint import LATENT_FILE, QUANT_FILE, load_checkpoint, read_meta, save_checkpoint
from qatcli.quant.gptq_model import quantize_gptq
from qatcli.quant.grid import QuantSpec
from qatcli.quant.layer import LayerQuant, apply_fake_quant
from qatcli.quant.rtn import quantize_rtn
from qatcli.quant.targets import find_targets

CPU = torch.device("cpu")
TEXT = " ".join(
    f"In the year {1790 + i} the Congress met, and the President spoke of the Union, of trade and of peace."
    for i in range(200)
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with tied embeddings (as SmolLM2) and a small BPE tokenizer."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = build_tokenizer(TEXT, vocab_size=300)
    config = tiny_llama_config(len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def quantize(base: Path, method: str) -> tuple[nn.Module, Any, dict[str, LayerQuant]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    targets = find_targets(model, [], [])
    spec = QuantSpec(3, 32)
    if method == "gptq":
        windows = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
        layers, _ = quantize_gptq(model, targets, spec, GPTQOptions(), "minmax", windows, CPU)
    else:
        layers = quantize_rtn(targets, spec, "minmax")
    return model, tokenizer, layers


def write(base: Path, out: Path, method: str = "gptq") -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in ``out``, and the state of the model it was written from."""
    model, tokenizer, layers = quantize(base, method)
    meta = {
        "method": method,
        "base_model": {"spec": str(base), "kind": "local", "location": str(base)},
        "quantization": {"bits": 3, "group_size": 32, "sym": True},
        "recipe": {},
        "provenance": {},
        "metrics": {},
    }
    out.mkdir()
    save_checkpoint(out, model, tokenizer, layers, meta)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


def quantized_params(meta: dict[str, Any]) -> int:
    return sum(info["in_features"] * info["out_features"] for info in meta["layers"].values())


def grid_bytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(path / QUANT_FILE)).values())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_checkpoint_holds_only_the_quantized_layers_and_reloads_exactly(
    base_dir: Path, tmp_path: Path, method: str
) -> None:
    path, state = write(base_dir, tmp_path / "ckpt", method)
    meta = read_meta(path)
    assert meta["format_version"] == 2 and list(meta["base_model"]["sha256"]) == ["model.safetensors"]
    assert not (path / "model.safetensors").exists()

    # GPTQ moves every latent weight off the base's; RTN's are the base weights, so none is stored.
    stored = load_file(str(path / LATENT_FILE))
    expected = 4 * quantized_params(meta) if method == "gptq" else 0
    assert sum(t.numel() * t.element_size() for t in stored.values()) == expected
    assert {info["latent"] for info in meta["layers"].values()} == {"stored" if method == "gptq" else "base"}
    tensors = (LATENT_FILE, QUANT_FILE)
    assert sum((path / f).stat().st_size for f in tensors) < expected + grid_bytes(path) + 64 * 1024
    others = sum(p.stat().st_size for p in path.iterdir() if p.name not in tensors)
    assert others < 100 * 1024  # tokenizer, configs and qatcli.json

    model, _, _, layers = load_checkpoint(path, CPU, fake_quant=False)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    model, _, _, _ = load_checkpoint(path, CPU)
    reference = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference.load_state_dict(state)
    apply_fake_quant(reference, layers)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_a_changed_or_missing_base_is_refused_in_one_line(base_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    path, _ = write(base, tmp_path / "ckpt")

    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2  # not a quantized layer: the checkpoint lacks it
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QatcliError) as err:
        load_checkpoint(path, CPU)
    assert str(path) in str(err.value) and "changed since the checkpoint was made" in str(err.value)
    assert "\n" not in str(err.value)

    shutil.rmtree(base)
    with pytest.raises(QatcliError) as err:
        load_checkpoint(path, CPU)
    assert str(path) in str(err.value) and "is missing" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_loads_from_another_directory(base_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """A local base is recorded by its absolute path, so a relative spec still finds it from elsewhere."""
    monkeypatch.chdir(base_dir.parent)
    model, tokenizer, layers = quantize(base_dir, "rtn")
    meta = {"method": "rtn", "base_model": {"spec": base_dir.name, "kind": "local", "location": base_dir.name}}
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer, layers, meta)
    monkeypatch.chdir(tmp_path)
    assert read_meta(Path("ckpt"))["base_model"]["location"] == str(base_dir.resolve())
    load_checkpoint(Path("ckpt"), CPU)


def test_version_1_is_read_and_unknown_versions_are_refused(base_dir: Path, tmp_path: Path) -> None:
    path, state = write(base_dir, tmp_path / "ckpt")
    meta = json.loads((path / "qatcli.json").read_text())
    v1 = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    v1.load_state_dict(state)
    v1.save_pretrained(path)  # version 1 held the whole model in model.safetensors
    (path / LATENT_FILE).unlink()
    (path / "qatcli.json").write_text(json.dumps({**meta, "format_version": 1}))
    model, _, _, _ = load_checkpoint(path, CPU, fake_quant=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    (path / "qatcli.json").write_text(json.dumps({**meta, "format_version": 4}))
    with pytest.raises(QatcliError, match="has format version 4; this qatcli reads versions 1, 2, 3"):
        read_meta(path)


def test_qat_changes_nothing_but_what_the_checkpoint_stores(base_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """Every parameter outside the quantized layers' weights (and grids) still equals the base's when QAT saves."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    checked = []

    def spy(directory: Path, model: nn.Module, tokenizer: Any, layers: dict, meta: dict) -> None:
        for key, tensor in model.state_dict().items():
            if not (key.endswith(".weight") and key.removesuffix(".weight") in layers):
                assert torch.equal(tensor.cpu(), base[key]), key
        checked.append(sorted(layers))
        save_checkpoint(directory, model, tokenizer, layers, meta)

    # Callers import save_checkpoint by name: replace it wherever it was imported.
    for info in pkgutil.walk_packages(qatcli.__path__, "qatcli."):
        if info.name.endswith("__main__"):  # importing it would run the command line
            continue
        module = importlib.import_module(info.name)
        if module is not checkpoint and getattr(module, "save_checkpoint", None) is save_checkpoint:
            monkeypatch.setattr(module, "save_checkpoint", spy)
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "qat"
    args = ["qat", str(base_dir), "--bits", "2", "--group-size", "32", "--data", str(data), "--seqlen", "32"]
    args += ["--batch-size", "2", "--steps", "2", "--loss", "ce", "--lr", "1e-2", "--scale-lr", "1e-3"]
    from qatcli.cli import app

    result = CliRunner().invoke(app, [*args, "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(checked) == 1 and len(checked[0]) == 14
    assert {info["latent"] for info in read_meta(out)["layers"].values()} == {"stored"}


def test_provenance_records_threads_versions_and_the_deterministic_mode(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    for extra, deterministic in (([], False), (["--set", "deterministic=true"], True)):
        out = tmp_path / f"q{deterministic}"
        made = run_cli("ptq", str(tiny_model_dir), "--bits", "4", "-o", str(out), *extra)
        assert made.returncode == 0, made.stderr
        prov = read_meta(out)["provenance"]
        assert prov["deterministic"] is deterministic and prov["threads"] >= 1
        assert prov["torch"] == torch.__version__ and prov["python"]
