"""The bounded-frequency runner on a fake clock: time moves only when a test advances it.

"Nothing ran" is asserted after `FakeClock.wait_parked`, i.e. once the runner has seen the latest
time and gone back to waiting; "it ran" is waited for with a deadline. Nothing sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from kproxy.runner import BoundedFrequencyRunner
from kproxy.testing.clock import FakeClock

DEADLINE = 5.0
MIN, MAX, RETRY = 1.0, 30.0, 2.0


class Work:
    """The runner's function: records when it ran; can fail, raise, or block until released."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.results: list[bool] = []
        self.error: BaseException | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self) -> bool:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(DEADLINE)
        self.times.append(self.clock.now())
        if self.error is not None:
            raise self.error
        return self.results.pop(0) if self.results else True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0)


@pytest.fixture
def make(clock: FakeClock) -> Iterator[Callable[..., tuple[BoundedFrequencyRunner, Work]]]:
    made: list[BoundedFrequencyRunner] = []

    def build(**intervals: float) -> tuple[BoundedFrequencyRunner, Work]:
        work = Work(clock)
        opts = {"min_interval": MIN, "max_interval": MAX, "retry_interval": RETRY, **intervals}
        runner = BoundedFrequencyRunner("test", work, clock=clock, **opts)
        made.append(runner)
        return runner, work

    yield build
    for runner in made:
        assert runner.stop(DEADLINE), "runner thread did not stop"


def settle(clock: FakeClock) -> None:
    assert clock.wait_parked(1, DEADLINE), "runner did not go back to waiting"


def test_requested_run_starts_at_once(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make()
    runner.start()
    runner.run()
    assert runner.wait_runs(1, DEADLINE)
    assert work.times == [100.0]


def test_no_run_before_a_request_or_the_period(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make()
    runner.start()
    settle(clock)
    clock.advance(MAX - 0.1)
    settle(clock)
    assert runner.runs == 0


def test_minimum_interval_from_the_end_of_the_last_run(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make()
    runner.start()
    runner.run()
    assert runner.wait_runs(1, DEADLINE)
    runner.run()
    settle(clock)
    clock.advance(MIN / 2)
    settle(clock)
    assert runner.runs == 1
    clock.advance(MIN / 2)
    assert runner.wait_runs(2, DEADLINE)
    assert work.times == [100.0, 100.0 + MIN]


def test_requests_during_a_run_coalesce_into_one_more_run(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make(min_interval=0.0)
    work.gate = threading.Event()
    runner.start()
    runner.run()
    assert work.entered.wait(DEADLINE)
    for _ in range(5):
        runner.run()
    work.gate.set()
    assert runner.wait_runs(2, DEADLINE)
    settle(clock)
    assert runner.runs == 2


def test_periodic_run_without_requests(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make()
    runner.start()
    runner.run()
    assert runner.wait_runs(1, DEADLINE)
    clock.advance(MAX)
    assert runner.wait_runs(2, DEADLINE)
    clock.advance(MAX)
    assert runner.wait_runs(3, DEADLINE)
    assert work.times == [100.0, 100.0 + MAX, 100.0 + 2 * MAX]


def test_a_deadline_brings_a_run_before_the_period_that_requests_keep_pushing_back(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make()
    runner.start()
    runner.run()
    assert runner.wait_runs(1, DEADLINE)
    runner.run_by(100.0 + MAX)  # due a period after the first run started
    clock.advance(MAX / 2)
    runner.run()  # a requested run half-way: the periodic run would now wait a period after it
    assert runner.wait_runs(2, DEADLINE)
    runner.run_by(100.0 + MAX)  # that run met the deadline; the daemon sets it again after each
    clock.advance(MAX / 2)
    assert runner.wait_runs(3, DEADLINE)
    assert work.times == [100.0, 100.0 + MAX / 2, 100.0 + MAX]
    settle(clock)
    clock.advance(MAX - 0.1)  # met: no deadline left, the period counts from the last run again
    settle(clock)
    assert runner.runs == 3


def test_failures_retry_with_doubling_backoff_capped_at_the_period(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make(max_interval=10.0)
    work.results = [False, False, False, False, True]
    runner.start()
    runner.run()
    expected = [100.0]
    for delay in (RETRY, 2 * RETRY, 8.0, 10.0):  # 2, 4, 8, then capped at max (16 > 10)
        assert runner.wait_runs(len(expected), DEADLINE)
        settle(clock)
        clock.advance(delay - 0.5)
        settle(clock)
        assert runner.runs == len(expected), f"retried before {delay}s"
        clock.advance(0.5)
        expected.append(expected[-1] + delay)
    assert runner.wait_runs(5, DEADLINE)
    assert work.times == expected
    assert runner.failures == 0


def test_a_request_does_not_wait_for_the_retry(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make(retry_interval=20.0)
    work.results = [False]
    runner.start()
    runner.run()
    assert runner.wait_runs(1, DEADLINE)
    runner.run()
    settle(clock)
    clock.advance(MIN)
    assert runner.wait_runs(2, DEADLINE)
    assert work.times == [100.0, 100.0 + MIN]


def test_an_exception_stops_the_runner_loudly(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make()
    work.error = RuntimeError("bug")
    with capture_logs() as logs:
        runner.start()
        runner.run()
        assert runner.wait_runs(1, DEADLINE) is False  # ended by the error, not by a finished run
        assert runner.stop(DEADLINE)
    assert isinstance(runner.error, RuntimeError)
    assert [e["event"] for e in logs] == ["runner_crashed"]


def test_stop_waits_for_the_run_in_progress_and_nothing_runs_after(
    make: Callable[..., tuple[BoundedFrequencyRunner, Work]], clock: FakeClock
) -> None:
    runner, work = make(min_interval=0.0)
    work.gate = threading.Event()
    runner.start()
    runner.run()
    assert work.entered.wait(DEADLINE)
    runner.run()  # pending when stop() comes: must not run
    seen_at_stop: list[int] = []

    def stop_and_look() -> None:
        if runner.stop(DEADLINE):
            seen_at_stop.append(len(work.times))

    stopper = threading.Thread(target=stop_and_look)
    stopper.start()
    work.gate.set()
    stopper.join(DEADLINE)
    assert seen_at_stop == [1]  # stop() returned only after the run in progress had finished
    assert runner.runs == 1 and not runner.alive


def test_invalid_intervals_are_refused() -> None:
    with pytest.raises(ValueError):
        BoundedFrequencyRunner("x", lambda: True, min_interval=2, max_interval=1, retry_interval=1)
    with pytest.raises(ValueError):
        BoundedFrequencyRunner("x", lambda: True, min_interval=0, max_interval=0, retry_interval=1)
