"""Outputs are checked before any work, failed writes are one line, and killed runs' leftovers are cleaned."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from test_cli import assert_one_line_error

from qatcli import cli
from qatcli.errors import QatcliError
from qatcli.formats import checkpoint
from qatcli.outputs import atomic_dir, atomic_file, check_output


def in_process(*args: str, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """cli.main in this interpreter (so that monkeypatching reaches it), as a CompletedProcess."""
    try:
        code = cli.main(list(args)) or 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["qatcli", *args], code, captured.out, captured.err)


def rtn(model: Path, out: Path, *extra: str) -> list[str]:
    return ["ptq", str(model), "--bits", "4", "--group-size", "32", "-o", str(out), *extra]


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        (lambda tmp: Path("/proc/qatcli-out"), "cannot write in '/proc'"),
        (lambda tmp: tmp / "a-file" / "out", "a-file' is not a directory"),
        (lambda tmp: tmp / "a-file", "exists and is not a directory"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tiny_model_dir: Path, tmp_path: Path, where, fragment: str
) -> None:
    (tmp_path / "a-file").write_text("keep")
    result = run_cli(*rtn(tiny_model_dir, where(tmp_path), "--force"))
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert "rtn" not in result.stderr  # refused before quantizing
    assert (tmp_path / "a-file").read_text() == "keep"


def test_an_output_equal_to_or_inside_an_input_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    made = run_cli(*rtn(tiny_model_dir, tmp_path / "q"))
    assert made.returncode == 0, made.stderr
    before = sorted(p.name for p in (tmp_path / "q").iterdir())
    for args in (
        ["export", str(tmp_path / "q"), "-o", str(tmp_path / "q"), "--force"],
        ["export", str(tmp_path / "q"), "-o", str(tmp_path / "q" / "inside"), "--force"],
        rtn(tiny_model_dir, tiny_model_dir, "--force"),
        ["eval", str(tmp_path / "q"), "--data", "generated:5:32", "--json", str(tmp_path / "q" / "r.json"), "--force"],
    ):
        assert_one_line_error(run_cli(*args), "is, or is inside, the input")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == before
    json_dir = tmp_path / "d"
    json_dir.mkdir()
    assert_one_line_error(
        run_cli("eval", str(tmp_path / "q"), "--data", "generated:5:32", "--json", str(json_dir), "--force"),
        "is a directory, not a file",
    )


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    out = tmp_path / "q"
    result = in_process(*rtn(tiny_model_dir, out), capsys=capsys)
    assert result.returncode == 2
    assert_one_line_error(result, f"cannot write '{out}': No space left on device")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory

    with pytest.raises(QatcliError, match="No space left on device"), atomic_file(tmp_path / "state.pt") as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_a_dead_runs_temporary_siblings_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "q"
    dead, live = tmp_path / ".q.tmp-999999999-abc", tmp_path / f".q.old-{os.getpid()}-def"
    for path in (dead, live):
        path.mkdir()
        (path / "latent.safetensors").write_bytes(b"x" * 10)
    other = tmp_path / ".other.tmp-999999999-abc"
    other.mkdir()
    check_output(out, force=False)
    assert not dead.exists() and live.exists() and other.exists()


def _fill(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokens.txt").write_text(text)


def test_a_cache_entry_another_process_fills_meanwhile_is_kept(tmp_path: Path) -> None:
    entry = tmp_path / "cache" / "entry"
    with atomic_dir(entry, force=True, shared=True) as tmp:
        (tmp / "tokens.txt").write_text("ours")
        _fill(entry, "theirs")  # the other process finished first
    assert (entry / "tokens.txt").read_text() == "theirs"
    assert [p.name for p in entry.parent.iterdir()] == ["entry"]


def test_an_output_another_process_creates_meanwhile_is_one_line_and_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(QatcliError, match="created by another process") as caught, atomic_dir(out, True) as tmp:
        (tmp / "tokens.txt").write_text("ours")
        _fill(out, "theirs")
    assert "\n" not in str(caught.value)
    assert (out / "tokens.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:
        path.write_bytes(b"not a safetensors file")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_base_model_is_one_line_in_every_command(tiny_model_dir: Path, tmp_path: Path, how: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    _corrupt(base / "model.safetensors", how)
    data = ["--data", "generated:5:32"]
    for args in (
        rtn(base, tmp_path / "q"),
        ["eval", str(base), *data],
        ["qat", str(base), "--bits", "4", *data, "--steps", "1", "-o", str(tmp_path / "t")],
    ):
        result = run_cli(*args)
        assert result.returncode == 2
        assert_one_line_error(result, "could not load model")


@pytest.mark.parametrize("damaged", ["quant.safetensors", "latent.safetensors"])
def test_a_damaged_checkpoint_is_one_line_in_eval_and_export(
    tiny_model_dir: Path, tmp_path: Path, damaged: str
) -> None:
    made = run_cli(
        "qat",
        str(tiny_model_dir),
        "--bits",
        "4",
        "--data",
        "generated:5:32",
        "--steps",
        "1",
        "--seqlen",
        "16",
        "--batch-size",
        "1",
        "-o",
        str(tmp_path / "q"),
    )
    assert made.returncode == 0, made.stderr
    _corrupt(tmp_path / "q" / damaged, "truncated")
    for args in (
        ["eval", str(tmp_path / "q"), "--data", "generated:5:32"],
        ["export", str(tmp_path / "q"), "-o", str(tmp_path / "e")],
    ):
        assert_one_line_error(run_cli(*args), f"cannot read {damaged}")


def test_a_checkpoint_whose_layers_disagree_with_its_bits_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    made = run_cli(*rtn(tiny_model_dir, tmp_path / "q"))
    assert made.returncode == 0, made.stderr
    meta_path = tmp_path / "q" / "qatcli.json"
    meta = json.loads(meta_path.read_text())
    meta["quantization"]["bits"] = 2
    meta_path.write_text(json.dumps(meta))
    assert_one_line_error(run_cli("export", str(tmp_path / "q"), "-o", str(tmp_path / "e")), "disagrees with")
