"""Conntrack entries through the `conntrack` tool (conntrack-tools).

Listing is one process per family; deleting names the exact 5-tuple, so only the flows the
caller chose are touched.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable

from kproxy.errors import BackendError
from kproxy.model import Flow, IPFamily, Protocol

_KV = re.compile(r"(\w+)=(\S+)")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise BackendError("conntrack (conntrack-tools) is not installed", argv=tuple(argv)) from e


def parse_flows(text: str, protocol: Protocol) -> list[Flow]:
    flows = []
    for line in text.splitlines():
        pairs = _KV.findall(line)
        src = [v for k, v in pairs if k == "src"]
        dst = [v for k, v in pairs if k == "dst"]
        sport = [v for k, v in pairs if k == "sport"]
        dport = [v for k, v in pairs if k == "dport"]
        if len(src) < 2 or len(dst) < 1 or len(sport) < 2 or len(dport) < 1:
            continue
        flows.append(
            Flow(protocol, src[0], dst[0], int(sport[0]), int(dport[0]), reply_src=src[1], reply_sport=int(sport[1]))
        )
    return flows


class Conntrack:
    def __init__(self, family: IPFamily) -> None:
        self.family = family
        self._f = "ipv4" if family is IPFamily.V4 else "ipv6"

    def list(self, protocol: Protocol = Protocol.UDP) -> list[Flow]:
        argv = ["conntrack", "-L", "-f", self._f, "-p", protocol.lowercase]
        res = _run(argv)
        if res.returncode != 0:
            raise BackendError(
                "listing conntrack entries failed", argv=tuple(argv), returncode=res.returncode, stderr=res.stderr
            )
        return parse_flows(res.stdout, protocol)

    def delete(self, flows: Iterable[Flow]) -> int:
        deleted = 0
        for fl in flows:
            argv = [
                "conntrack",
                "-D",
                "-f",
                self._f,
                "-p",
                fl.protocol.lowercase,
                "-s",
                fl.orig_src,
                "-d",
                fl.orig_dst,
                "--sport",
                str(fl.orig_sport),
                "--dport",
                str(fl.orig_dport),
            ]
            res = _run(argv)
            # Exit status 1 with "0 flow entries": the flow expired meanwhile, which is the goal.
            if res.returncode == 0:
                deleted += 1
            elif "0 flow entries" not in res.stderr:
                raise BackendError(
                    "deleting a conntrack entry failed", argv=tuple(argv), returncode=res.returncode, stderr=res.stderr
                )
        return deleted
