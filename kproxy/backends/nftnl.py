"""Cheap read-backs of one nftables table over netlink, for drift checks (no `nft` process).

`nft list ...` builds a cache of the whole ruleset before it prints even one chain (set elements
included), so a drift check through it costs as much as listing the table. The kernel answers
narrower questions directly:

- the ruleset generation (NFT_MSG_GETGEN): it moves on every committed transaction in this
  network namespace, by anyone; unchanged since our own commit means nothing at all changed;
- the table's handle (a deleted and recreated table has a new one), or its absence;
- how many rules each chain of the table holds (one rule dump, filtered to the table by the
  kernel; the rules' expressions are not decoded);
- how many elements a set or map holds (one element dump of that set).

Only the counts are compared (by the proxier, against what it committed): a chain flushed, a
rule added or deleted, a map flushed or an element deleted shows; a rule edited in place does
not, which is the price of not reading the rules back.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kproxy.errors import BackendError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE = 1
NFT_MSG_GETRULE = 7
NFT_MSG_GETSETELEM = 13
NFT_MSG_GETGEN = 16
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF
FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}
SET_ELEM_INTERVAL_END = 0x1  # NFT_SET_ELEM_INTERVAL_END: the closing half of an interval


@dataclass(frozen=True)
class TableProbe:
    """What the kernel holds of one table: None handle when there is no such table."""

    generation: int
    handle: int | None
    rules: dict[str, int]  # chain -> rules in it; chains without rules are absent
    elements: dict[str, int]  # set or map -> elements in it (-1: no such set)


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _name(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _attrs(body: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, body[offset + 4 : offset + length]
        offset += (length + 3) & ~3


class NftNetlink:
    """One netlink socket of the calling thread's network namespace; `close` it when done."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.bind((0, 0))
        except OSError as e:
            raise BackendError(f"cannot open a netfilter netlink socket: {e}") from e
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _request(self, mtype: int, family: int, body: bytes, dump: bool) -> list[bytes]:
        """The replies' payloads after the nfgenmsg header; FileNotFoundError when the kernel
        says ENOENT (no such table, chain or set)."""
        self._seq += 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        payload = struct.pack("=BBH", family, 0, 0) + body
        header = struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | mtype, flags, self._seq, 0)
        self._sock.send(header + payload)
        out: list[bytes] = []
        while True:
            buf = self._sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(buf):
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", buf, offset)
                message = buf[offset + 16 : offset + length]
                offset += (length + 3) & ~3
                if seq != self._seq:
                    continue  # a late reply to an earlier request
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", message)
                    if err == 0:
                        return out
                    raise OSError(-err, os.strerror(-err))
                out.append(message[4:])
                if not dump:
                    return out

    def generation(self) -> int:
        try:
            (body,) = self._request(NFT_MSG_GETGEN, socket.AF_UNSPEC, b"", dump=False)
        except OSError as e:
            raise BackendError(f"cannot read the nftables generation: {e}") from e
        return int(struct.unpack("!I", dict(_attrs(body))[1])[0])

    def probe(self, family: str, table: str, sets: Iterable[str]) -> TableProbe:
        """The generation, then the table's handle, rule counts and the named sets' element
        counts. The generation is read first: a change after it shows at the next probe."""
        af = FAMILIES[family]
        generation = self.generation()
        try:
            handle = self._handle(af, table)
            if handle is None:
                return TableProbe(generation, None, {}, {})
            return TableProbe(
                generation, handle, self._rules(af, table), {s: self._elements(af, table, s) for s in sets}
            )
        except OSError as e:
            raise BackendError(f"cannot read table {family} {table} back: {e}") from e

    def _handle(self, af: int, table: str) -> int | None:
        try:
            (body,) = self._request(NFT_MSG_GETTABLE, af, _name(1, table), dump=False)
        except FileNotFoundError:
            return None
        return int(struct.unpack("!Q", dict(_attrs(body))[4])[0])  # NFTA_TABLE_HANDLE

    def _rules(self, af: int, table: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        try:
            replies = self._request(NFT_MSG_GETRULE, af, _name(1, table), dump=True)  # NFTA_RULE_TABLE
        except FileNotFoundError:
            return counts
        for body in replies:
            chain = dict(_attrs(body)).get(2, b"").rstrip(b"\0").decode()  # NFTA_RULE_CHAIN
            counts[chain] = counts.get(chain, 0) + 1
        return counts

    def _elements(self, af: int, table: str, name: str) -> int:
        try:
            # NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET
            replies = self._request(NFT_MSG_GETSETELEM, af, _name(1, table) + _name(2, name), dump=True)
        except FileNotFoundError:
            return -1
        count = 0
        for body in replies:
            for kind, nested in _attrs(body):
                if kind != 3:  # NFTA_SET_ELEM_LIST_ELEMENTS
                    continue
                for _kind, element in _attrs(nested):
                    flags = dict(_attrs(element)).get(3)  # NFTA_SET_ELEM_FLAGS
                    if flags is None or not struct.unpack("!I", flags)[0] & SET_ELEM_INTERVAL_END:
                        count += 1
        return count
