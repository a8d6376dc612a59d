"""freeze_startup_heap: what exists when a process is up leaves the collector's sight."""

from __future__ import annotations

import gc

from common.heap import freeze_startup_heap


def test_the_startup_heap_is_frozen_and_the_collector_sees_only_what_comes_after():
    gc.unfreeze()
    try:
        tracked = len(gc.get_objects())
        frozen = freeze_startup_heap("test")
        assert frozen >= tracked // 2  # (some were garbage, collected first)
        assert len(gc.get_objects()) < tracked // 10
        later = [[i] for i in range(1000)]  # made after: tracked again
        assert len(gc.get_objects()) >= len(later)
    finally:
        gc.unfreeze()
