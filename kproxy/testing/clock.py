"""A fake clock for `kproxy.runner` (and anything else taking a `Clock`).

Time moves only when a test calls `advance`. A thread waiting on the clock wakes when it is
notified or when time is advanced, never by itself. `wait_parked` lets a test know that the
threads using the clock have seen the latest time and gone back to waiting, which is what makes
"nothing happened" assertions deterministic without sleeping.
"""

from __future__ import annotations

import threading


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._t = start
        self._gen = 0
        self._state = threading.Condition()
        self._conds: set[threading.Condition] = set()
        # thread id -> the clock generation it saw when it went to wait
        self._parked: dict[int, int] = {}

    def now(self) -> float:
        with self._state:
            return self._t

    def advance(self, seconds: float) -> None:
        with self._state:
            self._t += seconds
            self._gen += 1
            conds = list(self._conds)
            self._state.notify_all()
        # Never while holding _state: a waiter holds its own condition when it calls wait().
        for cond in conds:
            with cond:
                cond.notify_all()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Called with `cond` held; returns when notified or when the clock is advanced."""
        me = threading.get_ident()
        with self._state:
            self._conds.add(cond)
            self._parked[me] = self._gen
            self._state.notify_all()
        try:
            cond.wait()  # an advance() notifies only after this releases `cond`
        finally:
            with self._state:
                self._parked.pop(me, None)
                self._state.notify_all()

    def wait_parked(self, n: int = 1, timeout: float = 5.0) -> bool:
        """Wait (real time) until `n` threads wait on the clock having seen the current time."""
        with self._state:
            return self._state.wait_for(lambda: sum(1 for g in self._parked.values() if g == self._gen) >= n, timeout)
