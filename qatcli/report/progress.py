"""Rich progress bars with rate and ETA, written to stderr so that tables on stdout stay clean."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from qatcli.progress import set_reporter

stderr_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit named by the task's ``unit`` field."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            speed = task.completed / task.elapsed
        if speed is None:
            return Text(f"-- {unit}/s", style="cyan")
        return Text(f"{speed:.2f} {unit}/s", style="cyan")


class NestedProgress:
    """An inner bar shown inside the overall bar's display; its tasks disappear when its block ends.

    Commands run as steps of a bigger one (qatcli compare) keep their own bars this way, below the overall
    one, instead of opening a second live display.
    """

    def __init__(self, outer: Progress) -> None:
        self._outer = outer
        self._tasks: list[Any] = []

    def __enter__(self) -> NestedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self._tasks:
            self._outer.remove_task(task)

    def add_task(self, *args: Any, **kwargs: Any) -> Any:
        task = self._outer.add_task(*args, **kwargs)
        self._tasks.append(task)
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outer, name)


_overall: Progress | None = None


def progress_bar() -> Progress | NestedProgress:
    if _overall is not None:
        return NestedProgress(_overall)
    return _new_progress()


@contextmanager
def overall_progress() -> Iterator[Progress]:
    """A bar over a whole run; every progress_bar() opened inside the block shows below it."""
    global _overall
    with _new_progress() as progress:
        _overall = progress
        try:
            yield progress
        finally:
            _overall = None


def _new_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr_console,
    )


def _notice(message: str) -> None:
    stderr_console.print(Text(message, style="yellow"))


def _silence() -> None:
    stderr_console.quiet = True


# importing this module (the commands and the pipeline do) makes the algorithms' progress rich bars on stderr
set_reporter(progress_bar, _notice, _silence)
