"""Directory watchers that stop only when asked, whatever the files or the file system do.

An exception anywhere (in the handler, in the watch itself, a directory that is gone) is logged and
counted, and the watch starts again after a pause that doubles up to 30 s; when it starts again the
handler runs once, since anything may have changed while nobody watched. A directory that is deleted,
renamed or replaced is noticed within `check_ms` (an inotify watch on the old one would hear nothing
more) and watched again once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

__all__ = ["OnChange", "watch_directory"]

_log = logging.getLogger("airlock.watch")

# The changed paths; None when it is unknown what changed (the watch started again): look at everything.
OnChange = Callable[[set[Path] | None], Awaitable[None]]


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def watch_directory(
    directory: Path,
    on_change: OnChange,
    stop: asyncio.Event,
    *,
    name: str,
    on_error: Callable[[], None] = lambda: None,
    watch_filter: Callable[[Path], bool] | None = None,
    debounce_ms: int = 300,
    check_ms: int = 1000,
    pauses: tuple[float, float] = (1.0, 30.0),
) -> None:
    """Call `on_change` with the changed paths (those `watch_filter` keeps) until `stop` is set.

    `name` labels the log lines; `on_error` is called once per failure (to count it)."""
    keep: Callable[[watchfiles.Change, str], bool] = watchfiles.DefaultFilter()
    if watch_filter is not None:
        keep = lambda _change, path: watch_filter(Path(path))  # noqa: E731
    pause = pauses[0]
    missed = False  # changes may have gone unseen: run the handler once the watch is back
    while not stop.is_set():
        try:
            identity = _identity(directory)
            if identity is None:
                raise FileNotFoundError(f"{directory} is missing")
            if missed:
                await on_change(None)
                missed = False
            watch = watchfiles.awatch(
                directory, stop_event=stop, debounce=debounce_ms, rust_timeout=check_ms,
                yield_on_timeout=True, watch_filter=keep,
            )  # fmt: skip
            async with contextlib.aclosing(watch):  # the watch ends here, however the loop ends
                async for changes in watch:
                    pause = pauses[0]  # the watch is up: the next failure starts the pauses afresh
                    if _identity(directory) != identity:
                        _log.warning("%s watch: %s was replaced or removed; watching again", name, directory)
                        missed = True
                        break
                    if changes:
                        await on_change({Path(path) for _, path in changes})
                else:
                    if not stop.is_set():  # never spin on a watch that keeps ending by itself
                        raise RuntimeError("the watch ended by itself")
        except Exception as exc:
            on_error()
            missed = True
            if isinstance(exc, OSError):  # the directory is gone or unreadable: no traceback needed
                _log.error("%s watch failed (%s); trying again in %.0f s", name, exc, pause)
            else:
                _log.exception("%s watch failed; trying again in %.0f s", name, pause)
            await _pause(stop, pause)
            pause = min(pause * 2, pauses[1])
