"""What a resumed QAT run must share with the run it continues: the recipe and the training data.

A run records both in its run directory when it starts. ``--resume`` compares them with the resumed
invocation's and refuses any difference, except in the keys that cannot change the trained weights (how
often to save or evaluate, evaluation and export settings, the device, where the teacher runs, how the steps
are split over processes, gradient checkpointing) and the step count, which may not fall below the saved step
(the schedule follows the new count).
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from qatcli.config import Recipe, default_value, shown_value
from qatcli.data.mix import MixedTokens
from qatcli.errors import QatcliError
from qatcli.outputs import write_json_atomic
from qatcli.recipe import flatten
from qatcli.run_layout import RUN_RECORD_FILE

MAY_CHANGE = (
    *("qat.steps", "qat.save_every", "qat.eval_every", "qat.skip_nonfinite", "qat.parallel", "qat.teacher_device"),
    "qat.gradient_checkpointing",
    *("eval.*", "export.*", "device", "compare.*"),
)


def record_run(workdir: Path, recipe: Recipe, data: MixedTokens) -> None:
    write_json_atomic(workdir / RUN_RECORD_FILE, {"recipe": recipe.to_dict(), "data_sha256": data.sha256()})


def _default(key: str) -> Any:
    try:
        return default_value(key)
    except KeyError:
        return None


def check_resumed_run(workdir: Path, recipe: Recipe, data: MixedTokens) -> None:
    """Refuse to continue a run with settings or data other than its own (a run without a record passes)."""
    path = workdir / RUN_RECORD_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    before, now = flatten(record["recipe"]), flatten(recipe.to_dict())
    for key in set(now) - set(before):  # a key added to qatcli since the run started: its default then
        before[key] = _default(key)
    changed = [
        f"{key} ({shown_value(before.get(key))} -> {shown_value(now.get(key))})"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not any(fnmatch(key, p) for p in MAY_CHANGE)
    ]
    if record["data_sha256"] != data.sha256():
        changed.append(f"the training data ({recipe.qat.data} reads other tokens than the run's)")
    if changed:
        raise QatcliError(
            "--resume: the run was started with other settings: " + "; ".join(changed) + " (use the run's "
            "settings, or --force to start over)"
        )
