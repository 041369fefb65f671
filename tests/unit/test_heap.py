"""Start-up objects are frozen out of the garbage collector's full collections."""

from __future__ import annotations

import gc

from retailcrm_service.ops.heap import YOUNG_THRESHOLD, freeze_startup_objects


def test_objects_alive_at_start_up_move_to_the_permanent_generation() -> None:
    threshold = gc.get_threshold()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000  # every module, class and function loaded so far
        assert gc.get_count()[2] == 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()  # the test process goes on creating and dropping apps
        gc.set_threshold(*threshold)
