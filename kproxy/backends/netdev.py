"""Addresses per network device and route lookups, over netlink, in the current namespace.

hostPort programming needs both: the node's own addresses device by device (so the IPVS dummy
device's Service VIPs can be left out), and the device a pod is reached through (where
``route_localnet`` must be on for 127.0.0.1:hostPort). One `IPRoute` socket per call, closed at
once (pyroute2: one socket per thread).
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import BackendError


def addresses_by_device() -> dict[str, tuple[str, ...]]:
    """Every address of every interface, both families, keyed by interface name."""
    try:
        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            out: dict[str, list[str]] = {}
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_ADDRESS")
                if msg["family"] == socket.AF_INET:
                    addr = msg.get_attr("IFA_LOCAL") or addr  # point-to-point links: the local end
                if addr:
                    out.setdefault(str(names.get(msg["index"], msg["index"])), []).append(addr)
    except NetlinkError as e:
        raise BackendError(f"listing addresses failed: {e}") from e
    return {dev: tuple(sorted(set(addrs))) for dev, addrs in out.items()}


def output_device(dst: str) -> str | None:
    """The interface a packet from this host to `dst` leaves by (``ip route get``), or None."""
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=dst)
            if not routes:
                return None
            index = routes[0].get_attr("RTA_OIF")
            if index is None:
                return None
            links = ipr.get_links(index)
            return str(links[0].get_attr("IFLA_IFNAME")) if links else None
    except NetlinkError as e:
        if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return None
        raise BackendError(f"route lookup for {dst} failed: {e}") from e
