"""ptq and eval through the real command line on a tiny Llama, every kind of bad input, and what each flag sets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import default_sigint, run_cli
from safetensors import safe_open
from safetensors.torch import load_file

from qatcli.config import Recipe, field_help, recipe_field
from qatcli.formats.checkpoint import load_checkpoint
from qatcli.quant.grid import QuantSpec, fake_quantize, group_qparams


def assert_one_line_error(result, fragment: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    # Progress bars of work done before the failure may precede it; the error itself is one line, the last.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:], result.stderr
    assert lines[-1].startswith("qatcli: error:") and fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def quantized(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, sotu: Path) -> dict[str, Path]:
    """RTN checkpoints of the tiny model at 8 and 2 bits, written by `qatcli ptq`."""
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for bits, extra in ((8, ["--sym"]), (2, ["--asym", "--clip", "minmax"])):
        path = out / f"rtn{bits}"
        result = run_cli(
            "ptq",
            str(tiny_model_dir),
            "--bits",
            str(bits),
            "--group-size",
            "32",
            *extra,
            "-o",
            str(path),
            "--eval-data",
            str(sotu / "test.txt"),
            "--eval-seqlen",
            "64",
            "--max-windows",
            "4",
        )
        assert result.returncode == 0, result.stderr
        assert "rtn" in result.stdout
        paths[bits] = path
    return paths


def test_ptq_writes_a_complete_checkpoint(quantized: dict[str, Path], tiny_model_dir: Path) -> None:
    path = quantized[2]
    for name in ("config.json", "latent.safetensors", "quant.safetensors", "qatcli.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    meta = json.loads((path / "qatcli.json").read_text())
    assert meta["method"] == "rtn"
    assert meta["quantization"] == {"bits": 2, "group_size": 32, "sym": False, "clip": "minmax"}
    assert len(meta["layers"]) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert "lm_head" not in str(list(meta["layers"])) and "embed" not in str(list(meta["layers"]))
    assert meta["recipe"]["quant"]["bits"] == 2 and meta["provenance"]["command"] == "ptq"
    assert meta["metrics"]["eval"]["windows"] == 4 and meta["metrics"]["eval"]["ppl"] > 1

    # The latent weights are the original ones (so none is stored); the grid is the one grid.py computes.
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    quant = load_file(str(path / "quant.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert meta["layers"][name]["latent"] == "base"
    latent = load_checkpoint(path, torch.device("cpu"), fake_quant=False)[0].get_submodule(name).weight
    assert torch.equal(latent.detach(), original[f"{name}.weight"])
    scales, zeros = group_qparams(original[f"{name}.weight"], QuantSpec(2, 32, sym=False), "minmax")
    assert torch.equal(quant[f"{name}.scales"].float(), scales)
    assert torch.equal(quant[f"{name}.zeros"].float(), zeros)

    model, _, _, layers = load_checkpoint(path, torch.device("cpu"))
    weight = dict(model.named_modules())[name].weight
    expected = fake_quantize(original[f"{name}.weight"], scales, zeros, layers[name].g_idx, 3)
    assert torch.equal(weight.detach(), expected)
    assert torch.equal(model.lm_head.weight.detach(), original["lm_head.weight"])


def test_eval_mixes_models_and_checkpoints(
    quantized: dict[str, Path], tiny_model_dir: Path, sotu: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rows.json"
    result = run_cli(
        "eval",
        str(tiny_model_dir),
        str(quantized[8]),
        str(quantized[2]),
        "--data",
        str(sotu / "test.txt"),
        "--seqlen",
        "64",
        "--max-windows",
        "6",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["fp", "rtn", "rtn"]
    assert [r["bits"] for r in rows] == [None, 8, 2]
    assert all(r["windows"] == 6 and r["seqlen"] == 64 for r in rows)
    fp, w8, w2 = (r["ppl"] for r in rows)
    assert abs(w8 - fp) / fp < 0.01
    assert w2 != pytest.approx(fp, rel=0.01)
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"] and rows[2]["weight_bytes"] < rows[1]["weight_bytes"]
    assert "perplexity" in result.stdout and "rtn2" in result.stdout


def test_eval_on_generated_data_is_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("eval", str(tiny_model_dir), "--data", "generated:10:32", "--seqlen", "32")
    first = run_cli(*args, "--json", str(tmp_path / "a.json"), cache=cache)
    assert first.returncode == 0, first.stderr
    assert "deprecated" not in first.stderr  # the key-value cache is passed under the name transformers expects
    files = list(cache.glob("generated/*/*/tokens.safetensors"))
    assert len(files) == 1
    assert load_file(str(files[0]))["tokens"].shape == (10, 32)
    mtime = files[0].stat().st_mtime_ns
    second = run_cli(*args, "--json", str(tmp_path / "b.json"), cache=cache)
    assert second.returncode == 0, second.stderr
    assert files[0].stat().st_mtime_ns == mtime
    a, b = (json.loads((tmp_path / n).read_text())[0] for n in ("a.json", "b.json"))
    assert a["windows"] == 2 and a["ppl"] == b["ppl"]  # 2 held-out sequences of 32 tokens
    # the sampler's dtype is part of the key: a float32 sample and a bfloat16 one are two entries
    for dtype in ("float32", "bfloat16"):
        spec = f"generated:10:32:dtype={dtype}"
        done = run_cli("eval", str(tiny_model_dir), "--data", spec, "--seqlen", "32", cache=cache)
        assert done.returncode == 0, done.stderr
    entries = list(cache.glob("generated/*/*/tokens.safetensors"))
    dtypes = [safe_open(str(f), "pt").metadata()["dtype"] for f in entries]
    assert sorted(dtypes) == ["bfloat16", "float32"]  # auto's entry is one of the two


def test_recipe_drives_ptq_and_flags_override(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\noutput: {tmp_path / 'out'}\nquant:\n  bits: 4\n  group_size: 64\n"
        "  exclude: ['down_proj']\n"
    )
    result = run_cli("ptq", "--recipe", str(recipe), "--bits", "3")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "qatcli.json").read_text())
    assert meta["quantization"]["bits"] == 3 and meta["quantization"]["group_size"] == 64
    assert len(meta["layers"]) == 12 and not any("down_proj" in n for n in meta["layers"])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bits", "5"], "quant.bits must be one of 2, 3, 4, 8"),
        (["--bits", "four"], "Invalid value for '--bits'"),
        (["--group-size", "128"], "group size 128 does not divide in_features 64 of model.layers.0"),
        (["--group-size", "0"], "quant.group_size must be -1"),
        (["--group-size", "big"], "quant.group_size must be -1 (per row), auto or positive, got 'big'"),
        (["--bits", "5", "--group-size", "0", "--seqlen", "0"], "recipe: 3 problems: quant.bits must be one of"),
        (["--method", "hqq"], "quant.method must be one of rtn, gptq, awq"),
        (["--bitz", "3"], "No such option: --bitz"),
        (["--eval-data", "no/such/file.txt"], "data file 'no/such/file.txt' does not exist"),
        (["--include", "nothing_matches"], "no Linear layer matches"),
        (["--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_bad_ptq_input_is_one_line_error(tiny_model_dir: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "out"
    result = run_cli("ptq", str(tiny_model_dir), "-o", str(out), *args)
    assert_one_line_error(result, fragment)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_model_recipe_and_data_arguments(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert_one_line_error(run_cli("ptq", "no/such/model", "-o", str(tmp_path / "o")), "model 'no/such/model' not found")
    assert_one_line_error(run_cli("ptq", "-o", str(tmp_path / "o")), "no model")
    assert_one_line_error(run_cli("ptq", str(tiny_model_dir)), "no output directory")
    assert_one_line_error(run_cli("ptq", "--recipe", str(tmp_path / "none.yaml")), "recipe file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant:\n  bitz: 3\n")
    assert_one_line_error(run_cli("ptq", "--recipe", str(bad)), "unknown key 'quant.bitz'")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir)), "no evaluation data")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--data", str(tmp_path / "x.txt")), "does not exist")
    assert_one_line_error(run_cli("eval", "nope", "--data", "generated:5"), "model 'nope' not found")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--data", "generated:0"), "expected generated:N")


def test_existing_output_needs_force(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("ptq", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "-o", str(out))
    assert_one_line_error(result, "already exists (pass --force")
    assert (out / "keep.txt").read_text() == "precious"

    rows = tmp_path / "rows.json"
    rows.write_text("[]")
    result = run_cli(
        "eval",
        str(tiny_model_dir),
        "--data",
        "generated:5:16",
        "--seqlen",
        "16",
        "--json",
        str(rows),
        cache=tmp_path / "cache",
    )
    assert_one_line_error(result, "already exists")
    assert rows.read_text() == "[]"

    result = run_cli("ptq", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "-o", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "qatcli.json").is_file()


def test_failed_run_leaves_no_partial_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short to fill a window")
    out = tmp_path / "ckpt"
    # Fails in evaluation, after the quantization ran: nothing may be left behind.
    result = run_cli(
        "ptq",
        str(tiny_model_dir),
        "--bits",
        "4",
        "--group-size",
        "32",
        "-o",
        str(out),
        "--eval-data",
        str(short),
        "--eval-seqlen",
        "64",
    )
    assert_one_line_error(result, "fewer than one window of 64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]

    # The same failure with --force over an existing checkpoint keeps the old one intact.
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = run_cli(
        "ptq",
        str(tiny_model_dir),
        "--bits",
        "4",
        "--group-size",
        "32",
        "-o",
        str(out),
        "--eval-data",
        str(short),
        "--eval-seqlen",
        "64",
        "--force",
    )
    assert result.returncode != 0
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "short.txt"]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_through_the_cli(tiny_model_dir: Path, sotu: Path, tmp_path: Path, act_order: bool) -> None:
    out = tmp_path / "gptq"
    flags = ["--act-order"] if act_order else ["--no-true-sequential", "--static-groups"]
    result = run_cli(
        "ptq",
        str(tiny_model_dir),
        "--method",
        "gptq",
        "--bits",
        "3",
        "--group-size",
        "32",
        "-o",
        str(out),
        "--calib-data",
        str(sotu / "valid.txt"),
        "--nsamples",
        "16",
        "--calib-seqlen" if act_order else "--seqlen",  # the same option: ptq's --seqlen is the calibration's
        "64",
        *flags,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "qatcli.json").read_text())
    q = meta["quantization"]
    assert meta["method"] == "gptq" and q["bits"] == 3 and q["desc_act"] is act_order
    assert q["static_groups"] is (not act_order) and q["true_sequential"] is act_order
    assert meta["metrics"]["calibration"] == {"data": str(sotu / "valid.txt"), "nsamples": 16, "seqlen": 64}
    assert meta["metrics"]["peak_rss_mib"] > 0
    assert all(info["act_order"] is act_order for info in meta["layers"].values())

    # The latent weights are GPTQ's dequantized weights: loading applies the grid and changes nothing.
    latent = load_file(str(out / "latent.safetensors"))
    model, _, _, layers = load_checkpoint(out, torch.device("cpu"))
    modules = dict(model.named_modules())
    for name in layers:
        assert torch.equal(modules[name].weight.detach(), latent[f"{name}.weight"]), name
    if act_order:
        assert any(
            not torch.equal(lq.g_idx, torch.arange(lq.g_idx.numel(), dtype=torch.int32) // 32) for lq in layers.values()
        )


def test_gptq_needs_calibration_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "ptq", str(tiny_model_dir), "--method", "gptq", "--bits", "3", "--group-size", "32", "-o", str(tmp_path / "o")
    )
    assert_one_line_error(result, "gptq needs calibration data")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_is_one_line_and_status_130(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real SIGINT while eval samples its data: one line, status 130, nothing half-written in the cache."""
    env = {**os.environ, "QATCLI_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "qatcli", "eval", str(tiny_model_dir), "--data", "generated:4000:256"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while _cpu_seconds(proc.pid) < 8:  # start-up (imports, model load) is well under this; sampling is not
        assert proc.poll() is None and time.monotonic() < deadline, "eval ended before it could be interrupted"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == "qatcli: interrupted" and "Traceback" not in stderr
    assert not list((tmp_path / "cache").rglob("tokens.safetensors"))


def test_ctrl_c_while_the_libraries_load_is_one_line_and_status_130(tiny_model_dir: Path) -> None:
    args = [sys.executable, "-m", "qatcli", "eval", str(tiny_model_dir), "--data", "generated:4000:256"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    while _cpu_seconds(proc.pid) < 0.3:  # past the interpreter's start, inside the import of torch (about 2 s)
        assert proc.poll() is None, "qatcli ended before it could be interrupted"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "qatcli: interrupted" and "Traceback" not in stderr


def test_group_size_auto_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The tiny model's widths are 64 and 128: auto resolves to 64, and the checkpoint records 64."""
    out = tmp_path / "auto"
    result = run_cli("ptq", str(tiny_model_dir), "--bits", "4", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "qatcli.json").read_text())["quantization"]["group_size"] == 64


def parsed(monkeypatch: pytest.MonkeyPatch, *argv: str) -> Recipe:
    """The recipe a command line hands to its run_* function; a stand-in module takes the place of the
    command's, so nothing runs and nothing but the command line is tested."""
    from qatcli.cli import main

    module = {"eval": "evaluate"}.get(argv[0], argv[0])
    name = {"eval": "run_eval"}.get(argv[0], f"run_{argv[0]}")
    seen: list[Recipe] = []
    stand_in = types.ModuleType(f"qatcli.commands.{module}")
    setattr(stand_in, name, lambda recipe, *_: seen.append(recipe))
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    main(list(argv))
    return seen[0]


def test_seqlen_flags_set_one_key_each(monkeypatch: pytest.MonkeyPatch) -> None:
    r = parsed(monkeypatch, "ptq", "m", "--seqlen", "64")
    assert (r.calib.seqlen, r.eval.seqlen) == (64, 512)
    r = parsed(monkeypatch, "ptq", "m", "--calib-seqlen", "32", "--eval-seqlen", "128")
    assert (r.calib.seqlen, r.eval.seqlen) == (32, 128)
    r = parsed(monkeypatch, "qat", "m", "--seqlen", "64", "--calib-seqlen", "32", "--eval-seqlen", "128")
    assert (r.qat.seqlen, r.calib.seqlen, r.eval.seqlen) == (64, 32, 128)
    assert parsed(monkeypatch, "qat", "m", "--train-seqlen", "48").qat.seqlen == 48
    assert parsed(monkeypatch, "eval", "m", "--seqlen", "64").eval.seqlen == 64
    assert parsed(monkeypatch, "eval", "m", "--eval-seqlen", "64", "--eval-data", "x.txt").eval.data == "x.txt"


def test_set_and_eval_data_on_every_command_that_runs_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\n")
    for argv in (["ptq", "m"], ["qat", "m"], ["eval", "m"], ["export"], ["compare", str(recipe)]):
        r = parsed(monkeypatch, *argv, "--set", "qat.lr=0.001", "--set", "eval.max_windows=3")
        assert (r.qat.lr, r.eval.max_windows) == (0.001, 3), argv
        if argv[0] != "export":
            r = parsed(monkeypatch, *argv, "--eval-data", "e.txt", "--eval-seqlen", "64", "--max-windows", "2")
            assert (r.eval.data, r.eval.seqlen, r.eval.max_windows) == ("e.txt", 64, 2), argv
    assert parsed(monkeypatch, "ptq", "m", "--group-size", "auto").quant.group_size == "auto"
    assert parsed(monkeypatch, "qat", "m", "--group-size", "-1").quant.group_size == -1
    assert parsed(monkeypatch, "qat", "m", "--amplitude", "0.1", "--amplitude", "0.05").qat.amplitudes == [0.1, 0.05]
    assert parsed(monkeypatch, "export", "--max-shard-mib", "64").export.max_shard_mib == 64


def options(command: str) -> list[Any]:
    """The options of a subcommand as click (typer's own copy of it) declares them."""
    from qatcli.cli import app

    group: Any = typer.main.get_command(app)
    return [p for p in group.commands[command].params if p.param_type_name == "option"]


def test_flag_help_is_the_recipe_fields_doc() -> None:
    from qatcli.flags import COMMAND_KEYS

    not_recipe_keys = {"recipe", "force", "set_", "json_path", "png_path", "resume", "stop_after"}
    for command, keys in COMMAND_KEYS.items():
        for option in options(command):
            if option.name in not_recipe_keys:
                continue
            assert option.name in keys, f"{command} --{option.name} sets no recipe key"
            key = keys[option.name]
            assert option.help == field_help(key), (command, option.name)
            assert option.help.startswith(recipe_field(key).metadata["doc"])


def test_one_meaning_per_flag_and_flag_names_are_recipe_keys() -> None:
    from qatcli.flags import COMMAND_KEYS

    meanings: dict[str, set[str]] = {}
    for command, keys in COMMAND_KEYS.items():
        for option in options(command):
            key = keys.get(str(option.name))
            if key is None:
                continue
            names = [n for n in option.opts + option.secondary_opts if n.startswith("--")]
            for name in names:
                meanings.setdefault(name, set()).add(key)
            # the key's leaf, its last two parts (qat.block.epochs: --block-epochs) or the whole key
            parts = key.replace("_", "-").split(".")
            accepted = {f"--{parts[-1]}", f"--{'-'.join(parts[-2:])}", f"--{'-'.join(parts)}"}
            assert accepted & set(names), (command, names, key)
    # the obvious one of each command: ptq's --seqlen is the calibration's, qat's the training's, and so on
    per_command = {"--seqlen", "--data", "--output"}
    assert {name: keys for name, keys in meanings.items() if len(keys) > 1 and name not in per_command} == {}
