"""The daemon's own process settings (kproxy.backends.process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kproxy.backends.process import limit_malloc_arenas


def test_an_operators_malloc_arena_max_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_arenas_are_limited_on_glibc() -> None:
    # In a child process: the limit lasts for the life of the process that sets it.
    code = "import os; os.environ.pop('MALLOC_ARENA_MAX', None)\n" + (
        "from kproxy.backends.process import limit_malloc_arenas; print(limit_malloc_arenas())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
