"""How every `airlock` command talks to its operator: one prefixed line on stderr, tables on stdout."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

__all__ = ["duration", "err", "table", "working"]


def err(message: str) -> None:
    print(f"airlock: {message}", file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None) -> None:
    """A table on stdout: rich's, boxed on a terminal; plain aligned columns when piped."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: whole lines, never wrapped at 80 columns
        console = Console(width=1000)
    box = None
    if console.is_terminal:
        from rich import box as boxes

        box = boxes.SIMPLE_HEAD
    grid = Table(
        *header, title=title, box=box, show_edge=False, pad_edge=False, title_justify="left", expand=False
    )
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(grid, highlight=False)


def duration(seconds: float) -> str:
    """12s, 5m12s, 3h04m, 2d03h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


@contextlib.contextmanager
def working(what: str) -> Iterator[None]:
    """A long step: a spinner with the elapsed time on a terminal (stderr); nothing when piped."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(what), TimeElapsedColumn(), console=console, transient=True):
        yield
