"""The host's own addresses and sysctls, in the current network namespace."""

from __future__ import annotations

import os
from pathlib import Path

from pyroute2 import IPRoute

from kproxy.errors import BackendError
from kproxy.model import IPFamily

_PROC_SYS = Path("/proc/sys")


def local_addresses(family: IPFamily) -> tuple[str, ...]:
    """Every address configured on an interface of this namespace (loopback included)."""
    af = 2 if family is IPFamily.V4 else 10
    with IPRoute() as ipr:
        addrs = [msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr(family=af)]
    return tuple(sorted({a for a in addrs if a}, key=lambda a: (a.startswith(("127.", "::1")), a)))


def set_sysctl(name: str, value: str) -> bool:
    """Write a sysctl (`net/ipv4/conf/all/route_localnet`); True if it changed."""
    path = _PROC_SYS / name
    try:
        current = path.read_text().strip()
        if current == value:
            return False
        path.write_text(value)
        return True
    except OSError as e:
        raise BackendError(f"cannot set sysctl {name}={value}: {os.strerror(e.errno or 0)}") from e


def get_sysctl(name: str) -> str | None:
    try:
        return (_PROC_SYS / name).read_text().strip()
    except OSError:
        return None
