"""Property tests (hypothesis): the grid and the packing over random shapes and values, and fuzzed inputs
to the recipe parser and to the GPTQ-directory loader, which must answer a QatcliError and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatcli.errors import QatcliError
from qatcli.formats.gptq_format import pack_layer, unpack_layer
from qatcli.formats.packed_model import load_gptq_model
from qatcli.formats.packing import pack, unpack
from qatcli.quant.grid import QuantSpec, default_g_idx, dequantize, group_qparams, quantize
from qatcli.recipe import load_recipe

BITS = st.sampled_from([2, 3, 4, 8])
CPU = torch.device("cpu")


@st.composite
def weights(draw: st.DrawFn) -> tuple[torch.Tensor, QuantSpec]:
    """A weight matrix with a grid spec that fits it: random size, scale, outliers, sym or asym."""
    bits, sym = draw(BITS), draw(st.booleans())
    group_size = draw(st.sampled_from([8, 16, 32, -1]))
    groups = draw(st.integers(1, 4))
    columns = groups * (group_size if group_size > 0 else draw(st.integers(1, 40)))
    rows = draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(rows, columns, generator=gen) * draw(st.sampled_from([1e-4, 0.02, 1.0, 30.0]))
    if draw(st.booleans()):  # a few large outliers
        w.view(-1)[torch.randint(0, w.numel(), (3,), generator=gen)] *= 50
    return w, QuantSpec(bits, group_size, sym)


@settings(max_examples=150, deadline=None)
@given(case=weights(), clip=st.sampled_from(["minmax", "mse"]))
def test_codes_are_in_range_and_quantizing_the_quantized_weight_changes_nothing(
    case: tuple[torch.Tensor, QuantSpec], clip: str
) -> None:
    w, spec = case
    scales, zeros = group_qparams(w, spec, clip)
    g_idx = default_g_idx(w.shape[1], spec.group_size if spec.group_size > 0 else w.shape[1])
    codes = quantize(w, scales, zeros, g_idx, spec.maxq)
    assert int(codes.min()) >= 0 and int(codes.max()) <= spec.maxq
    assert bool((scales > 0).all()) and torch.equal(scales.float(), scales.half().float())  # on the fp16 grid
    dequantized = dequantize(codes, scales, zeros, g_idx)
    assert torch.equal(quantize(dequantized, scales, zeros, g_idx, spec.maxq), codes)  # idempotent
    if spec.sym:
        assert bool((zeros == 2 ** (spec.bits - 1)).all())
    if clip == "minmax":  # min/max: every weight within half a step of its grid value
        step = scales.float().repeat_interleave(w.shape[1] // scales.shape[1], dim=1)
        inside = (w >= dequantize(torch.zeros_like(codes), scales, zeros, g_idx)) & (
            w <= dequantize(torch.full_like(codes, spec.maxq), scales, zeros, g_idx)
        )
        assert bool(((w - dequantized).abs() <= step / 2 * (1 + 1e-3) + 1e-7)[inside].all())


@settings(max_examples=100, deadline=None)
@given(
    bits=BITS, chunks=st.integers(1, 4), width=st.integers(1, 9), dim=st.sampled_from([0, 1]), seed=st.integers(0, 999)
)
def test_unpack_inverts_pack(bits: int, chunks: int, width: int, dim: int, seed: int) -> None:
    shape = (32 * chunks, width) if dim == 0 else (width, 32 * chunks)
    values = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))
    words = pack(values, bits, dim)
    assert words.dtype == torch.int32 and words.shape[dim] == chunks * bits
    assert torch.equal(unpack(words, bits, dim), values)


@settings(max_examples=60, deadline=None)
@given(
    bits=BITS,
    out=st.integers(1, 3),
    groups=st.integers(1, 3),
    seed=st.integers(0, 999),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
)
def test_a_packed_layer_unpacks_to_its_codes_zeros_and_scales(
    bits: int, out: int, groups: int, seed: int, fmt: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    in_f, out_f = 32 * groups, 32 * out
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen)
    low = 1 if fmt == "gptq" else 0  # v1 stores zero - 1
    zeros = torch.randint(low, 2**bits, (out_f, groups), generator=gen)
    scales = (torch.rand(out_f, groups, generator=gen) + 0.01).half()
    g_idx = default_g_idx(in_f, 32)
    got_codes, got_zeros, got_scales = unpack_layer(pack_layer(codes, scales, zeros, g_idx, bits, fmt), bits, fmt)
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros)
    assert torch.equal(got_scales, scales.float())


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 600),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["auto", "gptq", "rtn", "qat", "fourier", "ste", "kd", "mse", "-1", "sotu:test"]),
)
KEYS = st.sampled_from(
    [
        "model",
        "output",
        "seed",
        "quant",
        "bits",
        "group_size",
        "sym",
        "clip",
        "qat",
        "block",
        "epochs",
        "lr",
        "steps",
        "estimator",
        "eval",
        "data",
        "max_windows",
        "compare",
        "methods",
        "method",
        "export",
        "dtype",
        "x",
    ]
)
DOCUMENTS = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_any_recipe_document_is_a_recipe_or_one_qatcli_error(document: object, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_recipe(path, {})
    except QatcliError as err:
        assert str(err) and "\n" not in str(err)


@pytest.fixture(scope="module")
def gptq_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import run_cli

    base = tmp_path_factory.mktemp("fuzz")
    made = run_cli("ptq", str(tiny_model_dir), "--bits", "4", "-o", str(base / "q"))
    assert made.returncode == 0, made.stderr
    exported = run_cli("export", str(base / "q"), "-o", str(base / "gptq"))
    assert exported.returncode == 0, exported.stderr
    return base / "gptq"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        ["bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method", "dynamic", "pack_dtype"]
    ),
    value=st.one_of(SCALARS, st.dictionaries(st.text(max_size=5), SCALARS, max_size=2), st.lists(SCALARS, max_size=2)),
)
def test_any_damaged_gptq_config_loads_or_is_one_qatcli_error(
    gptq_dir: Path, tmp_path: Path, key: str, value: object
) -> None:
    work = tmp_path / "gptq"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(gptq_dir, work)
    config = json.loads((work / "config.json").read_text())
    config["quantization_config"][key] = value
    (work / "config.json").write_text(json.dumps(config))
    qcfg = json.loads((work / "quantize_config.json").read_text())
    qcfg[key] = value
    (work / "quantize_config.json").write_text(json.dumps(qcfg))
    try:
        load_gptq_model(work, CPU)
    except QatcliError as err:
        assert str(err) and "\n" not in str(err)
