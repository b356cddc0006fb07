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


def keep_long_lived() -> None:
    """Take everything alive now out of the cyclic collector's view (`gc.freeze`).

    Called after a full sync: the cluster state, the views and what the proxiers remember are
    then hundreds of thousands of long-lived, acyclic objects. Left in the oldest generation,
    each full collection would scan them all (100 ms and more at 10,000 Services, in the middle
    of a later one-endpoint sync). Frozen objects are still freed by reference counting when
    they go; only a reference cycle among them would outlive its use, and they form none.
    Young garbage is collected first so that it is not frozen with them.
    """
    gc.collect(1)
    gc.freeze()
