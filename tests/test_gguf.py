"""The GGUF export: each block type holds the checkpoint's codes exactly, llama.cpp loads every file and its logits
agree with qatcli's evaluation, quant.target makes every method produce an exportable grid, and the grids GGUF
cannot hold are refused in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint, run_cli

from qatcli.exporters.llama_cpp import ENV, llama_cpp_tree
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.gguf_blocks import BLOCK_TYPES, decode, encode
from qatcli.formats.gguf_file import read_gguf, tensor_values
from qatcli.quant.grid import QuantSpec, dequantize

TARGETS = {t.target: t for t in BLOCK_TYPES.values()}
# llama.cpp computes the quantized dot products with activations rounded to 8 bits (Q8_0/Q8_1). On this tiny model
# (8 windows of 128 tokens) its perplexity differed from qatcli's float32 evaluation by at most 0.013% (Q2_0
# +0.013%, Q4_0 +0.011%, Q4_1 +0.004%, Q8_0 -0.005%; 2026-12-07, 2-core x86 with AVX512): the bound leaves room for
# other SIMD paths
ENGINE_PPL_TOLERANCE = 0.0025


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's converter, fetched once for all workers (a shared cache entry: the first writer wins)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QATCLI_CACHE", str(tmp_path_factory.getbasetemp().parent / "llama-cpp"))
        return llama_cpp_tree()


@pytest.fixture(autouse=True)
def converter(tree: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(ENV, str(tree))
    yield


def _export(checkpoint: Path, out: Path, *extra: str) -> None:
    done = run_cli("export", str(checkpoint), "--format", "gguf", "-o", str(out), *extra)
    assert done.returncode == 0, done.stderr


def _target_checkpoint(model_dir: Path, out: Path, target: str, method: str = "rtn") -> Path:
    t = TARGETS[target]
    return make_checkpoint(model_dir, out, QuantSpec(t.bits, t.block, t.sym), method)


@pytest.mark.parametrize("codes_seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_blocks_decode_to_the_grid_values(name: str, codes_seed: int) -> None:
    t = BLOCK_TYPES[name]
    gen = np.random.default_rng(codes_seed)
    rows, cols = 3, 2 * t.block
    codes = gen.integers(0, 2**t.bits, (rows, cols), dtype=np.uint8)
    scales = gen.uniform(1e-3, 0.1, (rows, 2)).astype(np.float16)
    zeros = np.full((rows, 2), 2 ** (t.bits - 1), np.uint8) if t.sym else gen.integers(0, 16, (rows, 2), np.uint8)
    blocks = encode(t, codes, scales, zeros)
    assert blocks.shape == (rows, 2 * t.bytes_per_block)
    g_idx = torch.arange(cols) // t.block
    expected = dequantize(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros), g_idx).numpy()
    got = decode(t, blocks, cols)
    if t.sym:
        assert np.array_equal(got, expected)
    else:  # Q4_1: the offset -s*z is stored as fp16
        assert np.abs(got - expected).max() <= np.abs(expected).max() * 2**-10


def test_the_pypi_gguf_package_decodes_our_q4_and_q8_blocks_alike() -> None:
    """An independent decoder (the gguf package's numpy port of ggml) for the types it knows."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    gen = np.random.default_rng(0)
    for name in ("Q4_0", "Q4_1", "Q8_0"):
        t = BLOCK_TYPES[name]
        codes = gen.integers(0, 2**t.bits, (4, 64), dtype=np.uint8)
        scales = gen.uniform(1e-3, 0.1, (4, 2)).astype(np.float16)
        zeros = np.full((4, 2), 2 ** (t.bits - 1), np.uint8) if t.sym else gen.integers(0, 16, (4, 2), np.uint8)
        blocks = encode(t, codes, scales, zeros)
        theirs = reference(blocks, GGMLQuantizationType[name])
        assert np.array_equal(theirs, decode(t, blocks, 64)), name


@pytest.mark.parametrize("target", list(TARGETS))
def test_each_type_holds_the_checkpoint_weights_bit_for_bit(tiny_model_dir: Path, tmp_path: Path, target: str) -> None:
    ckpt = _target_checkpoint(tiny_model_dir, tmp_path / "ckpt", target)
    out = tmp_path / "model.gguf"
    _export(ckpt, out)
    model, _, _, layers = load_checkpoint(ckpt, torch.device("cpu"), fake_quant=True)
    weights = {name: model.get_submodule(name).weight.detach().numpy() for name in layers}
    meta, tensors = read_gguf(out)
    assert meta["qatcli.base_model"] == str(tiny_model_dir) and meta["general.architecture"] == "llama"
    block = TARGETS[target]
    quantized = {n: info for n, info in tensors.items() if info.type_name == block.name}
    assert len(quantized) == len(layers)
    for gguf_name, info in quantized.items():
        values = tensor_values(out, info) + 0.0  # Q2_0's negative scale makes -0.0 of a zero weight
        # the layer it came from: the same matrix, or (llama's q and k, which the converter lays out for its rope)
        # the same rows in another order
        tolerance = 0.0 if block.sym else 2**-10 * max(np.abs(w).max() for w in weights.values())
        assert any(_same_rows(w, values, tolerance) for w in weights.values()), gguf_name
    assert all(info.type_name == "F32" for n, info in tensors.items() if n.endswith("norm.weight"))


def _same_rows(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Whether every row of ``b`` is a row of ``a`` (within ``tolerance``) and the shapes agree."""
    if a.shape != b.shape:
        return False
    distance = np.abs(b[:, None, :] - a[None, :, :]).max(axis=-1)  # [rows of b, rows of a]
    return bool((distance.min(axis=1) <= tolerance).all())


@pytest.mark.parametrize("target", list(TARGETS))
def test_llama_cpp_runs_each_file_as_qatcli_evaluates_the_checkpoint(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, target: str
) -> None:
    ckpt = _target_checkpoint(tiny_model_dir, tmp_path / "ckpt", target)
    out = tmp_path / "model.gguf"
    _export(ckpt, out, "--gguf-embedding", "f32", "--dtype", "float32")
    rows_path = tmp_path / "rows.json"
    done = run_cli(
        "eval", str(ckpt), str(out), "--data", str(sotu / "test.txt"), "--seqlen", "128", "--max-windows", "8",
        "--json", str(rows_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ours, engine = json.loads(rows_path.read_text())
    assert engine["format"] == f"gguf {TARGETS[target].name}" and engine["windows"] == ours["windows"] == 8
    assert abs(engine["ppl"] / ours["ppl"] - 1) < ENGINE_PPL_TOLERANCE, (engine["ppl"], ours["ppl"])


def test_target_sets_the_grid_for_ptq_and_refuses_a_contradiction(tiny_model_dir: Path, tmp_path: Path) -> None:
    made = run_cli("ptq", str(tiny_model_dir), "--target", "gguf:q4_1", "-o", str(tmp_path / "q41"))
    assert made.returncode == 0, made.stderr
    q = json.loads((tmp_path / "q41" / "qatcli.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["sym"]) == (4, 32, False)
    clash = run_cli("ptq", str(tiny_model_dir), "--target", "gguf:q2_0", "--bits", "3", "-o", str(tmp_path / "x"))
    assert clash.returncode == 2 and "quant.target gguf:q2_0 means quant.bits 2, got 3" in clash.stderr
    unknown = run_cli("ptq", str(tiny_model_dir), "--target", "gguf:q3_k", "-o", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "quant.target must be one of gguf:q2_0" in unknown.stderr


@pytest.mark.parametrize(
    ("spec", "act_order", "message"),
    [
        (QuantSpec(3, 32, True), False, "sym 3-bit g32 grid, which no GGUF block type stores exactly"),
        (QuantSpec(2, 64, False), False, "asym 2-bit g64 grid"),
        (QuantSpec(4, 64, True), False, "sym 4-bit g64 grid"),
        (QuantSpec(4, 32, True), True, "act-order g_idx"),
    ],
)
def test_grids_gguf_cannot_hold_are_refused_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, spec: QuantSpec, act_order: bool, message: str
) -> None:
    ckpt = make_checkpoint(tiny_model_dir, tmp_path / "ckpt", spec, "gptq" if act_order else "rtn", act_order)
    done = run_cli("export", str(ckpt), "--format", "gguf", "-o", str(tmp_path / "m.gguf"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("qatcli: error:") and message in line, line
    if not act_order:
        assert "--target gguf:q2_0|gguf:q4_0|gguf:q4_1|gguf:q8_0" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no file, no temporary left


def test_tasks_on_a_gguf_file_are_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = _target_checkpoint(tiny_model_dir, tmp_path / "ckpt", "gguf:q8_0")
    _export(ckpt, tmp_path / "m.gguf")
    done = run_cli("eval", str(tmp_path / "m.gguf"), "--tasks", "arc_easy")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--tasks needs a torch model and gguf runs in its own engine" in done.stderr.strip().splitlines()[-1]


def test_a_gguf_output_must_be_a_gguf_file_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    ckpt = _target_checkpoint(tiny_model_dir, tmp_path / "ckpt", "gguf:q4_0")
    done = run_cli("export", str(ckpt), "--format", "gguf", "-o", str(tmp_path / "model"))
    assert done.returncode == 2 and "give -o a name ending in .gguf" in done.stderr
