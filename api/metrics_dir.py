"""The Prometheus multiprocess directory of one API launcher (`api.serve`): made fresh at
each start, removed at exit, and found stale when its launcher is gone.

A launcher holds an exclusive `flock` on the directory's lock file for its lifetime; a
directory whose lock can be taken belongs to a launcher that is gone (killed outright, so
it could not remove it). Not its pid: in a container the launcher is pid 1 in every run,
and a pid is reused, so a directory named by a pid can look alive for ever. Stdlib only:
`api.serve` uses this before anything else is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO

PREFIX = "llmq-api-metrics-"
LOCK = ".launcher.lock"


def make(parent: str | None = None) -> tuple[str, IO[bytes]]:
    """A fresh directory, and its lock file held (keep it open: closing it frees the lock)."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)
    lock = open(Path(path) / LOCK, "wb")  # noqa: SIM115 (held for the process's lifetime)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # The supervisor's children are spawned with only their standard streams: they do not
    # inherit it (only the launcher holds the lock).
    os.set_inheritable(lock.fileno(), False)
    return path, lock


def remove_stale(parent: str | None = None) -> list[str]:
    """Remove the directories of launchers that are gone; the paths removed."""
    removed = []
    for path in Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if not path.is_dir():
            continue
        try:
            with open(path / LOCK, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            if not _pid_gone(path):  # made before lock files (or being made now): by its pid
                continue
        except OSError:
            continue  # locked: its launcher runs
        shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path))
    return removed


def _pid_gone(path: Path) -> bool:
    try:
        pid = int(path.name[len(PREFIX) :].split("-", 1)[0])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def close(path: str, lock: IO[bytes]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        lock.close()
