"""Processes timed whole, each in a throw-away network namespace, within a time budget.

- `fresh_netns` creates a namespace with only loopback up and deletes it on the way out,
  whatever happened (an exception, Ctrl-C, SIGTERM: `main` turns SIGTERM into KeyboardInterrupt).
- `timed` runs argv in its own process group and waits for it with `os.wait4`, so the figures are
  the process's own: wall time from spawn to exit, user and system CPU and peak RSS (`ru_maxrss`;
  the children it waited for, such as iptables-restore, are counted in the CPU times and in the
  peak if theirs was higher). Past its budget the whole group is killed and the result says so.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every kproxy process runs this tree's code, whatever the venv's editable install points at.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
KPROXY = [sys.executable, "-m", "kproxy.cli.main"]
# The same command, reporting its own peak RSS apart from its children's (own_peak.py).
KPROXY_OWN_PEAK = [sys.executable, str(Path(__file__).with_name("own_peak.py")), "kproxy.cli.main"]
PREFIX = "kpbench"


class OverBudget(Exception):
    """The run did not finish within its time budget."""


@dataclass
class Timed:
    argv: list[str]
    returncode: int | None  # None: killed over budget
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mib: float
    stdout: str
    stderr: str

    @property
    def over_budget(self) -> bool:
        return self.returncode is None


def netns_name(tag: str) -> str:
    return f"{PREFIX}{os.getpid()}{tag}"[:40]


@contextmanager
def fresh_netns(tag: str) -> Iterator[str]:
    name = netns_name(tag)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def remove_leftovers() -> None:
    """Namespaces of benchmark runs whose process is gone (a run killed with SIGKILL)."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        if name.startswith(PREFIX):
            digits = "".join(c for c in name[len(PREFIX) :] if c.isdigit())
            pid = int(digits[:7]) if digits else 0
            if pid and not Path(f"/proc/{pid}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


RUSAGE = Path(__file__).with_name("rusage.py")


class _Spawned:
    """What the rest of `timed` needs of a spawned process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


def in_netns(ns: str, argv: Sequence[str]) -> list[str]:
    # `ip netns exec` execs the command in place (no fork), so the pid and rusage are its own.
    return ["ip", "netns", "exec", ns, *argv]


def timed(
    argv: Sequence[str], budget: float, *, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> Timed:
    """Run argv to its end or `budget` seconds, whichever comes first."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin is not None else (None, None)
    report = tempfile.NamedTemporaryFile(prefix="kproxy-bench-rusage-", suffix=".json", delete=False)
    report.close()
    argv = [sys.executable, "-S", str(RUSAGE), report.name, *argv]
    devnull = os.open(os.devnull, os.O_RDONLY) if in_r is None else None
    actions = [
        (os.POSIX_SPAWN_DUP2, in_r if in_r is not None else devnull, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    started = time.perf_counter()
    # Through rusage.py, a small fresh process: a child's peak RSS starts at its parent's RSS
    # (hundreds of MiB once a large cluster was generated here) and exec keeps it, so a command
    # started from here reported the benchmark's own size as its ru_maxrss.
    pid = os.posix_spawnp(argv[0], list(argv), dict(env) if env is not None else ENV, file_actions=actions, setsid=True)
    proc = _Spawned(pid)
    os.close(out_w)
    os.close(err_w)
    if devnull is not None:
        os.close(devnull)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while data := os.read(fd, 1 << 16):
            chunks[fd].append(data)
        os.close(fd)

    def feed() -> None:
        assert in_w is not None and stdin is not None
        try:
            with os.fdopen(in_w, "wb") as f:
                f.write(stdin.encode())
        except BrokenPipeError:
            pass

    threads = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    if in_r is not None:
        os.close(in_r)
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    status: list[tuple[int, float, resource.struct_rusage]] = []

    def reap() -> None:
        _, code, usage = os.wait4(proc.pid, 0)
        status.append((code, time.perf_counter(), usage))

    waiter = threading.Thread(target=reap, daemon=True)
    waiter.start()
    waiter.join(budget)
    killed = waiter.is_alive()
    if killed:
        kill_group(proc.pid)
        waiter.join()
    proc.returncode = 0  # reaped above; keep Popen from waiting again
    for t in threads:
        t.join()
    code, ended, usage = status[0]
    own = {"wall_s": ended - started, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "maxrss_mib": 0.0}
    try:
        own = json.loads(Path(report.name).read_text())  # the command's own, from rusage.py
    except (OSError, ValueError):
        pass  # killed over budget: no report
    finally:
        Path(report.name).unlink(missing_ok=True)
    return Timed(
        argv=list(argv[4:]),
        returncode=None if killed else os.waitstatus_to_exitcode(code),
        wall_s=own["wall_s"],
        user_s=own["user_s"],
        sys_s=own["sys_s"],
        maxrss_mib=own["maxrss_mib"],
        stdout=b"".join(chunks[out_r]).decode(errors="replace"),
        stderr=b"".join(chunks[err_r]).decode(errors="replace"),
    )


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def vm_hwm_mib(pid: int) -> float | None:
    """A live process's peak RSS (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
