"""The garbage collector of a long-running server process.

CPython's full (generation 2) collection walks every tracked container object. After start-up
a server holds hundreds of thousands of them that live as long as the process (modules,
classes, FastAPI's and pydantic's models, the runtime), so each full collection paused the event
loop for about 100 ms under load: the slowest webhook answers of ``benchmarks/peak_calls.py``
(ack p99 80 ms at 50 calls/s while p50 was 3 ms) were exactly those pauses, measured with
``gc.callbacks``. ``freeze_startup_objects()``, called once the app is built and before it
serves, moves everything alive at that moment into the permanent generation (``gc.freeze()``),
which collections skip; what requests allocate is collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect start-up garbage, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()
