"""Outputs that appear complete or not at all, and never replace an existing one without --force.

Every output is checked before any work (check_output): it may not exist unless forced, its directory must
take a new entry (probed by making one), and it may not be or lie inside an input. A write that fails on
the way (a full disk, a file system gone read-only) becomes one line naming the path and the cause, and
leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qatcli.errors import QatcliError


def check_writable(path: Path, force: bool) -> None:
    """Fail early, before any work, if ``path`` exists and may not be replaced."""
    if path.exists() and not force:
        raise QatcliError(f"output '{path}' already exists (pass --force to overwrite it)")


def _probe(directory: Path) -> str | None:
    """Why a new entry cannot be made in ``directory`` (the nearest existing ancestor of an output), or None."""
    if not directory.is_dir():
        return f"'{directory}' is not a directory"
    try:
        Path(tempfile.mkdtemp(prefix=".qatcli-probe-", dir=directory)).rmdir()
    except OSError as err:
        return f"cannot write in '{directory}': {err.strerror or err}"
    return None


def check_output(path: Path, force: bool, kind: str = "directory", inputs: tuple[Path, ...] = ()) -> None:
    """Everything that would stop ``path`` (a directory or a file) from being written, found before any work."""
    path = Path(path)
    check_writable(path, force)
    remove_stale_siblings(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise QatcliError(f"output '{path}' exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise QatcliError(f"output '{path}' is a directory, not a file")
    resolved = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents:
            raise QatcliError(f"output '{path}' is, or is inside, the input '{source}': choose another output")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    reason = _probe(ancestor)
    if reason is not None:
        raise QatcliError(f"output '{path}': {reason}")


def _tmp_prefix(path: Path, kind: str) -> str:
    """Temporary siblings carry the writer's pid, so that a later run can tell a dead writer's leftovers."""
    return f".{path.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> None:
    """Remove the temporary siblings of ``path`` that a killed run left (their writer's pid is gone)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = stale.name.removeprefix(f".{path.name}.{kind}-").split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


def _write_failure(path: Path, err: BaseException) -> QatcliError | None:
    """A one-line error for a failed write (OS errors, and the wrappers safetensors and torch.save put on them)."""
    if isinstance(err, OSError):
        return QatcliError(f"cannot write '{path}': {err.strerror or err}")
    text = str(err)
    if type(err).__name__ == "SafetensorError" or "inline_container" in text or "file write failed" in text:
        parent = path.parent if path.parent.exists() else Path(".")
        full = shutil.disk_usage(parent).free < 2**26
        return QatcliError(f"cannot write '{path}': {'no space left on device' if full else text.splitlines()[0]}")
    return None


@contextmanager
def atomic_dir(path: Path, force: bool, shared: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; move it into place only if the block succeeds.

    ``shared`` marks a cache entry that another process may fill at the same time: if one appears at ``path``
    while this block runs, it is kept and this block's copy dropped (both hold the same thing). Otherwise a
    ``path`` that appears meanwhile is an error: ``force`` replaces what existed at the start, not another
    process's output."""
    path = Path(path)
    check_writable(path, force)
    if path.exists() and not path.is_dir():
        raise QatcliError(f"output '{path}' exists and is not a directory")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path, "tmp"), dir=path.parent))
    except OSError as err:
        raise QatcliError(f"cannot write '{path}': {err.strerror or err}") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should get the usual permissions
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_failure(path, err)
        if failure is not None:
            raise failure from None
        raise
    for file in tmp.rglob("*"):  # some writers create private files; outputs get the usual permissions
        if file.is_file():
            file.chmod(0o666 & ~umask)
    try:
        if path.exists() and not existed:
            raise FileExistsError(errno.EEXIST, "created meanwhile")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path, "old"), dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise QatcliError(f"cannot write '{path}': {err.strerror or err}") from None
        if not shared:
            raise QatcliError(f"output '{path}' was created by another process while this one ran") from None


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it into place only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path, "tmp"), suffix=path.suffix, dir=path.parent)
    except OSError as err:
        raise QatcliError(f"cannot write '{path}': {err.strerror or err}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        Path(tmp).chmod(0o666 & ~umask)  # mkstemp makes it private; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failure = _write_failure(path, err)
        if failure is not None:
            raise failure from None
        raise


def write_json_atomic(path: Path, data: Any, force: bool = True) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    check_writable(path, force)
    with atomic_file(path) as tmp, tmp.open("w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
