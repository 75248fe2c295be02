"""Mixed precision: quant.dynamic rules give layers their own grids, quant.lm_head quantizes lm_head.

Each layer's grid is checked where it is stored (codes, zero points, scales), where it is exported (GPTQModel's
`dynamic`, compressed-tensors' config groups) and where it is read back: by GPTQModel's own loader, by qatcli's
packed loader, and by compare's average bits.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import briefly_train, build_tokenizer, run_cli, tiny_llama_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error
from test_compare import compare_in_process
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from qatcli.config import QuantConfig
from qatcli.errors import QatcliError
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.formats.export import export_compressed_tensors, export_gptq
from qatcli.formats.packed_model import PackedLinear, load_gptq_model
from qatcli.pipeline.ptq import make_ptq_checkpoint
from qatcli.quant.grid import QuantSpec
from qatcli.quant.targets import find_targets, layer_specs
from qatcli.recipe import load_recipe

CPU = torch.device("cpu")
# First match wins: layer 0 is all 4-bit (its down_proj and o_proj too), down_proj of layer 1 is 8-bit with groups
# of 64, o_proj of layer 1 asymmetric; every other layer takes the default, 2 bits, groups of 32, symmetric.
RULES = {r"\.layers\.0\.": {"bits": 4}, "down_proj": {"bits": 8, "group_size": 64}, "o_proj": {"sym": False}}


def expected_spec(name: str) -> QuantSpec:
    if ".layers.0." in name:
        return QuantSpec(4, 32, True)
    if name.endswith("down_proj"):
        return QuantSpec(8, 64, True)
    if name.endswith("o_proj"):
        return QuantSpec(2, 32, False)
    return QuantSpec(2, 32, True)


def ptq(model: Path, out: Path, sotu: Path, method: str = "rtn", **values: object) -> Path:
    recipe = load_recipe(
        None,
        {
            "model": str(model),
            "output": str(out),
            "quant.method": method,
            "quant.bits": 2,
            "quant.group_size": 32,
            "quant.clip": "minmax",
            "calib.data": str(sotu / "train.txt"),
            "calib.nsamples": 8,
            "calib.seqlen": 32,
            **values,
        },
    )
    make_ptq_checkpoint(recipe, force=False)
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory, sotu: Path) -> Path:
    """A small Llama whose lm_head is the input embeddings' weight (tie_word_embeddings), as smollm2's is."""
    path = tmp_path_factory.mktemp("tied-llama")
    text = (sotu / "train.txt").read_text()
    tokenizer = build_tokenizer(text)
    config = tiny_llama_config(len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    briefly_train(model, torch.tensor(tokenizer(text)["input_ids"]), steps=60)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_layer_specs_first_rule_wins_and_auto_resolves_per_rule() -> None:
    model = LlamaForCausalLM(tiny_llama_config())
    targets = find_targets(model, [], [])
    quant = QuantConfig(bits=3, group_size="auto", dynamic={"mlp": {"bits": 4}, "down_proj": {"bits": 8}})
    specs = layer_specs(targets, quant)
    # auto: 64 divides every layer (in_features 64 and 128); down_proj is matched by "mlp" first
    assert specs["model.layers.1.mlp.down_proj"] == QuantSpec(4, 64)
    assert specs["model.layers.1.self_attn.q_proj"] == QuantSpec(3, 64)
    # a rule's auto resolves over its own layers: down_proj alone reads 128 columns
    quant = QuantConfig(bits=2, group_size=32, dynamic={"down_proj": {"group_size": "auto"}})
    specs = layer_specs(targets, quant)
    assert specs["model.layers.0.mlp.down_proj"] == QuantSpec(2, 128)
    assert specs["model.layers.0.mlp.up_proj"] == QuantSpec(2, 32)
    with pytest.raises(QatcliError, match=r"rule 'gate_proj'.* 48 does not divide in_features 64 of model\.layers\.0"):
        layer_specs(targets, QuantConfig(bits=2, group_size=32, dynamic={"gate_proj": {"group_size": 48}}))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_each_layer_is_stored_on_its_own_grid(tiny_model_dir: Path, sotu: Path, tmp_path: Path, method: str) -> None:
    ckpt = ptq(tiny_model_dir, tmp_path / "ckpt", sotu, method, **{"quant.dynamic": RULES})
    meta = json.loads((ckpt / "qatcli.json").read_text())
    assert meta["quantization"]["dynamic"] == RULES
    assert meta["quantization"]["bits"] == 2 and meta["quantization"]["group_size"] == 32
    model, _, _, layers = load_checkpoint(ckpt, CPU, fake_quant=False)
    assert len(layers) == 14
    for name, lq in layers.items():
        spec = expected_spec(name)
        assert lq.spec == spec, name
        info = meta["layers"][name]
        assert (info["bits"], info["group_size"], info["sym"]) == (spec.bits, spec.group_size, spec.sym)
        weight = model.get_submodule(name).weight.detach()
        codes = lq.codes(weight)
        # the codes fill this layer's own range: more than the 2-bit default's, never past its own maxq
        assert int(codes.max()) <= spec.maxq and int(codes.max()) > (spec.maxq >> 1), name
        assert lq.scales.shape == (weight.shape[0], weight.shape[1] // spec.group_size), name
        assert int(lq.zeros.max()) <= spec.maxq
        if spec.sym:
            assert bool((lq.zeros == 2 ** (spec.bits - 1)).all()), name
        else:
            assert len(set(lq.zeros.flatten().tolist())) > 1, name
        if method == "gptq":  # GPTQ's latent weights are its grid points
            assert torch.equal(lq.fake_quant(weight), weight), name


def test_a_layer_that_disagrees_with_its_rule_is_refused(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    ckpt = ptq(tiny_model_dir, tmp_path / "ckpt", sotu, **{"quant.dynamic": RULES})
    meta_path = ckpt / "qatcli.json"
    meta = json.loads(meta_path.read_text())
    meta["quantization"]["dynamic"]["down_proj"]["bits"] = 4  # the rule now says 4, the layer holds 8
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(QatcliError, match=r"model\.layers\.1\.mlp\.down_proj: .*dynamic rule 'down_proj'"):
        load_checkpoint(ckpt, CPU)


def test_mixed_gptq_export_loads_with_each_layers_grid(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = ptq(tiny_model_dir, tmp_path / "ckpt", sotu, "gptq", **{"quant.dynamic": RULES})
    reference, _, _, layers = load_checkpoint(ckpt, CPU)
    exact, half = tmp_path / "fp32", tmp_path / "fp16"
    exact.mkdir()
    half.mkdir()
    export_gptq(ckpt, exact, dtype="float32")
    report = export_gptq(ckpt, half, dtype="float16")
    assert report.fmt == "gptq_v2"  # one asymmetric layer makes the whole export v2

    qcfg = json.loads((half / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["lm_head"]) == (2, 32, True, False)
    for name in layers:  # one exact rule per layer off the default, with GPTQModel's field names
        rule = qcfg["dynamic"].get(f"+:^{re.escape(name)}$")
        spec = expected_spec(name)
        fields = {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym}
        assert rule == (None if spec == QuantSpec(2, 32) else fields), name
    assert qcfg["dynamic"][r"+:^model\.layers\.0\.self_attn\.qkv_proj$"] == {"bits": 4, "group_size": 32, "sym": True}

    # qatcli's own packed loader: each layer's bits, and bit for bit the checkpoint's model
    ours, _, _ = load_gptq_model(exact, CPU)
    modules = dict(ours.named_modules())
    for name in layers:
        assert isinstance(modules[name], PackedLinear) and modules[name].bits == expected_spec(name).bits, name
        assert torch.equal(modules[name].dequantized_weight(), reference.get_submodule(name).weight), name
    assert torch.equal(logits(ours), logits(reference))

    # eval's table shows the average bits of both, beside the default
    from qatcli.commands.evaluate import bits_cell
    from qatcli.pipeline.evaluate import load_for_eval
    from qatcli.quant.layer import average_bits

    for loaded in (load_for_eval(str(ckpt), CPU), load_for_eval(str(exact), CPU)):
        assert loaded.info["avg_bits"] == pytest.approx(average_bits(layers)) and average_bits(layers) > 2
        assert bits_cell(loaded.info) == f"2 (avg {average_bits(layers):.2f})"

    # GPTQModel's own loader reads `dynamic`: each QuantLinear has its layer's bits, group size and symmetry
    from gptqmodel import GPTQModel

    theirs = GPTQModel.load(str(half), device="cpu", dtype=torch.float16).model
    for name in layers:
        module, spec = theirs.get_submodule(name), expected_spec(name)
        assert type(module).__module__.startswith("gptqmodel"), (name, type(module))
        assert (module.bits, module.group_size, module.sym) == (spec.bits, spec.group_size, spec.sym), name
    rel = relative(logits(theirs), logits(reference))
    print(f"GPTQModel vs qatcli, mixed 2/4/8 bits: relative logits error {rel:.2e}")
    assert rel <= 1e-2

    # transformers' own GPTQ path (optimum 2.3.0) reads no `dynamic`: it refuses the layers whose size differs
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(half, device_map="cpu")


def test_mixed_compressed_tensors_export_has_a_group_per_grid(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    ckpt = ptq(tiny_model_dir, tmp_path / "ckpt", sotu, **{"quant.dynamic": {"down_proj": {"bits": 4}}})
    out = tmp_path / "ct"
    out.mkdir()
    export_compressed_tensors(ckpt, out, dtype="float32")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert sorted(by_bits) == [2, 4]
    assert by_bits[4] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(by_bits[2]) == 12
    reference, _, _, _ = load_checkpoint(ckpt, CPU)
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # compressed-tensors decompresses
    assert torch.equal(logits(theirs), logits(reference))


def test_qat_with_dynamic_rules_trains_and_exports(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "qat.yaml"
    recipe.write_text(
        f"""
model: {tiny_model_dir}
output: {tmp_path / "qat"}
quant:
  bits: 2
  group_size: 32
  dynamic:
    '\\.layers\\.0\\.': {{bits: 4}}
    'down_proj': {{bits: 8, group_size: 64}}
    'o_proj': {{sym: false}}
qat:
  data: {sotu / "valid.txt"}
  steps: 2
  batch_size: 2
  seqlen: 32
  loss: ce
  block: {{nsamples: 4, seqlen: 32, batch_size: 2}}
export: {{output: {tmp_path / "gptq"}, dtype: float32}}
"""
    )
    trained = run_cli("qat", "--recipe", str(recipe))
    assert trained.returncode == 0, trained.stderr
    assert "2 (4 for 7 layers, 8 for 1 layer)" in trained.stdout  # the per-layer mix in the summary
    meta = json.loads((tmp_path / "qat" / "qatcli.json").read_text())
    assert meta["metrics"]["block_epochs"] == 2  # auto goes by the lowest bits (2), not 4 or 8
    model, _, _, layers = load_checkpoint(tmp_path / "qat", CPU)
    assert {name: lq.spec for name, lq in layers.items()} == {name: expected_spec(name) for name in layers}
    exported = run_cli("export", "--recipe", str(recipe))
    assert exported.returncode == 0, exported.stderr
    assert "per-layer grids" in exported.stderr  # transformers' own GPTQ path cannot read them
    packed, _, _ = load_gptq_model(tmp_path / "gptq", CPU)
    assert packed.get_submodule("model.layers.1.mlp.down_proj").bits == 8
    assert torch.equal(logits(packed), logits(model))


def test_quantized_lm_head_is_untied_packed_and_loads(tied_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32)
    ckpt = ptq(tied_model_dir, tmp_path / "ckpt", sotu, **{"quant.lm_head": True, "quant.bits": 4})
    meta = json.loads((ckpt / "qatcli.json").read_text())
    assert meta["quantization"]["lm_head"] is True
    assert meta["quantization"]["untied_lm_head"] == "model.embed_tokens.weight"
    assert meta["layers"]["lm_head"]["latent"] == "base"  # RTN's latent lm_head is the tied base weight
    assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is False

    reference, _, _, layers = load_checkpoint(ckpt, CPU)
    assert "lm_head" in layers
    assert torch.equal(reference.model.embed_tokens.weight, base.model.embed_tokens.weight)  # left as it was
    assert not torch.equal(reference.lm_head.weight, base.lm_head.weight)  # quantized
    assert torch.equal(reference.lm_head.weight, layers["lm_head"].fake_quant(base.lm_head.weight.detach()))

    out = tmp_path / "gptq"
    out.mkdir()
    report = export_gptq(ckpt, out, dtype="float32")
    assert report.lm_head and "lm_head" in report.packed
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.qweight" in tensors and "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    qcfg = json.loads((out / "config.json").read_text())
    assert qcfg["quantization_config"]["lm_head"] is True and qcfg["tie_word_embeddings"] is False

    ours, _, _ = load_gptq_model(out, CPU)
    assert isinstance(ours.lm_head, PackedLinear)
    assert torch.equal(logits(ours), logits(reference))

    from gptqmodel import GPTQModel

    half = tmp_path / "fp16"
    half.mkdir()
    export_gptq(ckpt, half, dtype="float16")
    theirs = GPTQModel.load(str(half), device="cpu", dtype=torch.float16).model
    assert type(theirs.lm_head).__module__.startswith("gptqmodel") and theirs.lm_head.bits == 4
    rel = relative(logits(theirs), logits(reference))
    print(f"GPTQModel vs qatcli, quantized lm_head: relative logits error {rel:.2e}")
    assert rel <= 1e-2

    if importlib.util.find_spec("compressed_tensors") is not None:  # the same in compressed-tensors, by transformers
        ct = tmp_path / "ct"
        ct.mkdir()
        export_compressed_tensors(ckpt, ct, dtype="float32")
        qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
        assert "lm_head" not in qcfg["ignore"] and "lm_head.weight_packed" in load_file(str(ct / "model.safetensors"))
        theirs = AutoModelForCausalLM.from_pretrained(ct, device_map="cpu")
        assert torch.equal(logits(theirs), logits(reference))


def test_gptq_quantizes_lm_head_on_the_quantized_blocks_outputs(
    tied_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    ckpt = ptq(tied_model_dir, tmp_path / "ckpt", sotu, "gptq", **{"quant.lm_head": True, "quant.bits": 4})
    meta = json.loads((ckpt / "qatcli.json").read_text())
    assert meta["layers"]["lm_head"]["latent"] == "stored"  # GPTQ moved it off the embeddings' weight
    assert "lm_head.weight" in load_file(str(ckpt / "latent.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32)
    reference, _, _, layers = load_checkpoint(ckpt, CPU, fake_quant=False)
    assert torch.equal(reference.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert torch.equal(layers["lm_head"].fake_quant(reference.lm_head.weight), reference.lm_head.weight)


def test_compare_reports_average_bits_of_a_mixed_cell(
    tiny_model_dir: Path, sotu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    recipe = tmp_path / "cmp.yaml"
    recipe.write_text(
        f"""
model: {tiny_model_dir}
output: {out}
device: cpu
quant: {{bits: 2, group_size: 32}}
eval: {{data: {sotu / "test.txt"}, seqlen: 64, max_windows: 2}}
compare:
  methods:
    - method: rtn
    - {{method: rtn, dynamic: {{down_proj: {{bits: 4}}}}, dynamic_name: down4}}
"""
    )
    result = compare_in_process(str(recipe), capsys=capsys)
    assert result.returncode == 0, result.stderr
    rows = {r["cell"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"fp", "rtn-w2-g32", "rtn-w2-g32-down4"}
    # per block: q 64x64, k and v 64x32, o 64x64, gate and up 64x128, down 128x64 (36,864 weights); down_proj's
    # 2 x 8,192 weights at 4 bits, the other 2 x 28,672 at 2: (16,384 x 4 + 57,344 x 2) / 73,728 = 22/9
    assert rows["rtn-w2-g32-down4"]["avg_bits"] == pytest.approx(22 / 9)
    assert rows["rtn-w2-g32"]["avg_bits"] == 2 and rows["fp"]["avg_bits"] == 16
    assert rows["rtn-w2-g32-down4"]["quantized_bytes"] > rows["rtn-w2-g32"]["quantized_bytes"]
    with (out / "compare.csv").open() as f:
        table = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(table["rtn-w2-g32-down4"]["avg_bits"]) == pytest.approx(22 / 9)
    assert "2.44" in result.stdout
    cell = json.loads((out / "cells" / "rtn-w2-g32-down4" / "checkpoint" / "qatcli.json").read_text())
    assert cell["quantization"]["dynamic"] == {"down_proj": {"bits": 4}}


def test_bad_rules_are_one_line_errors(tiny_model_dir: Path, sotu: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  dynamic:\n    '(': {bits: 4}\n    'down_proj': {bits: 5, size: 2}\n")
    result = run_cli("ptq", str(tiny_model_dir), "-o", str(tmp_path / "a"), "--recipe", str(bad))
    assert_one_line_error(result, "recipe: 3 problems")
    assert result.returncode == 2
    for fragment in ("'(' is not a valid regular expression", "bits must be one of 2, 3, 4, 8, got 5", "'size'"):
        assert fragment in result.stderr
    result = run_cli(
        "ptq", str(tiny_model_dir), "-o", str(tmp_path / "b"), "--group-size", "32", "--set",
        "quant.dynamic={gate_proj: {group_size: 48}}",
    )  # fmt: skip
    assert_one_line_error(result, "quant.dynamic rule 'gate_proj': group size 48 does not divide in_features 64")
    assert "model.layers.0.mlp.gate_proj" in result.stderr and result.returncode == 2
    assert not (tmp_path / "b").exists()

    # qat --init compares the checkpoint's grid with the recipe's layer by layer
    ckpt = ptq(tiny_model_dir, tmp_path / "ckpt", sotu, **{"quant.dynamic": {"down_proj": {"bits": 4}}})
    result = run_cli(
        "qat", "--init", str(ckpt), "--bits", "2", "--group-size", "32", "--data", str(sotu / "valid.txt"),
        "--steps", "1", "-o", str(tmp_path / "q"),
    )  # fmt: skip
    assert_one_line_error(result, "model.layers.0.mlp.down_proj has QuantSpec(bits=4")
    assert "(and 1 more layers)" in result.stderr


def test_rules_survive_recipes_of_cells_and_runs_made_before_them(tmp_path: Path) -> None:
    from qatcli.data.mix import MixedTokens, MixPart
    from qatcli.pipeline.matrix import Cell, cell_recipe, checkpoint_key
    from qatcli.pipeline.resume import check_resumed_run
    from qatcli.run_layout import RUN_RECORD_FILE

    rules = {r"\.layers\.(0|29)\.": {"bits": 4}}
    recipe = load_recipe(None, {"model": "m", "quant.dynamic": rules})
    # a dotted regex is one key, not a path into the recipe
    assert cell_recipe(recipe, Cell("rtn", 2, 32), tmp_path).quant.dynamic == rules
    entry = Cell("rtn", 2, 32, dynamic={"down_proj": {"bits": 8}})
    assert entry.name == "rtn-w2-g32-mix" and cell_recipe(recipe, entry, tmp_path).quant.dynamic == entry.dynamic

    # a cell or a QAT run made before quant.dynamic and quant.lm_head existed is still the same cell or run
    plain = load_recipe(None, {"model": "m"})
    assert {"dynamic", "lm_head"}.isdisjoint(checkpoint_key(plain, Cell("rtn", 2, 32))["quant"])
    assert checkpoint_key(recipe, Cell("rtn", 2, 32))["quant"]["dynamic"] == rules
    old = plain.to_dict()
    del old["quant"]["dynamic"], old["quant"]["lm_head"]
    tokens = MixedTokens([torch.arange(10)], [MixPart("t", 1.0)])
    (tmp_path / RUN_RECORD_FILE).write_text(json.dumps({"recipe": old, "data_sha256": tokens.sha256()}))
    check_resumed_run(tmp_path, plain, tokens)
    with pytest.raises(QatcliError, match=r"quant\.dynamic"):
        check_resumed_run(tmp_path, recipe, tokens)
