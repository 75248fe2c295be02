"""How the algorithms report progress and notices without knowing who shows them.

quant/, qat/, data/ and formats/ open ``progress_bar()`` (tasks with a description, a total and a unit, advanced
as work is done) and call ``notify(message)``. The command line and the Python API install rich bars on stderr
(qatcli/report/progress.py, through ``set_reporter``); with no reporter installed nothing is drawn and notices go
to stderr as plain lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Tracker(Protocol):
    def add_task(self, description: str, total: float | None = ..., **fields: Any) -> Any: ...

    def advance(self, task: Any, advance: float = ...) -> None: ...

    def update(self, task: Any, **fields: Any) -> None: ...


class _Silent:
    """A tracker that shows nothing."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        return 0

    def advance(self, task: Any, advance: float = 1) -> None:
        return None

    def update(self, task: Any, **fields: Any) -> None:
        return None


def _plain_notice(message: str) -> None:
    print(message, file=sys.stderr)


_bars: Callable[[], AbstractContextManager[Any]] = _Silent
_notice: Callable[[str], None] = _plain_notice
_silence: Callable[[], None] = lambda: None  # noqa: E731


def set_reporter(
    bars: Callable[[], AbstractContextManager[Any]], notice: Callable[[str], None], silence: Callable[[], None]
) -> None:
    """Install what draws the bars, shows a notice and turns both off (a worker process of a distributed run)."""
    global _bars, _notice, _silence
    _bars, _notice, _silence = bars, notice, silence


def progress_bar() -> AbstractContextManager[Any]:
    """A context whose value tracks tasks: ``task = p.add_task(description, total=n, unit="layer")``,
    ``p.advance(task)``."""
    return _bars()


def notify(message: str) -> None:
    """A warning or note for the user (stderr)."""
    _notice(message)


def silence() -> None:
    """Show nothing more from this process."""
    _silence()
