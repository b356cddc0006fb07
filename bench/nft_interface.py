"""Which kernel interface should the nftables mode use? Measure them on this kernel.

Generates kproxy-shaped nftables rulesets in three layouts, loads them into throw-away network
namespaces, and times full loads, small changes (one endpoint replaced, one Service added, one
deleted) and read-backs through each candidate interface:

* ``nft -f FILE`` (a process per sync);
* libnftables in-process through ctypes (``libnftables.so.1`` from Debian's ``libnftables1``),
  with one long-lived context and with a fresh context per call, text and JSON input;
* nf_tables netlink batches written by hand (``NlBatch`` below: set elements, gen id, table and
  rule probes) and, for comparison, pyroute2's message classes sent as one batch.

Layouts (one ``table ip kproxy``; base chains at nat prerouting/output/postrouting and filter
hooks; ``service-ips`` vmap keyed ``ip daddr . meta l4proto . th dport``; ``service-nodeports``
vmap keyed ``meta l4proto . th dport``):

* ``upstream``: kube-proxy's nftables layout: a chain per Service port with
  ``numgen random mod N vmap { i : goto endpoint-... }`` and a chain per endpoint (masquerade-mark
  for hairpin, then ``dnat to``);
* ``svcchain``: a chain per Service port whose rule DNATs through an anonymous map,
  ``dnat ip addr . port to numgen random mod N map { i : ip . port }``; hairpin via one set;
* ``shared``: no per-Service kernel object at all: one chain ``lb-N`` per distinct endpoint count N,
  ``dnat ip addr . port to ip daddr . meta l4proto . th dport . numgen random mod N map @backends``
  where ``backends`` is one named map for every Service; a Service is a ``service-ips`` element
  (``goto lb-N``) plus N ``backends`` elements.

Every measurement runs inside a network namespace that this script creates and removes (also on
failure); the timings themselves are taken by a worker process started inside the namespace
(``ip netns exec``), so no figure includes ``ip netns exec``'s own cost. Nothing is asserted.

    flock /tmp/kproxy-bench.lock python bench/nft_interface.py --sizes 1000x10 10000x10 50000x5 \
        --out /tmp/nft-interface.json

The generators (``render_full``, ``change_scripts``) and ``NlBatch``/``LibNft`` are importable for
a future mode's tests, but product code under ``kproxy/`` must not import ``bench``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TABLE = "kproxy"
LAYOUTS = ("upstream", "svcchain", "shared")
CLUSTER_CIDR = "10.0.0.0/8"
NODEPORT_SERVICES = 2000  # the first this many Services also get a NodePort
MASQ = "0x4000"
PORT, TARGET_PORT = 80, 8080
REPEATS = 7  # small changes: each direction applied this many times; the median is reported

# ------------------------------------------------------------------------------------------------
# the generated cluster


def svc_ip(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("172.16.0.1")) + i))


def ep_ip(i: int, j: int, m: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.1.0.0")) + i * m + j + 1))


def spare_ip(k: int) -> str:
    """An endpoint address no generated Service uses (for the endpoint-change script)."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.200.0.1")) + k))


def _hash(s: str) -> str:
    return base64.b32encode(hashlib.sha256(s.encode()).digest())[:8].decode()


def svc_name(i: int) -> str:
    """Upstream-shaped chain name: service-HASH-ns/name/proto/port."""
    base = f"ns{i % 100}/svc{i}/tcp/p{PORT}"
    return f"service-{_hash(base)}-{base}"


def ep_name(i: int, ip: str) -> str:
    base = f"ns{i % 100}/svc{i}/tcp/p{PORT}__{ip}/{TARGET_PORT}"
    return f"endpoint-{_hash(base)}-{base}"


@dataclass
class Counts:
    """Kernel objects a layout creates (what nft's cache must fetch is chains and sets)."""

    chains: int = 0
    rules: int = 0
    named_sets: int = 0
    anon_sets: int = 0
    elements: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Script:
    lines: list[str] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _q(name: str) -> str:
    return name  # upstream's names (letters, digits, - _ . /) need no quoting in nft's grammar


def _endpoints(i: int, m: int) -> list[str]:
    return [ep_ip(i, j, m) for j in range(m)]


def _skeleton(layout: str, s: Script, lb_sizes: set[int], base_chains: bool = True) -> None:
    c = s.counts
    L = s.lines
    L.append(f"add table ip {TABLE}")
    L.append(f"add map ip {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}")
    L.append(f"add map ip {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; }}")
    c.named_sets += 2
    if layout in ("svcchain", "shared"):
        L.append(f"add set ip {TABLE} hairpin {{ type ipv4_addr . ipv4_addr ; }}")
        c.named_sets += 1
    if layout == "shared":
        L.append(
            f"add map ip {TABLE} backends {{ typeof ip daddr . meta l4proto . th dport . numgen random mod 1"
            " : ip daddr . th dport ; }"
        )
        L.append(
            f"add map ip {TABLE} nodeport-backends {{ typeof meta l4proto . th dport . numgen random mod 1"
            " : ip daddr . th dport ; }"
        )
        c.named_sets += 2
    regular = {
        "mark-for-masquerade": [f"meta mark set meta mark or {MASQ}"],
        "masquerading": [
            f"meta mark & {MASQ} == 0 return",
            f"meta mark set meta mark xor {MASQ}",
            "masquerade fully-random",
        ],
        "services": [
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "fib daddr type local meta l4proto . th dport vmap @service-nodeports",
        ],
        "firewall-check": [],
        "cluster-ips-check": [],
    }
    if layout in ("svcchain", "shared"):
        regular["masquerading"].insert(0, "ip saddr . ip daddr @hairpin masquerade")
    for name, rules in regular.items():
        L.append(f"add chain ip {TABLE} {name}")
        c.chains += 1
        for r in rules:
            L.append(f"add rule ip {TABLE} {name} {r}")
            c.rules += 1
    for n in sorted(lb_sizes) if layout == "shared" else ():
        for prefix, key in (("lb", "ip daddr . meta l4proto . th dport"), ("np-lb", "meta l4proto . th dport")):
            name = f"{prefix}-{n}"
            mapname = "backends" if prefix == "lb" else "nodeport-backends"
            L.append(f"add chain ip {TABLE} {name}")
            masq = (
                f"ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade" if prefix == "lb" else "jump mark-for-masquerade"
            )
            L.append(f"add rule ip {TABLE} {name} {masq}")
            L.append(
                f"add rule ip {TABLE} {name} meta l4proto {{ tcp, udp, sctp }} dnat ip addr . port to "
                f"{key} . numgen random mod {n} map @{mapname}"
            )
            c.chains += 1
            c.rules += 2
            c.anon_sets += 1  # the { tcp, udp, sctp } set
    if base_chains:
        _base_chains(s)


def _base_chains(s: Script) -> None:
    """The hooked chains: adding these last is what makes a table live."""
    base = {
        "filter-prerouting-pre-dnat": ("filter", "prerouting", "-110", ["ct state new jump firewall-check"]),
        "filter-output-pre-dnat": ("filter", "output", "-110", ["ct state new jump firewall-check"]),
        "filter-forward": ("filter", "forward", "0", ["ct state invalid drop", "jump cluster-ips-check"]),
        "filter-input": ("filter", "input", "0", ["ct state invalid drop"]),
        "filter-output": ("filter", "output", "0", ["ct state invalid drop", "jump cluster-ips-check"]),
        "nat-prerouting": ("nat", "prerouting", "-100", ["jump services"]),
        "nat-output": ("nat", "output", "-100", ["jump services"]),
        "nat-postrouting": ("nat", "postrouting", "100", ["jump masquerading"]),
    }
    for name, (typ, hook, prio, rules) in base.items():
        s.lines.append(f"add chain ip {TABLE} {name} {{ type {typ} hook {hook} priority {prio} ; policy accept ; }}")
        s.counts.chains += 1
        for r in rules:
            s.lines.append(f"add rule ip {TABLE} {name} {r}")
            s.counts.rules += 1


def _svc_objects(layout: str, i: int, eps: list[str], s: Script, nodeport: bool) -> None:
    """Everything one Service port adds (chains, rules, elements)."""
    c, L, m = s.counts, s.lines, len(eps)
    key = f"{svc_ip(i)} . tcp . {PORT}"
    if layout == "shared":
        L.append(f"add element ip {TABLE} service-ips {{ {key} : goto lb-{m} }}")
        elems = ", ".join(f"{key} . {j} : {ip} . {TARGET_PORT}" for j, ip in enumerate(eps))
        L.append(f"add element ip {TABLE} backends {{ {elems} }}")
        hp = ", ".join(f"{ip} . {ip}" for ip in eps)
        L.append(f"add element ip {TABLE} hairpin {{ {hp} }}")
        c.elements += 1 + 2 * m
        if nodeport:
            np_ = f"tcp . {30000 + i}"
            L.append(f"add element ip {TABLE} service-nodeports {{ {np_} : goto np-lb-{m} }}")
            elems = ", ".join(f"{np_} . {j} : {ip} . {TARGET_PORT}" for j, ip in enumerate(eps))
            L.append(f"add element ip {TABLE} nodeport-backends {{ {elems} }}")
            c.elements += 1 + m
        return
    chain = _q(svc_name(i))
    L.append(f"add chain ip {TABLE} {chain}")
    c.chains += 1
    L.append(
        f"add rule ip {TABLE} {chain} ip daddr {svc_ip(i)} tcp dport {PORT} ip saddr != {CLUSTER_CIDR} "
        "jump mark-for-masquerade"
    )
    c.rules += 1
    if layout == "upstream":
        for ip in eps:
            ec = _q(ep_name(i, ip))
            L.append(f"add chain ip {TABLE} {ec}")
            L.append(f"add rule ip {TABLE} {ec} ip saddr {ip} jump mark-for-masquerade")
            L.append(f"add rule ip {TABLE} {ec} meta l4proto tcp dnat to {ip}:{TARGET_PORT}")
            c.chains += 1
            c.rules += 2
        vm = ", ".join(f"{j} : goto {_q(ep_name(i, ip))}" for j, ip in enumerate(eps))
        L.append(f"add rule ip {TABLE} {chain} numgen random mod {m} vmap {{ {vm} }}")
    else:  # svcchain
        mp = ", ".join(f"{j} : {ip} . {TARGET_PORT}" for j, ip in enumerate(eps))
        L.append(
            f"add rule ip {TABLE} {chain} meta l4proto tcp dnat ip addr . port to numgen random mod {m} map {{ {mp} }}"
        )
        hp = ", ".join(f"{ip} . {ip}" for ip in eps)
        L.append(f"add element ip {TABLE} hairpin {{ {hp} }}")
        c.elements += m
    c.rules += 1
    c.anon_sets += 1
    c.elements += m  # the anonymous map's elements
    L.append(f"add element ip {TABLE} service-ips {{ {key} : goto {chain} }}")
    c.elements += 1
    if nodeport:
        L.append(f"add element ip {TABLE} service-nodeports {{ tcp . {30000 + i} : goto {chain} }}")
        c.elements += 1


def _svc_delete(layout: str, i: int, eps: list[str], s: Script, nodeport: bool) -> None:
    L, m = s.lines, len(eps)
    key = f"{svc_ip(i)} . tcp . {PORT}"
    L.append(f"delete element ip {TABLE} service-ips {{ {key} }}")
    if layout == "shared":
        L.append(f"delete element ip {TABLE} backends {{ {', '.join(f'{key} . {j}' for j in range(m))} }}")
        L.append(f"delete element ip {TABLE} hairpin {{ {', '.join(f'{ip} . {ip}' for ip in eps)} }}")
        if nodeport:
            np_ = f"tcp . {30000 + i}"
            L.append(f"delete element ip {TABLE} service-nodeports {{ {np_} }}")
            L.append(f"delete element ip {TABLE} nodeport-backends {{ {', '.join(f'{np_} . {j}' for j in range(m))} }}")
        return
    if nodeport:
        L.append(f"delete element ip {TABLE} service-nodeports {{ tcp . {30000 + i} }}")
    chain = _q(svc_name(i))
    L.append(f"delete chain ip {TABLE} {chain}")
    if layout == "upstream":
        for ip in eps:
            L.append(f"delete chain ip {TABLE} {_q(ep_name(i, ip))}")
    else:
        L.append(f"delete element ip {TABLE} hairpin {{ {', '.join(f'{ip} . {ip}' for ip in eps)} }}")


def render_full(layout: str, n: int, m: int, base_chains: bool = True) -> Script:
    """The whole table for n Services x m endpoints, as one nft script (one transaction)."""
    s = Script()
    _skeleton(layout, s, {m}, base_chains=base_chains)
    for i in range(n):
        _svc_objects(layout, i, _endpoints(i, m), s, i < NODEPORT_SERVICES)
    return s


def _ep_change(layout: str, i: int, old: list[str], new: list[str]) -> Script:
    """Replace one endpoint of Service i (same endpoint count): old -> new."""
    s = Script()
    L, m = s.lines, len(new)
    gone = [ip for ip in old if ip not in new]
    came = [ip for ip in new if ip not in old]
    key = f"{svc_ip(i)} . tcp . {PORT}"
    if layout == "shared":
        for j, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                L.append(f"delete element ip {TABLE} backends {{ {key} . {j} }}")
                L.append(f"add element ip {TABLE} backends {{ {key} . {j} : {b} . {TARGET_PORT} }}")
        for ip in gone:
            L.append(f"delete element ip {TABLE} hairpin {{ {ip} . {ip} }}")
        for ip in came:
            L.append(f"add element ip {TABLE} hairpin {{ {ip} . {ip} }}")
        return s
    chain = _q(svc_name(i))
    if layout == "upstream":
        for ip in came:
            ec = _q(ep_name(i, ip))
            L.append(f"add chain ip {TABLE} {ec}")
            L.append(f"add rule ip {TABLE} {ec} ip saddr {ip} jump mark-for-masquerade")
            L.append(f"add rule ip {TABLE} {ec} meta l4proto tcp dnat to {ip}:{TARGET_PORT}")
    L.append(f"flush chain ip {TABLE} {chain}")
    L.append(
        f"add rule ip {TABLE} {chain} ip daddr {svc_ip(i)} tcp dport {PORT} ip saddr != {CLUSTER_CIDR} "
        "jump mark-for-masquerade"
    )
    if layout == "upstream":
        vm = ", ".join(f"{j} : goto {_q(ep_name(i, ip))}" for j, ip in enumerate(new))
        L.append(f"add rule ip {TABLE} {chain} numgen random mod {m} vmap {{ {vm} }}")
        for ip in gone:  # upstream defers this by >= 1 s for kernels < 6.2; 6.x accepts it at once
            L.append(f"delete chain ip {TABLE} {_q(ep_name(i, ip))}")
    else:
        mp = ", ".join(f"{j} : {ip} . {TARGET_PORT}" for j, ip in enumerate(new))
        L.append(
            f"add rule ip {TABLE} {chain} meta l4proto tcp dnat ip addr . port to numgen random mod {m} map {{ {mp} }}"
        )
        for ip in gone:
            L.append(f"delete element ip {TABLE} hairpin {{ {ip} . {ip} }}")
        for ip in came:
            L.append(f"add element ip {TABLE} hairpin {{ {ip} . {ip} }}")
    return s


def change_scripts(layout: str, n: int, m: int) -> dict[str, tuple[str, str]]:
    """Small changes as (forward, back) script pairs; applying both returns the table to its start.

    endpoint: one endpoint of the middle Service replaced; svc-add/svc-del: one Service added then
    deleted (the pair is add, delete); elem: one service-ips element added/deleted and nothing else
    (what nft's cache needs for element-only scripts).
    """
    mid = n // 2
    old = _endpoints(mid, m)
    new = [spare_ip(0)] + old[1:]
    out = {"endpoint": (_ep_change(layout, mid, old, new).text(), _ep_change(layout, mid, new, old).text())}
    add, dele = Script(), Script()
    extra_eps = [spare_ip(100 + j) for j in range(m)]
    _svc_objects(layout, n, extra_eps, add, nodeport=False)
    _svc_delete(layout, n, extra_eps, dele, nodeport=False)
    out["service"] = (add.text(), dele.text())
    key = f"{svc_ip(n + 1)} . tcp . {PORT}"
    target = "lb-" + str(m) if layout == "shared" else _q(svc_name(0))
    out["elem"] = (
        f"add element ip {TABLE} service-ips {{ {key} : goto {target} }}\n",
        f"delete element ip {TABLE} service-ips {{ {key} }}\n",
    )
    return out


def elem_json(add: bool, n: int, m: int) -> str:
    """The 'elem' change (shared layout) as libnftables JSON input."""
    ip = svc_ip(n + 1)
    key = {"concat": [ip, "tcp", PORT]}
    elem = [[key, {"goto": {"target": f"lb-{m}"}}]] if add else [key]
    op = "add" if add else "delete"
    return json.dumps(
        {"nftables": [{op: {"element": {"family": "ip", "table": TABLE, "name": "service-ips", "elem": elem}}}]}
    )


# ------------------------------------------------------------------------------------------------
# libnftables through ctypes (what python3-nftables does, without the package)


class LibNft:
    """A libnftables context. Needs libnftables.so.1 (Debian: libnftables1, pulled in by nftables)."""

    OUTPUT_JSON = 1 << 4
    OUTPUT_ECHO = 1 << 5
    OUTPUT_TERSE = 1 << 11

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def set_flag(self, flag: int, on: bool) -> None:
        f = self.lib.nft_ctx_output_get_flags(self.ctx)
        self.lib.nft_ctx_output_set_flags(self.ctx, (f | flag) if on else (f & ~flag))

    def cmd(self, text: str) -> tuple[int, str, str]:
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode()
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode()
        return rc, out, err

    def json_cmd(self, text: str) -> tuple[int, str, str]:
        self.set_flag(self.OUTPUT_JSON, True)  # libnftables 1.0.6 parses JSON input when JSON output is on
        try:
            return self.cmd(text)
        finally:
            self.set_flag(self.OUTPUT_JSON, False)

    def close(self) -> None:
        self.lib.nft_ctx_free(self.ctx)


# ------------------------------------------------------------------------------------------------
# nf_tables netlink written by hand: enough for set elements and the drift probes

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_GETTABLE, NFT_MSG_GETRULE = 1, 7
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_GETGEN = 12, 14, 16
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NFT_GOTO = -4
AF_INET = 2


def nla(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * (-n % 4)


def nla_str(t: int, s: str) -> bytes:
    return nla(t, s.encode() + b"\0")


def key_ip_proto_port(ip: str, proto: int, port: int) -> bytes:
    """ipv4_addr . inet_proto . inet_service, each field padded to 4 bytes as nft does."""
    return socket.inet_aton(ip) + struct.pack("=B3x", proto) + struct.pack("!H2x", port)


def verdict_goto(chain: str) -> bytes:
    """NFTA_SET_ELEM_DATA { NFTA_DATA_VERDICT { code, chain } }."""
    return nla(2 | NLA_F_NESTED, nla(2 | NLA_F_NESTED, nla(1, struct.pack("!i", NFT_GOTO)) + nla_str(2, chain)))


class NlBatch:
    """One nf_tables transaction over a raw NETLINK_NETFILTER socket."""

    MAX_ELEMS_BYTES = 60000  # NFTA_SET_ELEM_LIST_ELEMENTS is one attribute: its length is 16 bits

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock or self.open()
        self.seq = int(time.time())
        self.parts: list[bytes] = []
        self.acks = 0

    @staticmethod
    def open() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.bind((0, 0))
        s.setsockopt(socket.SOL_SOCKET, 32, 1 << 26)  # SO_SNDBUFFORCE: a batch is one sendmsg
        s.setsockopt(socket.SOL_SOCKET, 33, 1 << 24)  # SO_RCVBUFFORCE: acks and dumps
        return s

    def _msg(self, mtype: int, flags: int, family: int, body: bytes, res_id: int = 0) -> bytes:
        self.seq += 1
        payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
        return struct.pack("=IHHII", 16 + len(payload), mtype, flags, self.seq, 0) + payload

    def elements(self, op: str, table: str, set_: str, elems: list[tuple[bytes, bytes | None]]) -> None:
        """Queue add/delete of (key, data-attribute-or-None) elements, split into messages of <64 KiB."""
        mtype = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if op == "add" else NFT_MSG_DELSETELEM)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op == "add" else 0)
        head = nla_str(1, table) + nla_str(2, set_)
        chunk: list[bytes] = []
        size = 0
        for key, data in elems:
            e = nla(1 | NLA_F_NESTED, nla(1 | NLA_F_NESTED, nla(1, key)) + (data or b""))
            if size + len(e) > self.MAX_ELEMS_BYTES and chunk:
                self.parts.append(self._msg(mtype, flags, AF_INET, head + nla(3 | NLA_F_NESTED, b"".join(chunk))))
                self.acks += 1
                chunk, size = [], 0
            chunk.append(e)
            size += len(e)
        if chunk:
            self.parts.append(self._msg(mtype, flags, AF_INET, head + nla(3 | NLA_F_NESTED, b"".join(chunk))))
            self.acks += 1

    def commit(self) -> None:
        """Send begin + messages + end as one sendmsg; raise OSError with the first error."""
        if not self.parts:
            return
        begin = self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, b"", NFNL_SUBSYS_NFTABLES)
        end = self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, b"", NFNL_SUBSYS_NFTABLES)
        self.sock.send(begin + b"".join(self.parts) + end)
        first_err = 0
        seen = 0
        while seen < self.acks:
            for mtype, _flags, _seq, body in _nl_parse(self.sock.recv(1 << 20)):
                if mtype == NLMSG_ERROR:
                    seen += 1
                    (err,) = struct.unpack_from("=i", body)
                    first_err = first_err or err
        self.parts.clear()
        self.acks = 0
        if first_err:
            raise OSError(-first_err, os.strerror(-first_err))


def _nl_parse(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    off = 0
    while off + 16 <= len(buf):
        ln, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
        yield mtype, flags, seq, buf[off + 16 : off + ln]
        off += (ln + 3) & ~3


def _nl_attrs(body: bytes) -> dict[int, bytes]:
    out, off = {}, 4  # after nfgenmsg
    while off + 4 <= len(body):
        ln, t = struct.unpack_from("=HH", body, off)
        out[t & 0x7FFF] = body[off + 4 : off + ln]
        off += (ln + 3) & ~3
    return out


def nl_request(sock: socket.socket, mtype: int, flags: int, family: int, body: bytes) -> list[tuple[int, bytes]]:
    """A get (or dump) request; returns [(msg type, body)] until DONE or the one reply."""
    b = NlBatch(sock)
    sock.send(b._msg((NFNL_SUBSYS_NFTABLES << 8) | mtype, NLM_F_REQUEST | flags, family, body))
    out: list[tuple[int, bytes]] = []
    while True:
        for t, _f, _s, payload in _nl_parse(sock.recv(1 << 20)):
            if t == NLMSG_DONE:
                return out
            if t == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", payload)
                if err:
                    raise OSError(-err, os.strerror(-err))
                return out
            out.append((t & 0xFF, payload))
            if not flags & NLM_F_DUMP:
                return out


def nl_genid(sock: socket.socket) -> int:
    """The ruleset generation: it moves on every committed transaction in this netns, by anyone."""
    ((_t, body),) = nl_request(sock, NFT_MSG_GETGEN, 0, 0, b"")
    return struct.unpack("!I", _nl_attrs(body)[1])[0]


def nl_table(sock: socket.socket, table: str) -> tuple[int, int] | None:
    """(handle, use) of our table, or None. A recreated table has a new handle."""
    try:
        ((_t, body),) = nl_request(sock, NFT_MSG_GETTABLE, 0, AF_INET, nla_str(1, table))
    except FileNotFoundError:
        return None
    a = _nl_attrs(body)
    return struct.unpack("!Q", a[4])[0], struct.unpack("!I", a[3])[0]


def nl_rule_count(sock: socket.socket, table: str, chain: str) -> int:
    """Rules in one chain (a kernel-filtered dump): 0 after someone flushed our table."""
    try:
        return len(nl_request(sock, NFT_MSG_GETRULE, NLM_F_DUMP, AF_INET, nla_str(1, table) + nla_str(2, chain)))
    except FileNotFoundError:
        return -1


# the change scripts of the shared layout as netlink element lists
def _backend_key(i: int, j: int) -> bytes:
    return key_ip_proto_port(svc_ip(i), 6, PORT) + struct.pack("=I", j)


def _backend_data(ip: str) -> bytes:
    return nla(2 | NLA_F_NESTED, nla(1, socket.inet_aton(ip) + struct.pack("!H2x", TARGET_PORT)))


def _hairpin_key(ip: str) -> bytes:
    return socket.inet_aton(ip) * 2


def nl_shared_change(batch: NlBatch, kind: str, forward: bool, n: int, m: int) -> None:
    """Queue the shared layout's change scripts (same content as change_scripts) as netlink."""
    if kind == "elem":
        key = key_ip_proto_port(svc_ip(n + 1), 6, PORT)
        if forward:
            batch.elements("add", TABLE, "service-ips", [(key, verdict_goto(f"lb-{m}"))])
        else:
            batch.elements("del", TABLE, "service-ips", [(key, None)])
    elif kind == "endpoint":
        mid = n // 2
        old, new = ep_ip(mid, 0, m), spare_ip(0)
        if not forward:
            old, new = new, old
        batch.elements("del", TABLE, "backends", [(_backend_key(mid, 0), None)])
        batch.elements("add", TABLE, "backends", [(_backend_key(mid, 0), _backend_data(new))])
        batch.elements("del", TABLE, "hairpin", [(_hairpin_key(old), None)])
        batch.elements("add", TABLE, "hairpin", [(_hairpin_key(new), None)])
    elif kind == "service":
        eps = [spare_ip(100 + j) for j in range(m)]
        key = key_ip_proto_port(svc_ip(n), 6, PORT)
        if forward:
            batch.elements(
                "add", TABLE, "backends", [(_backend_key(n, j), _backend_data(ip)) for j, ip in enumerate(eps)]
            )
            batch.elements("add", TABLE, "hairpin", [(_hairpin_key(ip), None) for ip in eps])
            batch.elements("add", TABLE, "service-ips", [(key, verdict_goto(f"lb-{m}"))])
        else:
            batch.elements("del", TABLE, "service-ips", [(key, None)])
            batch.elements("del", TABLE, "backends", [(_backend_key(n, j), None) for j in range(m)])
            batch.elements("del", TABLE, "hairpin", [(_hairpin_key(ip), None) for ip in eps])


def nl_shared_elements(batch: NlBatch, n: int, m: int) -> None:
    """Every element of the shared layout for n x m (for a full load: skeleton by nft, elements here)."""
    svc, back, hp, npv, npb = [], [], [], [], []
    for i in range(n):
        eps = _endpoints(i, m)
        svc.append((key_ip_proto_port(svc_ip(i), 6, PORT), verdict_goto(f"lb-{m}")))
        back.extend((_backend_key(i, j), _backend_data(ip)) for j, ip in enumerate(eps))
        hp.extend((_hairpin_key(ip), None) for ip in eps)
        if i < NODEPORT_SERVICES:
            npk = struct.pack("=B3x", 6) + struct.pack("!H2x", 30000 + i)
            npv.append((npk, verdict_goto(f"np-lb-{m}")))
            npb.extend((npk + struct.pack("=I", j), _backend_data(ip)) for j, ip in enumerate(eps))
    batch.elements("add", TABLE, "backends", back)
    batch.elements("add", TABLE, "nodeport-backends", npb)
    batch.elements("add", TABLE, "hairpin", hp)
    batch.elements("add", TABLE, "service-nodeports", npv)
    batch.elements("add", TABLE, "service-ips", svc)


# ------------------------------------------------------------------------------------------------
# pyroute2 for comparison: its message classes, sent as one batch


def pyroute2_shared_change(nft: object, kind: str, forward: bool, n: int, m: int) -> None:
    from pyroute2.netlink import NLM_F_ACK as P_ACK
    from pyroute2.netlink import NLM_F_CREATE as P_CREATE
    from pyroute2.netlink import NLM_F_REQUEST as P_REQ
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES as SUB
    from pyroute2.netlink.nfnetlink import nfgen_msg
    from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg

    def elem_msg(op: str, set_: str, elems: list[tuple[bytes, str | None]]) -> nft_set_elem_list_msg:
        msg = nft_set_elem_list_msg()
        msg["nfgen_family"] = AF_INET
        items = []
        for key, goto in elems:
            attrs = [["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", key]]}]]
            if goto:
                verdict = {"attrs": [["NFTA_VERDICT_CODE", NFT_GOTO], ["NFTA_VERDICT_CHAIN", goto]]}
                attrs.append(["NFTA_SET_ELEM_DATA", {"attrs": [["NFTA_DATA_VERDICT", verdict]]}])
            items.append({"attrs": attrs})
        msg["attrs"] = [
            ["NFTA_SET_ELEM_LIST_TABLE", TABLE],
            ["NFTA_SET_ELEM_LIST_SET", set_],
            ["NFTA_SET_ELEM_LIST_ELEMENTS", items],
        ]
        msg["header"]["type"] = (SUB << 8) | (NFT_MSG_NEWSETELEM if op == "add" else NFT_MSG_DELSETELEM)
        msg["header"]["flags"] = P_REQ | P_ACK | (P_CREATE if op == "add" else 0)
        return msg

    assert kind == "elem"
    key = key_ip_proto_port(svc_ip(n + 1), 6, PORT)
    body = (
        elem_msg("add", "service-ips", [(key, f"lb-{m}")]) if forward else elem_msg("del", "service-ips", [(key, None)])
    )
    begin, end = nfgen_msg(), nfgen_msg()
    for msg, t in ((begin, NFNL_MSG_BATCH_BEGIN), (end, NFNL_MSG_BATCH_END)):
        msg["res_id"] = SUB
        msg["header"]["type"] = t
        msg["header"]["flags"] = P_REQ
    nft.nlm_request_batch([begin, body, end])  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# the worker: runs inside the namespace, takes every timing


def _timed(fn, *a) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def _nft(args: list[str], budget: float, stdin: str | None = None) -> float | str:
    t = time.perf_counter()
    try:
        p = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return "over budget"
    dt = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"nft {' '.join(args)}: {p.stderr[:2000]}")
    return dt


def _pairs(apply, fwd, back, reps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Apply forward then back `reps` times; medians of each direction."""
    f, b = [], []
    for _ in range(reps):
        f.append(_timed(apply, fwd))
        b.append(_timed(apply, back))
    return statistics.median(f), statistics.median(b)


def worker(plan: dict) -> dict:
    layout, n, m, d = plan["layout"], plan["n"], plan["m"], Path(plan["dir"])
    budget = plan["budget"]
    res: dict = {"layout": layout, "services": n, "endpoints": m}

    def nft_file(path: Path) -> None:
        r = _nft(["-f", str(path)], budget)
        if isinstance(r, str):
            raise TimeoutError(r)

    # full load: one transaction through nft -f
    if plan.get("full_mode") == "netlink":
        # skeleton (maps, lb chains) by nft, every element in one netlink batch, base chains last
        t0 = time.perf_counter()
        nft_file(d / "skeleton.nft")
        t1 = time.perf_counter()
        b = NlBatch()
        nl_shared_elements(b, n, m)
        t2 = time.perf_counter()
        b.commit()
        t3 = time.perf_counter()
        nft_file(d / "base.nft")
        t4 = time.perf_counter()
        res["full"] = {
            "total": t4 - t0,
            "skeleton_nft": t1 - t0,
            "encode": t2 - t1,
            "netlink_commit": t3 - t2,
            "base_chains_nft": t4 - t3,
        }
    elif plan.get("full_mode") == "libnft":
        lib = LibNft()
        text = (d / "full.nft").read_text()
        t0 = time.perf_counter()
        rc, _o, err = lib.cmd(text)
        res["full"] = {"total": time.perf_counter() - t0}
        if rc:
            raise RuntimeError(err[:2000])
    else:
        r = _nft(["-f", str(d / "full.nft")], budget)
        res["full"] = {"total": r}
        if isinstance(r, str):
            return res
    if plan.get("full_only"):
        return res

    changes = json.loads((d / "changes.json").read_text())
    reps = plan["reps"]
    # 1. nft -f per sync
    for kind, (fwd, back) in changes.items():
        pf, pb = d / f"{kind}.fwd.nft", d / f"{kind}.back.nft"
        pf.write_text(fwd)
        pb.write_text(back)
        res[f"nft-f/{kind}"] = _pairs(nft_file, pf, pb, reps)
    # 2. libnftables in-process: one long-lived context, and a fresh one per call
    lib = LibNft()

    def lib_apply(text: str) -> None:
        rc, _o, err = lib.cmd(text)
        if rc:
            raise RuntimeError(err[:2000])

    def lib_fresh(text: str) -> None:
        c = LibNft()
        rc, _o, err = c.cmd(text)
        c.close()
        if rc:
            raise RuntimeError(err[:2000])

    for kind, (fwd, back) in changes.items():
        res[f"libnft/{kind}"] = _pairs(lib_apply, fwd, back, reps)
    res["libnft-fresh-ctx/elem"] = _pairs(lib_fresh, *changes["elem"], reps)
    # the same context twice in a row without a commit in between: is the cache reused?
    res["libnft/list-chains-twice"] = [_timed(lib.cmd, "list chains"), _timed(lib.cmd, "list chains")]
    lib.set_flag(LibNft.OUTPUT_ECHO, True)
    res["libnft-echo/elem"] = _pairs(lib_apply, *changes["elem"], reps)
    lib.set_flag(LibNft.OUTPUT_ECHO, False)
    if layout == "shared":

        def lib_json(text: str) -> None:
            rc, _o, err = lib.json_cmd(text)
            if rc:
                raise RuntimeError(err[:2000])

        res["libnft-json/elem"] = _pairs(lib_json, elem_json(True, n, m), elem_json(False, n, m), reps)
    # 3. hand-written netlink batches, and pyroute2's
    sock = NlBatch.open()

    def nl_apply(arg: tuple[str, bool]) -> None:
        b = NlBatch(sock)
        nl_shared_change(b, arg[0], arg[1], n, m)
        b.commit()

    kinds = ("elem", "endpoint", "service") if layout == "shared" else ("elem",)
    if layout != "shared":  # the elem change for these layouts targets lb-m: give it a chain to go to

        def nl_apply(arg: tuple[str, bool]) -> None:  # noqa: F811
            b = NlBatch(sock)
            key = key_ip_proto_port(svc_ip(n + 1), 6, PORT)
            if arg[1]:
                b.elements("add", TABLE, "service-ips", [(key, verdict_goto(svc_name(0)))])
            else:
                b.elements("del", TABLE, "service-ips", [(key, None)])
            b.commit()

    for kind in kinds:
        res[f"netlink/{kind}"] = _pairs(nl_apply, (kind, True), (kind, False), reps)
    if layout == "shared":
        from pyroute2.nftables.main import NFTables

        p2 = NFTables()
        res["pyroute2/elem"] = _pairs(lambda fw: pyroute2_shared_change(p2, "elem", fw, n, m), True, False, reps)
        p2.close()
    # 4. read-back and drift probes
    probes = {
        "nft list table": ["list", "table", "ip", TABLE],
        "nft -t list table": ["-t", "list", "table", "ip", TABLE],
        "nft list chains": ["list", "chains"],
        "nft list sets": ["list", "sets"],
        "nft list tables": ["list", "tables"],
        "nft list map service-ips": ["list", "map", "ip", TABLE, "service-ips"],
        "nft list chain nat-prerouting": ["list", "chain", "ip", TABLE, "nat-prerouting"],
        "nft -j list tables": ["-j", "list", "tables"],
    }
    for name, argv in probes.items():
        res[f"read/{name}"] = _nft(argv, budget)
    res["read/netlink genid"] = statistics.median(_timed(nl_genid, sock) for _ in range(reps))
    res["read/netlink table handle"] = statistics.median(_timed(nl_table, sock, TABLE) for _ in range(reps))
    res["read/netlink rules of nat-prerouting"] = statistics.median(
        _timed(nl_rule_count, sock, TABLE, "nat-prerouting") for _ in range(reps)
    )
    res["drift-probe-values"] = {
        "genid": nl_genid(sock),
        "table": nl_table(sock, TABLE),
        "nat-prerouting rules": nl_rule_count(sock, TABLE, "nat-prerouting"),
    }
    p = subprocess.run(["nft", "list", "chains"], capture_output=True, text=True)
    res["kernel chains (counted)"] = p.stdout.count("\tchain ")
    return res


# ------------------------------------------------------------------------------------------------
# the parent: namespaces, budgets, output


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_case(
    layout: str, n: int, m: int, budget: float, reps: int, full_mode: str = "nft", full_only: bool = False
) -> dict:
    with tempfile.TemporaryDirectory(prefix="nftif-") as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        full = render_full(layout, n, m)
        render_s = time.perf_counter() - t
        (d / "full.nft").write_text(full.text())
        if full_mode == "netlink":
            sk = Script()
            _skeleton(layout, sk, {m}, base_chains=False)
            (d / "skeleton.nft").write_text(sk.text())
            b = Script()
            _base_chains(b)
            (d / "base.nft").write_text(b.text())
        (d / "changes.json").write_text(json.dumps(change_scripts(layout, n, m)))
        plan = {"layout": layout, "n": n, "m": m, "dir": tmp, "budget": budget, "reps": reps}
        plan.update(full_mode=full_mode, full_only=full_only)
        (d / "plan.json").write_text(json.dumps(plan))
        with netns(f"nftif-{os.getpid()}") as ns:
            argv = ["ip", "netns", "exec", ns, sys.executable, __file__, "--worker", str(d / "plan.json")]
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=budget * 6)
            except subprocess.TimeoutExpired:
                return {"layout": layout, "services": n, "endpoints": m, "error": "worker over budget"}
        if p.returncode:
            return {"layout": layout, "services": n, "endpoints": m, "error": p.stderr[-3000:]}
        res = json.loads(p.stdout)
        res["render_s"] = render_s
        res["script_lines"] = len(full.lines)
        res["script_bytes"] = len(full.text())
        res["objects"] = full.counts.as_dict()
        res["full_mode"] = full_mode
        return res


def _ms(v: object) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # (forward, back) medians
        return " / ".join(_ms(x) for x in v)
    if v is None:
        return "-"
    x = float(v)  # type: ignore[arg-type]
    return f"{x:.2f} s" if x >= 1 else f"{x * 1000:.1f} ms" if x >= 0.001 else f"{x * 1e6:.0f} µs"


def markdown(paths: list[Path]) -> str:
    """The tables of docs/mode-nftables.md from the JSON lines the runs wrote."""
    cases = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    main_ = [c for c in cases if c.get("full_mode", "nft") == "nft" and "error" not in c]
    cols = [f"{c['layout']} {c['services']:,}×{c['endpoints']}" for c in main_]
    rows = sorted(
        {k for c in main_ for k in c if "/" in k and not k.startswith("drift")},
        key=lambda k: (k.split("/")[0] != "nft-f", k),
    )
    out = ["| measurement | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    objs = ["chains", "rules", "named_sets", "anon_sets", "elements"]
    for o in objs:
        out.append(f"| objects: {o} | " + " | ".join(f"{c['objects'][o]:,}" for c in main_) + " |")
    out.append("| full load, nft -f (one transaction) | " + " | ".join(_ms(c["full"]["total"]) for c in main_) + " |")
    for r in rows:
        out.append(f"| {r} | " + " | ".join(_ms(c.get(r)) for c in main_) + " |")
    nl = [c for c in cases if c.get("full_mode") == "netlink" and "error" not in c]
    if nl:
        out += [
            "",
            "| shared layout, full load in steps | "
            + " | ".join(f"{c['services']:,}×{c['endpoints']}" for c in nl)
            + " |",
        ]
        out.append("|---" * (len(nl) + 1) + "|")
        for k in ("skeleton_nft", "encode", "netlink_commit", "base_chains_nft", "total"):
            out.append(f"| {k} | " + " | ".join(_ms(c["full"][k]) for c in nl) + " |")
    errs = [c for c in cases if "error" in c]
    for c in errs:
        out.append(f"\n{c['layout']} {c['services']}×{c['endpoints']}: {c['error'][-300:]}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="+", default=["1000x10", "10000x10", "50000x5"])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--full-mode", default="nft", choices=("nft", "netlink", "libnft"))
    ap.add_argument("--full-only", action="store_true")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds allowed for one operation")
    ap.add_argument("--reps", type=int, default=REPEATS)
    ap.add_argument("--out", type=Path, help="append one JSON line per case here")
    ap.add_argument("--markdown", nargs="+", type=Path, help="print the tables for these JSON-lines files")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(a.markdown), end="")
        return
    if a.worker:
        print(json.dumps(worker(json.loads(Path(a.worker).read_text()))))
        return
    for size in a.sizes:
        n, m = (int(x) for x in size.split("x"))
        for layout in a.layouts:
            if a.full_mode == "netlink" and layout != "shared":
                continue
            res = run_case(layout, n, m, a.budget, a.reps, a.full_mode, a.full_only)
            line = json.dumps(res)
            print(line, flush=True)
            if a.out:
                with a.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
