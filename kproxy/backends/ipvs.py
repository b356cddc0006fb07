"""IPVS virtual servers and real servers over generic netlink (pyroute2), and the IPVS knobs.

What it guarantees:
- One `IPVS` netlink socket per `Ipvs` object, opened in the network namespace of the thread
  that first uses it and used from that thread only (pyroute2: one socket per thread). `close()`
  releases it.
- Every real server is written with masquerade forwarding (IP_VS_CONN_F_MASQ) explicitly:
  pyroute2's IPVSDest defaults to direct routing. Services are written with their scheduler,
  flags and persistence timeout explicitly (IPVSService defaults to wlc).
- Reads return what the kernel holds, parsed from the raw attributes: `IPVSDest.from_message`
  reports IPVSDest's default forwarding method, not the kernel's.
- Every write is counted in `writes` (by operation), so tests can check that a sync touched
  only what changed. A refused write raises BackendError naming the operation, the service and
  the errno.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import socket
import struct
import subprocess
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from pyroute2 import IPVS, IPVSDest, IPVSService
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import ipvs as genl_ipvs

from kproxy.errors import BackendError
from kproxy.model import IPFamily, Protocol

IP_VS_CONN_F_MASQ = 0
_IP_VS_PROC = Path("/proc/thread-self/net/ip_vs")
_PROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: socket.IPPROTO_SCTP}
_PROTO_BACK = {v: k for k, v in _PROTO.items()}
_AF = {IPFamily.V4: socket.AF_INET, IPFamily.V6: socket.AF_INET6}
_SVC_STATS = ("IPVS_SVC_ATTR_STATS", "IPVS_SVC_ATTR_STATS64")
# The service netmask attribute is a be32 read raw by the kernel: an IPv4 mask, or for IPv6 the
# prefix length as a native u32 (what ipvsadm sends). pyroute2 encodes it as an IPv4 address.
_V6_NETMASK = socket.inet_ntoa(struct.pack("=I", 128))


class ServiceEntry(NamedTuple):
    protocol: Protocol
    ip: str
    port: int
    scheduler: str
    flags: int
    timeout: int


class DestEntry(NamedTuple):
    ip: str
    port: int
    weight: int
    fwd: int
    active: int
    inactive: int


class _ConfigMsg(genlmsg):  # type: ignore[misc]
    """IPVS_CMD_SET_CONFIG with the timeouts as u32 (pyroute2 declares them as opaque hex)."""

    prefix = "IPVS_CMD_ATTR_"
    nla_map = (
        ("IPVS_CMD_ATTR_UNSPEC", "none"),
        ("IPVS_CMD_ATTR_SERVICE", "none"),
        ("IPVS_CMD_ATTR_DEST", "none"),
        ("IPVS_CMD_ATTR_DAEMON", "none"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_UDP", "uint32"),
    )


def _errno_name(e: NetlinkError) -> str:
    return errno.errorcode.get(e.code, str(e.code))


def ensure_loaded() -> None:
    """Load ip_vs if this kernel has not yet (its ip_vs file appears in every namespace then).

    /proc/thread-self, not /proc/net (which is /proc/self/net: the main thread's namespace).
    """
    if _IP_VS_PROC.exists():
        return
    try:
        res = subprocess.run(["modprobe", "ip_vs"], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as e:
        raise BackendError("IPVS is not loaded and modprobe is not installed", argv=("modprobe", "ip_vs")) from e
    if res.returncode != 0 or not _IP_VS_PROC.exists():
        raise BackendError(
            "IPVS is not available in this kernel (ip_vs)",
            argv=("modprobe", "ip_vs"),
            returncode=res.returncode,
            stderr=res.stderr,
        )


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class Ipvs:
    """The IPVS table of the current thread's network namespace."""

    def __init__(self) -> None:
        self._sock: IPVS | None = None
        self.writes: Counter[str] = Counter()

    def _ipvs(self) -> IPVS:
        if self._sock is None:
            ensure_loaded()
            try:
                self._sock = IPVS()
            except (NetlinkError, OSError) as e:
                raise BackendError(f"cannot open the IPVS netlink family: {e}") from e
        return self._sock

    def ensure_loaded(self) -> None:
        """Load ip_vs if needed (its sysctls exist only then)."""
        ensure_loaded()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Ipvs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reading

    def services(self, family: IPFamily | None = None) -> list[ServiceEntry]:
        out = []
        try:
            msgs = self._ipvs().service("dump")
        except NetlinkError as e:
            raise BackendError(f"dumping IPVS services failed: {_errno_name(e)}") from e
        for msg in msgs:
            attrs = dict((k, v) for k, v in msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"] if k not in _SVC_STATS)
            if "IPVS_SVC_ATTR_FWMARK" in attrs and "IPVS_SVC_ATTR_ADDR" not in attrs:
                continue  # fwmark services are never ours
            af = attrs.get("IPVS_SVC_ATTR_AF")
            if family is not None and af != _AF[family]:
                continue
            proto = _PROTO_BACK.get(attrs.get("IPVS_SVC_ATTR_PROTOCOL", 0))
            if proto is None:
                continue
            flags = attrs.get("IPVS_SVC_ATTR_FLAGS") or {}
            out.append(
                ServiceEntry(
                    proto,
                    str(attrs["IPVS_SVC_ATTR_ADDR"]),
                    int(attrs["IPVS_SVC_ATTR_PORT"]),
                    str(attrs.get("IPVS_SVC_ATTR_SCHED_NAME", "")),
                    int(flags.get("flags", 0)),
                    int(attrs.get("IPVS_SVC_ATTR_TIMEOUT", 0)),
                )
            )
        return out

    def dests(self, protocol: Protocol, ip: str, port: int) -> list[DestEntry]:
        try:
            msgs = self._ipvs().dest("dump", service=self._key(protocol, ip, port))
        except NetlinkError as e:
            raise BackendError(f"dumping real servers of {protocol.value} {ip}:{port} failed: {_errno_name(e)}") from e
        out = []
        for msg in msgs:
            a = dict(msg.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])
            out.append(
                DestEntry(
                    str(a["IPVS_DEST_ATTR_ADDR"]),
                    int(a["IPVS_DEST_ATTR_PORT"]),
                    int(a.get("IPVS_DEST_ATTR_WEIGHT", 0)),
                    int(a.get("IPVS_DEST_ATTR_FWD_METHOD", 0)) & 0x7,
                    int(a.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                    int(a.get("IPVS_DEST_ATTR_INACT_CONNS", 0)),
                )
            )
        return out

    def timeouts(self) -> tuple[int, int, int]:
        """(tcp, tcpfin, udp) seconds, as `ipvsadm -L --timeout`."""
        msg = genl_ipvs.ipvsmsg()
        msg["cmd"] = genl_ipvs.IPVS_CMD_GET_CONFIG
        msg["version"] = genl_ipvs.GENL_VERSION
        sock = self._ipvs()
        try:
            (reply,) = sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST)
        except NetlinkError as e:
            raise BackendError(f"reading IPVS timeouts failed: {_errno_name(e)}") from e
        attrs = dict(reply["attrs"])

        def u32(name: str) -> int:
            raw = attrs.get(name, "0")
            if isinstance(raw, int):
                return raw
            return int.from_bytes(bytes.fromhex(str(raw).replace(":", "")), "little")

        return (
            u32("IPVS_CMD_ATTR_TIMEOUT_TCP"),
            u32("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN"),
            u32("IPVS_CMD_ATTR_TIMEOUT_UDP"),
        )

    # ----- writing

    @staticmethod
    def _key(protocol: Protocol, ip: str, port: int) -> IPVSService:
        return IPVSService(addr=ip, port=port, protocol=_PROTO[protocol])

    @staticmethod
    def _service(protocol: Protocol, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> IPVSService:
        fields: dict[str, object] = {
            "addr": ip,
            "port": port,
            "protocol": _PROTO[protocol],
            "sched_name": scheduler,
            "flags": {"flags": flags, "mask": 0xFFFFFFFF},
            "timeout": timeout,
        }
        if ":" in ip:
            fields["netmask"] = _V6_NETMASK
        return IPVSService(**fields)

    def _write(self, op: str, what: str, fn: object, *args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)  # type: ignore[operator]
        except NetlinkError as e:
            raise BackendError(f"IPVS {op} {what} refused: {_errno_name(e)} ({os.strerror(e.code)})") from e
        self.writes[op] += 1

    def add_service(self, protocol: Protocol, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> None:
        svc = self._service(protocol, ip, port, scheduler, flags, timeout)
        self._write("add_service", f"{protocol.value} {ip}:{port}", self._ipvs().service, "add", service=svc)

    def update_service(self, protocol: Protocol, ip: str, port: int, scheduler: str, flags: int, timeout: int) -> None:
        svc = self._service(protocol, ip, port, scheduler, flags, timeout)
        self._write("update_service", f"{protocol.value} {ip}:{port}", self._ipvs().service, "set", service=svc)

    def delete_service(self, protocol: Protocol, ip: str, port: int) -> None:
        svc = self._key(protocol, ip, port)
        self._write("delete_service", f"{protocol.value} {ip}:{port}", self._ipvs().service, "del", service=svc)

    def _dest_op(
        self, op: str, cmd: str, protocol: Protocol, ip: str, port: int, rip: str, rport: int, weight: int
    ) -> None:
        dest = IPVSDest(addr=rip, port=rport, weight=weight, fwd_method=IP_VS_CONN_F_MASQ)
        what = f"{protocol.value} {ip}:{port} -> {rip}:{rport}"
        self._write(op, what, self._ipvs().dest, cmd, service=self._key(protocol, ip, port), dest=dest)

    def add_dest(self, protocol: Protocol, ip: str, port: int, rip: str, rport: int, weight: int = 1) -> None:
        self._dest_op("add_dest", "add", protocol, ip, port, rip, rport, weight)

    def update_dest(self, protocol: Protocol, ip: str, port: int, rip: str, rport: int, weight: int) -> None:
        self._dest_op("update_dest", "set", protocol, ip, port, rip, rport, weight)

    def delete_dest(self, protocol: Protocol, ip: str, port: int, rip: str, rport: int) -> None:
        self._dest_op("delete_dest", "del", protocol, ip, port, rip, rport, 0)

    def set_timeouts(self, tcp: int, tcpfin: int, udp: int) -> None:
        """As `ipvsadm --set tcp tcpfin udp`; 0 keeps the kernel's current value."""
        msg = _ConfigMsg()
        msg["cmd"] = genl_ipvs.IPVS_CMD_SET_CONFIG
        msg["version"] = genl_ipvs.GENL_VERSION
        msg["attrs"] = [
            ("IPVS_CMD_ATTR_TIMEOUT_TCP", int(tcp)),
            ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", int(tcpfin)),
            ("IPVS_CMD_ATTR_TIMEOUT_UDP", int(udp)),
        ]
        sock = self._ipvs()
        self._write(
            "set_timeouts",
            f"{tcp} {tcpfin} {udp}",
            sock.nlm_request,
            msg,
            msg_type=sock.prid,
            msg_flags=NLM_F_REQUEST | NLM_F_ACK,
        )
