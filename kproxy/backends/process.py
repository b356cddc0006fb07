"""Attributes of the kproxy process itself."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kproxy.errors import BackendError

# glibc's <malloc.h>: the most arenas malloc may create.
_M_ARENA_MAX = -8


def set_oom_score_adj(value: int) -> None:
    """As kube-proxy's --oom-score-adj: make the OOM killer spare (negative) or prefer this process."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(value))
    except OSError as e:
        raise BackendError(f"cannot set oom_score_adj={value}: {os.strerror(e.errno or 0)}") from e


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Let glibc's malloc use at most `arenas` arenas from now on; True if it was set.

    glibc gives each thread that meets a busy arena one of its own (up to 8 per core), and each
    arena keeps its freed memory. CPython allocates under its global lock, so the daemon's
    threads (a reflector per resource, the sync loop, the health and metrics servers) never
    contend for an arena; separate ones only spread the freed memory of the initial list over
    several heaps (2 MiB of `kproxy run`'s peak at 1,000 Services). An operator's
    ``MALLOC_ARENA_MAX`` is left as it is; a libc without `mallopt` (musl) is left alone.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_ARENA_MAX, arenas))
