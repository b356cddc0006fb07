"""Work that allocates a large, acyclic heap: the cyclic garbage collector paused meanwhile.

Loading a cluster's state and rendering its rules allocate hundreds of thousands of strings,
tuples and frozen dataclasses and create no reference cycles. The collector would otherwise scan
the growing heap over and over (it tripled the render time at 10,000 Services and doubled the
load time of a 5,000-Service state file); nothing it could free is made meanwhile.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
