"""An in-memory conntrack table of one family, in place of backends.conntrack.Conntrack.

`flows` is the table; tests put flows in it. Every listing is counted (`lists`: each one is a
full dump on a real node), every deletion recorded (`deleted`), and `fail_next` makes the next
calls raise BackendError, as a missing or failing conntrack tool does.
"""

from __future__ import annotations

from collections.abc import Iterable

from kproxy.errors import BackendError
from kproxy.model import Flow, Protocol


class FakeConntrack:
    def __init__(self, flows: Iterable[Flow] = ()) -> None:
        self.flows: list[Flow] = list(flows)
        self.lists = 0
        self.deleted: list[Flow] = []
        self._failures = 0

    def fail_next(self, n: int = 1) -> None:
        self._failures = n

    def _maybe_fail(self, what: str) -> None:
        if self._failures > 0:
            self._failures -= 1
            raise BackendError(f"{what} conntrack entries failed (injected)")

    def list(self, protocol: Protocol = Protocol.UDP) -> list[Flow]:
        self.lists += 1
        self._maybe_fail("listing")
        return [fl for fl in self.flows if fl.protocol is protocol]

    def delete(self, flows: Iterable[Flow]) -> int:
        self._maybe_fail("deleting")
        deleted = 0
        for fl in flows:
            # A flow that expired meanwhile is not an error (the real backend's rule too).
            if fl in self.flows:
                self.flows.remove(fl)
                self.deleted.append(fl)
                deleted += 1
        return deleted
