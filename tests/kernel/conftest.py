"""Fixtures for tests that send real packets between network namespaces.

Every test here is marked `kernel` and skipped, with the reason, unless the process is root and
iproute2 is installed. The `lab` fixture gives each test module a fresh, running `Lab` whose
prefix carries this process's id, so concurrent test runs (xdist workers, two engineers on one
machine) never share namespaces; labs left behind by test runs that died are removed first.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kproxy.lab.namespaces import NETNS_DIR, Lab, lab_namespaces, remove_namespaces

# Test labs are named kt<pid>[letters]-...: the pid tells whether their owner still runs.
_TEST_PREFIX = re.compile(r"(kt(\d+)[a-z]*)-")
_HERE = Path(__file__).parent


def _why_not_runnable() -> str:
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces, veth, iptables)"
    for tool in ("ip", "bridge", "sysctl", "iptables"):
        if shutil.which(tool) is None:
            return f"kernel tests need {tool!r} on PATH"
    return ""


_SKIP_REASON = _why_not_runnable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.kernel)
            if _SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))


def _own_prefix(suffix: str = "") -> str:
    """A lab prefix owned by this process: ``kt<pid>`` plus optional lowercase letters."""
    return f"kt{os.getpid()}{suffix}"


def _remove_dead_test_labs() -> None:
    """Remove labs of earlier test processes that no longer run (crashed or killed)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return
    matches = [m for m in map(_TEST_PREFIX.match, names) if m]
    for prefix in sorted({m.group(1) for m in matches if not Path(f"/proc/{m.group(2)}").exists()}):
        remove_namespaces(prefix)


@pytest.fixture(scope="session", autouse=True)
def _clean_slate() -> None:
    if not _SKIP_REASON:
        _remove_dead_test_labs()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A running lab (2 nodes x 2 pods, 1 client) for one test module, removed afterwards.

    Tests that change kernel state in it (rules, sysctls) undo the change themselves, since the
    rest of the module shares the lab.
    """
    with Lab(prefix=_own_prefix()) as running:
        yield running
    assert not lab_namespaces(running.prefix), "lab namespaces survived down()"


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """A factory for extra labs with their own prefixes (``make_lab("x", nodes=3)``), all
    removed at the end of the test, whatever happened."""
    made: list[Lab] = []

    def make(suffix: str, **layout: int) -> Lab:
        new = Lab(prefix=_own_prefix(suffix), **layout)
        made.append(new)
        return new

    yield make
    for one in made:
        one.down()
