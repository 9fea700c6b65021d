"""A progress bar for work that may run inside another rich display (a training loop's bar, a sweep's bar).

rich allows one live display per console: a second ``Progress`` started while one is live raises
``LiveError: Only one live display may be active at once`` (rich < 14; later versions stack it under the first). :func:`progress_task` therefore adds its bar as a
task of the ``Progress`` already live, starts a bar of its own only when nothing is live, and stays silent
under any other live display. The bar appears only once the work has run ``delay`` seconds, so quick calls
draw nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import get_console
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

DEFAULT_DELAY = 2.0  # seconds of work before a bar is worth drawing


def _lives(console: Console) -> list[Any]:
    """The console's live displays, innermost first (rich >= 14 keeps a stack; older versions hold one)."""
    stack = getattr(console, "_live_stack", None)
    if stack is None:
        live = getattr(console, "_live", None)
        stack = [live] if live is not None else []
    return list(reversed(stack))


def _consoles(console: Console | None) -> list[Console]:
    """The given console, then rich's global one (where a ``Progress()`` without a console draws)."""
    found = [console] if console is not None else []
    return found + [c for c in [get_console()] if c is not console]


def active_progress(console: Console | None = None) -> Progress | None:
    """The ``Progress`` whose display is live on ``console`` or on rich's global console, else None."""
    for con in _consoles(console):
        for live in _lives(con):
            owner = getattr(getattr(live, "_get_renderable", None), "__self__", None)
            if isinstance(owner, Progress):
                return owner
    return None


def any_live(console: Console | None = None) -> bool:
    return any(_lives(con) for con in _consoles(console))


class _Bar:
    def __init__(self, description: str, total: int, console: Console | None, enabled: bool,
                 delay: float | None) -> None:
        self.description, self.total, self.console = description, total, console
        self.enabled, self.delay = enabled, DEFAULT_DELAY if delay is None else delay
        self.done = 0
        self.start = time.perf_counter()
        self.progress: Progress | None = None
        self.own = False
        self.task: TaskID | None = None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.progress is None and self.enabled and time.perf_counter() - self.start >= self.delay:
            self._show()
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=min(self.done, self.total))

    def _show(self) -> None:
        outer = active_progress(self.console)
        if outer is not None:  # a task of the live bar: its columns may read fields its own tasks carry
            fields = {k: "" for t in outer.tasks for k in t.fields}
            self.progress = outer
        elif any_live(self.console):  # another kind of live display: no second one
            self.enabled = False
            return
        else:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            own = Progress(*columns, console=self.console, transient=True)
            own.start()
            self.progress, self.own, fields = own, True, {}
        self.task = self.progress.add_task(self.description, total=self.total, completed=min(self.done, self.total),
                                          **fields)

    def close(self) -> None:
        if self.progress is None:
            return
        if self.own:
            self.progress.stop()
        elif self.task is not None:
            self.progress.remove_task(self.task)


@contextmanager
def progress_task(description: str, total: int, *, console: Console | None = None, enabled: bool = True,
                  delay: float | None = None) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n=1)``. Once the work has run ``delay`` seconds (default DEFAULT_DELAY) a bar appears: a task of the ``Progress``
    live on ``console`` (or rich's global console) when there is one, else a transient bar of its own; none under
    another live display or with ``enabled=False``. The bar (or task) is removed when the block ends."""
    bar = _Bar(description, total, console, enabled, delay)
    try:
        yield bar.advance
    finally:
        bar.close()
