"""Input checks made before any work: every problem of a command is gathered and reported in one message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qatcli.data.mix import eval_specs, parse_mix
from qatcli.data.sources import check_data_spec
from qatcli.errors import QatcliError
from qatcli.models.loading import ModelRef, resolve_model
from qatcli.outputs import check_output


class Problems:
    """The input errors of one command, collected so that the user fixes them all in one go."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    @contextmanager
    def check(self) -> Iterator[None]:
        """Record a QatcliError raised inside the block instead of stopping at it."""
        try:
            yield
        except QatcliError as err:
            self.messages.append(str(err))

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise QatcliError(self.messages[0])
        if self.messages:
            raise QatcliError(f"{len(self.messages)} problems: " + "; ".join(self.messages))

    def model(self, spec: str | None, how: str) -> ModelRef | None:
        """The base model's reference, or None (and a problem) where it is missing or unusable."""
        if spec is None:
            self.add(f"no model: {how}")
            return None
        with self.check():
            return resolve_model(spec)
        return None

    def data(self, value: str | list[str] | None, missing: str, mix: bool = False) -> None:
        """An evaluation data value (domains), or with ``mix`` a training or calibration one (weighted sources)."""
        if value is None:
            self.add(missing)
            return
        with self.check():
            for spec in [p.spec for p in parse_mix(value)] if mix else eval_specs(value):
                check_data_spec(spec)

    def output(
        self,
        path: str | Path | None,
        force: bool,
        missing: str,
        inputs: tuple[str | Path | None, ...] = (),
        kind: str = "directory",
    ) -> None:
        """An output (a directory, or a file) that can be written, and is not (inside) one of the local ``inputs``."""
        if path is None:
            self.add(missing)
            return
        local = tuple(Path(p) for p in inputs if p is not None and Path(p).exists())
        with self.check():
            check_output(Path(path), force, kind, local)
