"""The nginx process: ``nginx -t``, start, reload (SIGHUP), stop, and whether a reload took.

Guarantees:
- `test` runs ``nginx -t`` on any configuration file with the same prefix as the running one
  and returns nginx's own message; nothing is started or signalled.
- `start` runs nginx in the foreground (``daemon off``) as our child, its stderr appended to a
  log file, and returns once the master has written its pid file; an nginx that exits at once
  (a port in use) raises `BackendError` with the tail of its log.
- A master that outlived an earlier controller (same pid file, same configuration path) is
  adopted rather than started twice: reloads and stops signal it by pid.
- `reload` sends SIGHUP and waits until the master has started workers that were not there
  before (only then has nginx loaded the new configuration) and every old worker has stopped
  accepting (it is gone, or titled "shutting down"), so a connection made after `reload`
  returns meets the new configuration. nginx answers a configuration it
  cannot load at reload time (an address it cannot bind) by keeping the old workers, so no new
  worker within the timeout means "not reloaded" and `BackendError`. Old workers finish their
  in-flight requests (up to ``worker_shutdown_timeout``) without any help from us.
- `stop` asks for a graceful quit (SIGQUIT), then SIGTERM, then SIGKILL, each with a deadline,
  and reaps the child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from kproxy.errors import BackendError

_POLL = 0.01


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) is not alive for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (nginx workers of a master)."""
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
            out.add(int(entry.name))
    return out


class NginxProcess:
    def __init__(self, binary: str, prefix: str, conf: str, pid_file: str, log_file: str) -> None:
        self.binary = binary
        self.prefix = prefix
        self.conf = conf
        self.pid_file = Path(pid_file)
        self.log_file = Path(log_file)
        self._child: subprocess.Popen[bytes] | None = None

    def argv(self, conf: str | None = None, *extra: str) -> list[str]:
        return [self.binary, "-p", self.prefix + "/", "-c", conf or self.conf, "-e", "stderr", *extra]

    # --- check

    def test(self, conf: str, timeout: float = 60) -> tuple[bool, str]:
        """``nginx -t`` of `conf`: (accepted, nginx's messages)."""
        argv = self.argv(conf, "-t", "-q")
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError as e:
            raise BackendError(f"{self.binary} is not installed", argv=tuple(argv)) from e
        except subprocess.TimeoutExpired as e:
            raise BackendError(f"nginx -t did not finish in {timeout}s", argv=tuple(argv)) from e
        return res.returncode == 0, res.stderr.strip()

    # --- the master

    def pid(self) -> int | None:
        """The running master's pid: our child, or an adopted master of this configuration."""
        if self._child is not None:
            if self._child.poll() is None:
                return self._child.pid
            self._child = None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid > 0 and _pid_alive(pid) and "nginx: master" in _cmdline(pid) and self.conf in _cmdline(pid):
            return pid
        return None

    def running(self) -> bool:
        return self.pid() is not None

    def workers(self) -> set[int]:
        pid = self.pid()
        return children(pid) if pid is not None else set()

    def start(self, timeout: float = 10.0) -> int:
        if self.running():
            raise BackendError("nginx is already running")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        start_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass
        argv = self.argv(None, "-g", "daemon off;")
        with self.log_file.open("ab") as log:
            try:
                self._child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            except FileNotFoundError as e:
                raise BackendError(f"{self.binary} is not installed", argv=tuple(argv)) from e
        child = self._child
        deadline = time.monotonic() + timeout
        while True:
            if child.poll() is not None:
                self._child = None
                raise BackendError(
                    "nginx exited at start",
                    argv=tuple(argv),
                    returncode=child.returncode,
                    stderr=self._log_tail(start_offset),
                )
            try:
                if int(self.pid_file.read_text().strip()) == child.pid and children(child.pid):
                    return child.pid
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BackendError(
                    f"nginx did not come up within {timeout}s", argv=tuple(argv), stderr=self._log_tail(start_offset)
                )
            time.sleep(_POLL)  # polling the pid file; the deadline above bounds the wait

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, then wait for new workers (see the module docstring)."""
        pid = self.pid()
        if pid is None:
            raise BackendError("nginx is not running")
        before = children(pid)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            now = children(pid)
            # Done when new workers run and every old one has stopped accepting: an old worker
            # retitles itself "is shutting down" right before it closes its listening sockets.
            if now - before and all(not _pid_alive(w) or "shutting down" in _cmdline(w) for w in before & now):
                return
            if not _pid_alive(pid):
                raise BackendError("nginx exited during the reload", stderr=self._log_tail(offset))
            if time.monotonic() > deadline:
                raise BackendError(
                    f"nginx did not take the new configuration within {timeout}s (it keeps the old one)",
                    stderr=self._log_tail(offset),
                )
            time.sleep(_POLL)  # polling /proc for the new workers; bounded by the deadline

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.pid()
        if pid is None:
            self._reap()
            return
        for sig, share in ((signal.SIGQUIT, 0.6), (signal.SIGTERM, 0.3), (signal.SIGKILL, 0.1)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout * share
            while _pid_alive(pid) and time.monotonic() < deadline:
                if self._child is not None and self._child.poll() is not None:
                    break
                time.sleep(_POLL)  # waiting for the master to exit; bounded by the deadline
            if not _pid_alive(pid) or (self._child is not None and self._child.poll() is not None):
                break
        self._reap()

    def _reap(self) -> None:
        if self._child is not None:
            try:
                self._child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._child = None

    def _log_tail(self, offset: int, limit: int = 4000) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read()[-limit:].decode(errors="replace").strip()
        except OSError:
            return ""
