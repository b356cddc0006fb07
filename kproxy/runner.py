"""A bounded-frequency runner: upstream's BoundedFrequencyRunner, with an injected clock.

One thread calls `fn` (the sync). Guarantees, all measured on the injected clock:
- **Coalescing.** Any number of `run()` calls while a run is pending or in progress yield one run
  (a request that arrives during a run yields exactly one more run after it).
- **Minimum interval.** A run never starts sooner than `min_interval` after the previous one
  ended, whatever the requests (end to start, so a slow sync cannot be followed by another at once).
- **Maximum interval.** A run starts at most `max_interval` after the previous one ended (or after
  `start`), requested or not: the periodic resync.
- **Deadline.** `run_by(t)` asks for a run no later than `t` (never sooner than the minimum
  interval): the daemon's once-per-sync-period drift check, which partial syncs would otherwise
  keep pushing back.
- **Retry.** When `fn` returns False the runner retries after `retry_interval`, doubling with
  each consecutive failure up to `max_interval`, never sooner than the minimum interval. A
  success resets the backoff; a `run()` request is honoured at once (subject to the minimum).
- **Loud bugs.** An exception from `fn` is not retried: it is kept in `error`, logged
  (``runner_crashed``) and the thread ends; the owner decides (the daemon exits).
- `stop` returns after the run in progress, if any, has finished; no run starts after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)


class Clock(Protocol):
    def now(self) -> float: ...

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on `cond` (held by the caller) until notified or `timeout` passes on this clock."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        cond.wait(timeout)


class BoundedFrequencyRunner:
    def __init__(
        self,
        name: str,
        fn: Callable[[], bool],
        *,
        min_interval: float,
        max_interval: float,
        retry_interval: float,
        clock: Clock | None = None,
    ) -> None:
        if min_interval < 0 or max_interval <= 0 or retry_interval <= 0:
            raise ValueError("intervals must be positive (min_interval may be 0)")
        if max_interval < min_interval:
            raise ValueError("max_interval must not be shorter than min_interval")
        self.name = name
        self._fn = fn
        self._min = min_interval
        self._max = max_interval
        self._retry = retry_interval
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._cond = threading.Condition()
        self._requested = False
        self._retry_at: float | None = None
        self._deadline: float | None = None
        self._failures = 0
        self._started_at: float | None = None
        self._last_end: float | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.runs = 0

    # -- public surface ------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"runner {self.name} already started")
            self._started_at = self._clock.now()
            self._thread = threading.Thread(target=self._loop, name=f"runner:{self.name}", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Request a run as soon as the minimum interval allows."""
        with self._cond:
            self._requested = True
            self._cond.notify_all()

    def run_by(self, deadline: float) -> None:
        """Request a run no later than `deadline` on the runner's clock (the earliest request
        wins; a run that starts meanwhile satisfies it)."""
        with self._cond:
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the run in progress; True when the thread has ended."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def failures(self) -> int:
        """Consecutive failed runs."""
        with self._cond:
            return self._failures

    def wait_runs(self, n: int, timeout: float) -> bool:
        """Wait (in real time, at most `timeout`) until `n` runs have finished in total."""
        with self._cond:
            return self._cond.wait_for(lambda: self.runs >= n or self._error is not None, timeout) and (self.runs >= n)

    def next_due(self) -> float | None:
        """When the next run may start, on the runner's clock (None before `start`)."""
        with self._cond:
            return self._due()

    # -- the loop ------------------------------------------------------------------------------

    def _due(self) -> float | None:
        if self._started_at is None:
            return None
        base = self._last_end if self._last_end is not None else self._started_at
        earliest = self._last_end + self._min if self._last_end is not None else self._started_at
        due = max(base + self._max, earliest)
        if self._requested:
            due = min(due, earliest)
        if self._retry_at is not None:
            due = min(due, max(self._retry_at, earliest))
        if self._deadline is not None:
            due = min(due, max(self._deadline, earliest))
        return due

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    due = self._due()
                    now = self._clock.now()
                    if due is not None and now >= due:
                        break
                    self._clock.wait(self._cond, None if due is None else due - now)
                self._requested = False
                self._retry_at = None
                self._deadline = None
            try:
                ok = self._fn()
            except BaseException as exc:  # a bug: end loudly, never spin on it
                log.error("runner_crashed", runner=self.name, exc_info=exc)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self.runs += 1
                end = self._clock.now()
                self._last_end = end
                if ok:
                    self._failures = 0
                else:
                    self._failures += 1
                    delay = min(self._max, self._retry * 2 ** (self._failures - 1))
                    self._retry_at = end + delay
                self._cond.notify_all()
