"""How long each phase of a load took, logged at DEBUG on the `loadspec` logger.

    import logging; logging.basicConfig(); logging.getLogger("loadspec").setLevel(logging.DEBUG)

then `loadspec.load(...)` logs lines such as `load phase imports: 2.913 s`. Costs nothing when
DEBUG is off.
"""
from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("loadspec")


@contextlib.contextmanager
def phase(name: str):
    """Time the block and log it as `load phase NAME: S s` (when the logger is at DEBUG)."""
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        log.debug("load phase %s: %.3f s", name, time.perf_counter() - start)
