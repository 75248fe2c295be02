"""Licence notices that travel with a model into every directory qatcli makes from it.

Some model licences bind whoever passes the model, or anything made from it, to someone else. The Gemma Terms of
Use (section 3.1) require every copy of Gemma or of a Model Derivative (a quantized checkpoint or export is one)
to be accompanied by a "Notice" text file saying "Gemma is provided under and subject to the Gemma Terms of Use
found at ai.google.dev/gemma/terms", its recipients to get a copy of the terms, and modified files to carry
prominent notices that they were modified. So a model directory's NOTICE and terms files (``CARRIED``) are copied
into each checkpoint made from it (qatcli/formats/checkpoint.py) and each export of that checkpoint
(qatcli/formats/export.py), and NOTICE gains a line saying what qatcli did to the files next to it.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from qatcli.version import __version__

NOTICE = "NOTICE"
# the notice file, the licence terms and use policies a model directory may carry, copied as they are
CARRIED = (NOTICE, "GEMMA_TERMS.html", "LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md")


def carry_notices(source: Path, target: Path, modification: str) -> list[str]:
    """Copy the ``CARRIED`` files of the model directory ``source`` into ``target`` and add to NOTICE (where there
    is one) the line "- DATE: modified by qatcli VERSION: ``modification``". Returns the names copied."""
    copied = []
    for name in CARRIED:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)
            copied.append(name)
    if NOTICE in copied:
        date = datetime.now(timezone.utc).date().isoformat()
        notice = Path(target) / NOTICE
        text = notice.read_text(encoding="utf-8")
        separator = "" if text.endswith("\n") or not text else "\n"
        line = f"- {date}: modified by qatcli {__version__}: {modification}\n"
        notice.write_text(text + separator + line, encoding="utf-8")
    return copied
