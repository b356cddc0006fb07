"""`kproxy run` as a process in a lab node's namespace, for end-to-end tests.

The daemon runs through ``ip netns exec`` (so it sees the node's interfaces and /sys), logs JSON
lines to a file that `events` reads, and is stopped with SIGTERM as a DaemonSet pod would be.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kproxy.lab.namespaces import Lab, NamespaceRef
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import call_in

KPROXY = str(Path(sys.executable).with_name("kproxy"))


@dataclass
class KproxyProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, netns: str, log: Path, *args: str) -> KproxyProcess:
        """`kproxy run ARGS...` in `netns`, stdout and stderr to `log`."""
        with log.open("wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", netns, KPROXY, "run", *args], stdout=out, stderr=out)
        return cls(proc, log)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines so far (those named `name`, if given)."""
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit status; killed (and raises) if it does not end in `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def http_get(ns: NamespaceRef, port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path from inside `ns` (the daemon's /healthz, /metrics...)."""

    def fetch() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    return call_in(ns, fetch)


@dataclass
class DaemonEnv:
    """What an end-to-end module shares: the lab, whose node-1 runs the daemons started so far
    (the last one current) against the fake API server, and a directory for their logs."""

    lab: Lab
    api: FakeAPIServer
    tmp: Path
    kproxies: list[KproxyProcess] = field(default_factory=list)

    @property
    def node(self) -> str:
        return self.lab.node(1).ns

    @property
    def client(self) -> str:
        return self.lab.client(1).ns

    @property
    def kproxy(self) -> KproxyProcess:
        return self.kproxies[-1]

    def get(self, port: int, path: str) -> tuple[int, bytes]:
        return http_get(self.node, port, path)
