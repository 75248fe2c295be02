"""Where llama.cpp's Python conversion code comes from: the llama.cpp that llama-cpp-python vendors.

The GGUF export writes metadata and tokenizer with llama.cpp's own converter (convert_hf_to_gguf.py, its
``conversion`` package and its gguf-py, which knows Q2_0 where the gguf release on PyPI does not). They ship in
llama-cpp-python's source distribution, the same release that the ``qatcli[llamacpp]`` extra builds, so the
converter and the engine that runs the file are one version. $QATCLI_LLAMA_CPP may name a llama.cpp checkout
instead; otherwise the three parts are taken once from the source distribution on PyPI into the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qatcli.errors import QatcliError
from qatcli.models.loading import cache_root
from qatcli.outputs import atomic_dir

LLAMA_CPP_PYTHON = "0.3.36"
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
ENV = "QATCLI_LLAMA_CPP"


def _complete(tree: Path) -> bool:
    return (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py" / "gguf" / "constants.py").is_file()


def _has_q2_0(tree: Path) -> bool:
    return "Q2_0" in (tree / "gguf-py" / "gguf" / "constants.py").read_text()


def _extract(sdist: Path, target: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and rel.split("/")[0] in PARTS and (member.isfile() or member.isdir()):
                member.name = rel
                members.append(member)
        tar.extractall(target, members=members, filter="data")


def _download(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run(
            [*cmd, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], capture_output=True, text=True
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no file"])[-1]
            raise QatcliError(
                f"the GGUF export needs llama.cpp's converter: downloading llama-cpp-python=={LLAMA_CPP_PYTHON}'s "
                f"source failed ({last}); set {ENV} to a llama.cpp checkout instead"
            )
        with atomic_dir(target, force=True, shared=True) as out:
            _extract(sdists[0], out)


def llama_cpp_tree() -> Path:
    """A llama.cpp source tree with convert_hf_to_gguf.py, its conversion package and a gguf-py that has Q2_0."""
    given = os.environ.get(ENV)
    tree = Path(given).expanduser() if given else cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if given and not _complete(tree):
        raise QatcliError(f"${ENV}='{given}' is not a llama.cpp source tree (no convert_hf_to_gguf.py and gguf-py)")
    if not given and not _complete(tree):
        _download(tree)
    if not _has_q2_0(tree):
        raise QatcliError(f"the llama.cpp at '{tree}' predates Q2_0 (llama.cpp #24448): use a newer one")
    return tree
