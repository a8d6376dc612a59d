"""The API launcher's Prometheus multiprocess directory: stale when its launcher is gone,
told by a lock the launcher holds, not by its pid (in a container the launcher is pid 1
in every run, so a directory named by a pid looked alive for ever; review of issue 12)."""

from __future__ import annotations

import os
from pathlib import Path

from api import metrics_dir


def test_a_running_launchers_directory_stays_and_a_gone_ones_is_removed_even_as_pid_1(tmp_path):
    mine, lock = metrics_dir.make(str(tmp_path))
    # A container's earlier run: its launcher was pid 1 too (alive: this container's init),
    # killed outright, so its directory and unheld lock file stayed.
    earlier = tmp_path / f"{metrics_dir.PREFIX}1-abcdef"
    earlier.mkdir()
    (earlier / metrics_dir.LOCK).write_bytes(b"")
    (earlier / "counter_123.db").write_bytes(b"x")
    assert metrics_dir.remove_stale(str(tmp_path)) == [str(earlier)]
    assert Path(mine).is_dir() and not earlier.exists()
    metrics_dir.close(mine, lock)
    assert not Path(mine).exists()


def test_a_directory_from_before_lock_files_goes_by_its_pid(tmp_path):
    alive = tmp_path / f"{metrics_dir.PREFIX}{os.getpid()}-old"
    gone = tmp_path / f"{metrics_dir.PREFIX}{2**22 + 7}-old"  # above pid_max's default
    alive.mkdir()
    gone.mkdir()
    assert metrics_dir.remove_stale(str(tmp_path)) == [str(gone)]
    assert alive.is_dir()
