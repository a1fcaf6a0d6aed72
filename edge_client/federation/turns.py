"""Machine-wide turns: clients that share one machine's cores do their round's work at most N at a time.

Four demo clients on two cores, each with one torch thread, finish a round's client work as soon taking turns two
at a time as all four at once, and far sooner than with every client using every core (spinning threads;
`benchmarks/thread_layout.py`); in turns, each client's clock times its own work on a core of its own, so a
client planning to a deadline plans from its real step times.

A turn is one of N lock files in a directory the clients share, held with ``flock`` while the work runs: the
kernel releases it when its holder exits, however it exits, so a crashed or killed client never keeps a turn.
Every client must name the same directory: `fedge client start` makes it absolute. POSIX only (elsewhere the
clients work at once, with a warning).

    with turn("/tmp/demo/turns:2"):
        ...  # at most 2 processes naming that directory are in here at once
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("fedge.turns")

POLL_S = 0.2  # how often a waiting client looks for a free turn


def parse_turns(spec: str) -> tuple[Path, int]:
    """``DIR:N`` -> (DIR, N); ValueError saying what is expected."""
    directory, sep, count = spec.rpartition(":")
    if not sep or not directory or not re.fullmatch(r"[0-9]{1,6}", count) or int(count) < 1:
        raise ValueError(f"turns must be DIR:N (a directory the clients share, N >= 1 at once), got {spec!r}")
    return Path(directory), int(count)


@contextlib.contextmanager
def turn(spec: str, poll_s: float = POLL_S) -> Iterator[None]:
    """Hold one of the ``spec``'s turns (`parse_turns`) for the block; wait for a free one. ``""``: no turns.

    OSError naming the directory if its lock files cannot be made or locked (e.g. a filesystem without flock).
    """
    if not spec:
        yield
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): every client works at once
        log.warning("turns %s: this system has no flock; the clients work at once", spec)
        yield
        return
    directory, count = parse_turns(spec)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"turns {directory}: cannot create the directory ({err.strerror})") from None
    while True:
        for i in range(count):
            path = directory / f"turn-{i}.lock"
            try:
                # read-only is enough for flock, so a lock file another user made (0o666 before the umask) serves
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
            except OSError as err:
                raise OSError(f"turns {directory}: cannot open {path.name} ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except OSError as err:
                os.close(fd)
                raise OSError(f"turns {directory}: cannot lock {path.name} ({err.strerror})") from None
            try:
                yield
            finally:
                os.close(fd)  # closing the only descriptor drops the lock
            return
        time.sleep(poll_s)
