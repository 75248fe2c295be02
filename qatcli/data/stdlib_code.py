"""The ``code`` data alias: Python source, read from the running interpreter's own standard library.

Every machine with Python has these files, so the code domain needs no download. The list is fixed (modules
that are single .py files, of a real size, under the same name in CPython 3.10 to 3.14), sorted, and split as
the ``sotu`` alias is: i % 10 == 9 test, i % 10 == 4 valid, the rest train. Their text changes a little from
one Python version to the next, so results record the version (``code_python``).
"""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

from qatcli.errors import QatcliError

CODE_FILES = tuple(
    sorted(
        (
            "abc.py", "argparse.py", "ast.py", "bdb.py", "calendar.py", "cmd.py", "code.py", "codecs.py",
            "collections/__init__.py", "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
            "difflib.py", "dis.py", "doctest.py", "enum.py", "filecmp.py", "fnmatch.py", "fractions.py",
            "ftplib.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py", "hmac.py",
            "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "locale.py",
            "logging/__init__.py", "mailbox.py", "netrc.py", "numbers.py", "operator.py", "optparse.py", "pdb.py",
            "pickle.py", "pprint.py", "pydoc.py", "queue.py", "random.py", "reprlib.py", "sched.py",
            "selectors.py", "shlex.py", "shutil.py", "smtplib.py", "socket.py", "statistics.py", "string.py",
            "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py",
            "tokenize.py", "traceback.py", "typing.py", "uuid.py", "warnings.py", "wave.py", "weakref.py",
        )
    )
)  # fmt: skip
CODE_SPLITS = ("train", "valid", "test")


def parse_code(spec: str, default_split: str) -> str | None:
    """``code[:SPLIT]`` -> the split it names (``default_split`` when none); any other spec -> None."""
    if spec == "code":
        return default_split
    if not spec.startswith("code:"):
        return None
    split = spec.removeprefix("code:")
    if split not in CODE_SPLITS:
        raise QatcliError(f"data '{spec}': expected code, code:train, code:valid or code:test")
    return split


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_split(split: str) -> list[Path]:
    """The standard-library files of one split of the ``code`` alias: 68 files, 55 train, 7 valid, 6 test."""
    names = {9: "test", 4: "valid"}
    paths = [stdlib_dir() / name for i, name in enumerate(CODE_FILES) if names.get(i % 10, "train") == split]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise QatcliError(
            f"data 'code:{split}' reads Python's standard-library sources, and this Python has no {missing[0]}"
        )
    return paths


def code_python() -> str:
    """The Python version whose standard library the ``code`` alias reads, e.g. ``3.11.2``."""
    return platform.python_version()
