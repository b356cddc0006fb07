"""Real sockets inside network namespaces: echo servers and probes that report who answered.

What this module guarantees:

- Sockets are created inside the named namespace (``/run/netns/<ns>``) by a short-lived thread
  that enters it with setns(2); a socket belongs to the namespace it was created in for its whole
  life, so it is then used from any thread. The calling thread never changes namespace.
- An `EchoServer` answers every TCP connection and every UDP datagram with one JSON line
  ``{"name": ..., "local": "ip:port it was reached on", "peer": "ip:port it saw"}`` (IPv6 as
  ``[ip]:port``). It needs no request bytes, tolerates them, and its `stop()` never hangs.
- A probe ends in exactly one `Outcome`: answered (the reply parsed into the result), refused
  (TCP RST or ICMP port unreachable; returned at once), unreachable (an ICMP error or a local
  policy refused the packet), reset (connected, then closed before a full reply), or timeout
  (nothing came back within the deadline). It never raises for what the network did.
- Every probe is a new flow for conntrack: a new TCP connection, or a new UDP socket whose
  source port comes from a rotating range (`UDP_SOURCE_PORTS`), so consecutive probes never
  reuse a recent UDP 4-tuple. `Sender` is the opposite: one fixed source port for every send.
- Nothing here resolves names: addresses are literals, so a namespace without DNS never hangs.

Why one module of ~820 lines: every probe and server shares the namespace-entering thread
helper, the ICMP error reading and the reply format; tests import them as one kit.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import json
import math
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import TypeVar

from kproxy.lab.namespaces import NETNS_DIR, NamespaceRef, ns_name

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# Not exported by Python 3.11's socket module; values from <linux/in.h> and <linux/in6.h>.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)

# UDP probes take their source port from here, in turn. It sits below the NodePort range
# (30000-32767) and the kernel's ephemeral range (32768-60999), so servers and connect() rarely
# compete for it; a port in use is skipped.
UDP_SOURCE_PORTS = range(20000, 30000)

_MAX_REPLY = 4096
_libc = ctypes.CDLL(None, use_errno=True)


# ----- entering a namespace


def call_in(ns: NamespaceRef, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread that has entered namespace `ns`; return or raise its outcome.

    Whatever `fn` creates there (sockets above all) stays in `ns` after the thread is gone.
    """
    name = ns_name(ns)
    path = os.path.join(NETNS_DIR, name)
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            _enter(path)
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=enter_and_call, name=f"netns:{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _enter(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such network namespace", path) from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns({path}): {os.strerror(code)}")
    finally:
        os.close(fd)


def socket_in(
    ns: NamespaceRef,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A new socket living in namespace `ns`."""
    return call_in(ns, lambda: socket.socket(family, type, proto))


# ----- addresses


def family_of(ip: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an address literal; ValueError for anything else."""
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def unspecified(family: socket.AddressFamily) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def format_endpoint(ip: str, port: int) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """The inverse of `format_endpoint`."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# ----- probe results


class Outcome(StrEnum):
    ANSWERED = "answered"
    REFUSED = "refused"  # TCP RST, or ICMP port unreachable (ECONNREFUSED)
    UNREACHABLE = "unreachable"  # EHOSTUNREACH, ENETUNREACH, EACCES (ICMPv6 prohibited), EPERM (local drop)
    RESET = "reset"  # connected, then reset or closed before a full reply line
    TIMEOUT = "timeout"


_UNREACHABLE_ERRNOS = {
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EACCES,  # ICMPv6 administratively prohibited
    errno.EPERM,  # a netfilter drop in this namespace's OUTPUT (UDP sees it at once)
    errno.EADDRNOTAVAIL,
    errno.EPROTO,  # other ICMP errors (parameter problem, fragmentation trouble)
}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """How one probe ended. For ANSWERED, `name`, `local` and `peer` come from the reply.

    `source` is the probe socket's own address as the prober saw it (empty if it never got one);
    compare it with `peer` to tell whether the server saw the real source or a masquerade.
    """

    outcome: Outcome
    name: str | None = None
    local: str | None = None
    peer: str | None = None
    source: str = ""
    detail: str = ""
    elapsed: float = 0.0

    @property
    def answered(self) -> bool:
        return self.outcome is Outcome.ANSWERED

    @property
    def local_ip(self) -> str | None:
        return parse_endpoint(self.local)[0] if self.local else None

    @property
    def local_port(self) -> int | None:
        return parse_endpoint(self.local)[1] if self.local else None

    @property
    def peer_ip(self) -> str | None:
        return parse_endpoint(self.peer)[0] if self.peer else None

    @property
    def peer_port(self) -> int | None:
        return parse_endpoint(self.peer)[1] if self.peer else None

    @property
    def key(self) -> str:
        """The server's name when answered, else the outcome's value: handy for counting."""
        return self.name if self.answered and self.name is not None else self.outcome.value

    def __str__(self) -> str:
        if self.answered:
            return f"answered by {self.name} at {self.local}, seen from {self.peer} (sent from {self.source})"
        return f"{self.outcome.value}{f' ({self.detail})' if self.detail else ''} after {self.elapsed:.3f}s"


class ProbeResults(list[ProbeResult]):
    """The results of `probe_many`, in order, with counting helpers."""

    def counts(self) -> Counter[str]:
        """How many probes each server answered, and how many ended otherwise (by outcome)."""
        return Counter(r.key for r in self)

    def names(self) -> set[str]:
        """The servers that answered at least once."""
        return {r.name for r in self if r.answered and r.name is not None}

    def outcomes(self) -> Counter[Outcome]:
        return Counter(r.outcome for r in self)


def _failed(code: int, started: float, source: str = "") -> ProbeResult:
    """The result for a probe that ended with errno `code`; anything else is a bug and raised."""
    outcome = _OUTCOME_BY_ERRNO.get(code)
    if outcome is None:
        raise OSError(code, os.strerror(code))
    detail = errno.errorcode.get(code, str(code))
    return ProbeResult(outcome, source=source, detail=detail, elapsed=time.monotonic() - started)


def _errno_of(exc: OSError) -> int:
    if isinstance(exc, TimeoutError):  # socket timeouts carry no errno
        return errno.ETIMEDOUT
    return exc.errno if exc.errno is not None else errno.EIO


_OUTCOME_BY_ERRNO = {
    errno.ETIMEDOUT: Outcome.TIMEOUT,
    errno.ECONNREFUSED: Outcome.REFUSED,
    errno.ECONNRESET: Outcome.RESET,
    errno.EPIPE: Outcome.RESET,
    errno.ECONNABORTED: Outcome.RESET,
    errno.ENODATA: Outcome.RESET,  # connected, then closed before a whole reply line
    **{code: Outcome.UNREACHABLE for code in _UNREACHABLE_ERRNOS},
}


def _answered(raw: bytes, started: float, source: str) -> ProbeResult:
    elapsed = time.monotonic() - started
    try:
        reply = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ProbeResult(Outcome.ANSWERED, source=source, detail=f"not JSON: {raw[:80]!r}", elapsed=elapsed)
    return ProbeResult(
        Outcome.ANSWERED,
        name=reply.get("name"),
        local=reply.get("local"),
        peer=reply.get("peer"),
        source=source,
        elapsed=elapsed,
    )


def _sockname(sock: socket.socket) -> str:
    try:
        ip, port = sock.getsockname()[:2]
    except OSError:
        return ""
    return format_endpoint(ip, port)


# ----- probes


def probe(
    ns: NamespaceRef,
    dst_ip: str,
    port: int,
    proto: str = "tcp",
    src_ip: str | None = None,
    timeout: float = 1.0,
) -> ProbeResult:
    """One new connection (TCP) or one datagram from a new socket (UDP) from `ns` to `dst_ip:port`.

    `src_ip` binds the source address (the port is still chosen fresh). The whole exchange,
    connect and reply, must finish within `timeout` seconds.
    """
    return call_in(ns, lambda: _probe_here(dst_ip, port, proto, src_ip, timeout))


def probe_many(
    ns: NamespaceRef,
    dst_ip: str,
    port: int,
    proto: str = "tcp",
    count: int = 20,
    src_ip: str | None = None,
    timeout: float = 1.0,
) -> ProbeResults:
    """`count` probes one after the other, each a new flow; see `probe`."""

    def run_all() -> ProbeResults:
        return ProbeResults(_probe_here(dst_ip, port, proto, src_ip, timeout) for _ in range(count))

    return call_in(ns, run_all)


def _probe_here(dst_ip: str, port: int, proto: str, src_ip: str | None, timeout: float) -> ProbeResult:
    if proto == "tcp":
        return _probe_tcp(dst_ip, port, src_ip, timeout)
    if proto == "udp":
        return _probe_udp(dst_ip, port, src_ip, timeout)
    raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")


def _report_icmp_errors(sock: socket.socket, family: socket.AddressFamily) -> None:
    """Have every ICMP error reach the socket, not only the ones the kernel deems fatal.

    Without this a connected UDP socket ignores "network/host unreachable", and a TCP socket
    whose SYN is answered by an ICMP error while connect() still holds the socket lock (which
    is the rule between namespaces on one host: the error comes back within the same softirq)
    keeps only a "soft" error and retries until it times out. With it the error is also queued
    on the socket's error queue, which `_queued_icmp_error` reads.
    """
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def _queued_icmp_error(sock: socket.socket) -> int:
    """The errno of the first ICMP error queued on `sock` (0 if none); empties the queue.

    `sock` must be non-blocking: the error queue never makes a socket readable, so Python's
    wait for readability on a socket with a timeout would wait in vain.
    """
    first = 0
    while True:
        try:
            _, ancdata, _, _ = sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            return first
        for level, kind, data in ancdata:
            # struct sock_extended_err starts with the errno as a u32.
            if (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                first = first or struct.unpack_from("=I", data)[0]


def _probe_tcp(dst_ip: str, port: int, src_ip: str | None, timeout: float) -> ProbeResult:
    started = time.monotonic()
    deadline = started + timeout
    family = family_of(dst_ip)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        _report_icmp_errors(sock, family)
        if src_ip is not None:
            # Defer the port choice to connect(), which picks one free for this 4-tuple.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src_ip, 0))
        sock.setblocking(False)
        code = sock.connect_ex((dst_ip, port))
        if code == errno.EINPROGRESS:
            code = _wait_connected(sock, deadline)
        if code:
            return _failed(code, started)
        source = _sockname(sock)
        try:
            raw = _read_line(sock, deadline)
        except OSError as exc:
            return _failed(_errno_of(exc), started, source)
        if not raw.endswith(b"\n"):
            return _failed(errno.ENODATA, started, source)
        return _answered(raw, started, source)


def _wait_connected(sock: socket.socket, deadline: float) -> int:
    """0 once `sock` is connected, else the errno that ended the attempt (ETIMEDOUT at deadline)."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)  # POLLERR and POLLHUP are always reported
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
            return errno.ETIMEDOUT
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or _queued_icmp_error(sock)
        if code:
            return code
        try:
            sock.getpeername()
        except OSError:
            continue  # woken by something else; still connecting
        return 0


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """Bytes up to and including the first newline, or whatever came before EOF."""
    data = b""
    while b"\n" not in data and len(data) < _MAX_REPLY:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "no reply line in time")
        sock.settimeout(remaining)
        chunk = sock.recv(_MAX_REPLY)
        if not chunk:
            break
        data += chunk
    return data[: data.index(b"\n") + 1] if b"\n" in data else data


def _probe_udp(dst_ip: str, port: int, src_ip: str | None, timeout: float) -> ProbeResult:
    started = time.monotonic()
    family = family_of(dst_ip)
    with _udp_socket_on_fresh_port(family, src_ip) as sock:
        _report_icmp_errors(sock, family)
        source = _sockname(sock)
        try:
            # Connected, so ICMP errors surface on recv, and only replies from the address we
            # sent to (the Service IP after un-DNAT, not the pod behind it) count.
            sock.connect((dst_ip, port))
            source = _sockname(sock)
            sock.send(b"probe\n")
            sock.settimeout(timeout)
            raw = sock.recv(_MAX_REPLY)
        except OSError as exc:
            return _failed(_errno_of(exc), started, source)
        return _answered(raw, started, source)


_udp_port_cursor = itertools.cycle(UDP_SOURCE_PORTS)
_udp_port_lock = threading.Lock()


def _udp_socket_on_fresh_port(family: socket.AddressFamily, src_ip: str | None) -> socket.socket:
    """A UDP socket bound to the next free port of `UDP_SOURCE_PORTS` (kernel's choice if none)."""
    address = src_ip if src_ip is not None else unspecified(family)
    for _ in range(len(UDP_SOURCE_PORTS)):
        with _udp_port_lock:
            candidate = next(_udp_port_cursor)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((address, candidate))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    return sock


# ----- a stream of new connections


class ProbeStream:
    """New TCP connections from `ns` to dst:port, one every `interval` seconds on a thread, until
    the `with` block ends: what a client sees while the proxy restarts or changes mode.
    `results` grows as they finish (read its length to wait for progress).

    The pace matters. The echo servers close first, so each connection leaves a TIME_WAIT socket
    in the pod. Back to back (hundreds a second) a new connection's masqueraded source meets one
    of them, the pod refuses the SYN and the client retransmits it a second later, or times out:
    lost connections that no proxy rule caused (TcpExtTCPSynRetrans on the client and
    TcpExtPAWSTimewait in the pod show them; with rules that never change they still happen).
    At 20 a second per stream none were seen in thousands.
    """

    def __init__(self, ns: NamespaceRef, dst_ip: str, port: int, timeout: float = 2.0, interval: float = 0.05) -> None:
        self.results: list[ProbeResult] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ns, dst_ip, port, timeout, interval), name=f"stream:{dst_ip}", daemon=True
        )

    def _run(self, ns: NamespaceRef, dst_ip: str, port: int, timeout: float, interval: float) -> None:
        while not self._stop.is_set():
            self.results.append(probe(ns, dst_ip, port, timeout=timeout))
            self._stop.wait(interval)

    def failed(self) -> list[str]:
        return [str(r) for r in self.results if not r.answered]

    def __enter__(self) -> ProbeStream:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("probe stream did not stop")


# ----- a UDP sender with a fixed source


class Sender:
    """UDP from one fixed source address and port to one destination, for conntrack tests.

    Every `send()` goes out on the same socket, so conntrack sees one flow for as long as its
    entry lives; each reports who answered. A stale reply or error left over from an earlier
    send is discarded first, so a result always belongs to its own datagram. With `src_port`
    0 the kernel picks the port once; `source` tells which. SO_REUSEADDR lets a new `Sender`
    take the same source port again right after the previous one closed.
    """

    def __init__(
        self,
        ns: NamespaceRef,
        dst_ip: str,
        port: int,
        src_ip: str | None = None,
        src_port: int = 0,
    ) -> None:
        self.ns = ns_name(ns)
        self.destination = (dst_ip, port)
        family = family_of(dst_ip)
        self._sock = socket_in(self.ns, family, socket.SOCK_DGRAM)
        try:
            _report_icmp_errors(self._sock, family)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((src_ip if src_ip is not None else unspecified(family), src_port))
            self._sock.connect(self.destination)
        except BaseException:
            self._sock.close()
            raise
        ip, bound_port = self._sock.getsockname()[:2]
        self.source: tuple[str, int] = (ip, bound_port)

    def send(self, timeout: float = 1.0, payload: bytes = b"probe\n") -> ProbeResult:
        started = time.monotonic()
        source = format_endpoint(*self.source)
        self._discard_pending()
        try:
            self._sock.send(payload)
            self._sock.settimeout(timeout)
            raw = self._sock.recv(_MAX_REPLY)
        except OSError as exc:
            return _failed(_errno_of(exc), started, source)
        return _answered(raw, started, source)

    def _discard_pending(self) -> None:
        self._sock.setblocking(False)
        try:
            _queued_icmp_error(self._sock)
            while True:
                try:
                    self._sock.recv(_MAX_REPLY)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno not in _OUTCOME_BY_ERRNO:
                        raise
                    # a pending ICMP error, now consumed
        finally:
            self._sock.setblocking(True)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ----- echo server


@dataclass(frozen=True, slots=True)
class Hit:
    """One request an echo server answered."""

    proto: str
    local: str
    peer: str


@dataclass(slots=True)
class _Listener:
    sock: socket.socket
    proto: str
    family: socket.AddressFamily
    bound_ip: str


@dataclass(slots=True)
class _ServerState:
    hits: list[Hit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class EchoServer:
    """TCP and/or UDP servers in namespace `ns` that answer who they are and who asked.

    `ips` are the addresses to bind; by default the unspecified address of both families
    (``0.0.0.0`` and ``::`` with IPV6_V6ONLY). ``ips=["127.0.0.1"]`` on a node makes a
    server reachable on the node's loopback only. `proto` is ``"tcp"``, ``"udp"`` or
    ``"both"``. `port` 0 takes a free port, the same for every socket; read it from `port`.
    `name` defaults to the host's name when `ns` is a lab host, else to the namespace name.

    One thread serves every socket; `stop()` wakes it, joins it and closes the sockets.
    """

    def __init__(
        self,
        ns: NamespaceRef,
        port: int,
        proto: str = "tcp",
        name: str | None = None,
        ips: Sequence[str] | None = None,
    ) -> None:
        if proto not in ("tcp", "udp", "both"):
            raise ValueError(f"proto must be 'tcp', 'udp' or 'both', not {proto!r}")
        self.ns = ns_name(ns)
        self.name = name if name is not None else str(getattr(ns, "name", self.ns))
        self.port = port
        self.protos: tuple[str, ...] = ("tcp", "udp") if proto == "both" else (proto,)
        self.ips: tuple[str, ...] = tuple(ips) if ips else ("0.0.0.0", "::")
        self._listeners: list[_Listener] = []
        self._state = _ServerState()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    @property
    def hits(self) -> list[Hit]:
        """The requests answered so far (a copy)."""
        with self._state.lock:
            return list(self._state.hits)

    @property
    def errors(self) -> list[str]:
        """Unexpected errors the serving thread met (a copy); empty in a healthy test."""
        with self._state.lock:
            return list(self._state.errors)

    def start(self) -> EchoServer:
        if self._thread is not None:
            raise RuntimeError(f"echo server {self.name} already started")
        try:
            self._listeners = call_in(self.ns, self._open_listeners)
            self._wake_r, self._wake_w = os.pipe()
            self._thread = threading.Thread(target=self._serve, name=f"echo:{self.name}", daemon=True)
            self._thread.start()
        except BaseException:
            self._close_all()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; idempotent. Raises if the thread did not end within `timeout`."""
        thread, self._thread = self._thread, None
        if thread is not None:
            os.write(self._wake_w, b"x")
            thread.join(timeout)
        self._close_all()
        if thread is not None and thread.is_alive():
            raise RuntimeError(f"echo server {self.name} did not stop within {timeout}s")

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EchoServer({self.name!r}, ns={self.ns!r}, port={self.port}, protos={self.protos})"

    # -- setting up (runs inside the namespace)

    def _open_listeners(self) -> list[_Listener]:
        opened: list[_Listener] = []
        try:
            for proto, ip in itertools.product(self.protos, self.ips):
                opened.append(self._open_one(proto, ip))
                if self.port == 0:
                    self.port = opened[0].sock.getsockname()[1]
        except BaseException:
            for listener in opened:
                listener.sock.close()
            raise
        return opened

    def _open_one(self, proto: str, ip: str) -> _Listener:
        family = family_of(ip)
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if proto == "udp":
                # The destination of each datagram, so the reply names it and leaves from it.
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((ip, self.port))
            if proto == "tcp":
                sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return _Listener(sock, proto, family, ip)

    def _close_all(self) -> None:
        for listener in self._listeners:
            listener.sock.close()
        self._listeners = []
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r, self._wake_w = -1, -1

    # -- serving (runs on the server's thread)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, None)
            for listener in self._listeners:
                selector.register(listener.sock, selectors.EVENT_READ, listener)
            while True:
                for key, _ in selector.select():
                    if key.data is None:
                        return
                    self._handle(key.data)

    def _handle(self, listener: _Listener) -> None:
        try:
            if listener.proto == "tcp":
                self._answer_tcp(listener)
            else:
                self._answer_udp(listener)
        except (BlockingIOError, InterruptedError):
            pass  # another wake-up took it, or the client gave up already
        except Exception as exc:  # noqa: BLE001 - kept for the test to see; serving goes on
            with self._state.lock:
                self._state.errors.append(f"{listener.proto} {listener.bound_ip}: {exc!r}")

    def _reply(self, proto: str, local: str, peer: str) -> bytes:
        with self._state.lock:
            self._state.hits.append(Hit(proto, local, peer))
        return (json.dumps({"name": self.name, "local": local, "peer": peer}) + "\n").encode()

    def _answer_tcp(self, listener: _Listener) -> None:
        conn, peer_addr = listener.sock.accept()
        with conn:
            local = _sockname(conn)
            conn.settimeout(1.0)
            conn.sendall(self._reply("tcp", local, format_endpoint(*peer_addr[:2])))
            conn.shutdown(socket.SHUT_WR)
            _drain(conn)

    def _answer_udp(self, listener: _Listener) -> None:
        ancillary = socket.CMSG_SPACE(20 if listener.family == socket.AF_INET6 else 12)
        _, cmsgs, _, peer_addr = listener.sock.recvmsg(_MAX_REPLY, ancillary)
        local_ip = _destination_of(cmsgs, listener)
        reply = self._reply("udp", format_endpoint(local_ip, self.port), format_endpoint(*peer_addr[:2]))
        listener.sock.sendmsg([reply], [_source_cmsg(local_ip, listener.family)], 0, peer_addr)


def _drain(conn: socket.socket) -> None:
    """Read what the client already sent, so that close() sends FIN rather than RST."""
    conn.setblocking(False)
    try:
        while conn.recv(_MAX_REPLY):
            pass
    except OSError:
        pass


def _destination_of(cmsgs: Iterable[tuple[int, int, bytes]], listener: _Listener) -> str:
    for level, kind, data in cmsgs:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }: addr is
            # the header's destination.
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return listener.bound_ip


def _source_cmsg(local_ip: str, family: socket.AddressFamily) -> tuple[int, int, bytes]:
    """Ancillary data making a reply leave from the address the request was sent to."""
    address = socket.inet_pton(family, local_ip)
    if family == socket.AF_INET6:
        return (socket.IPPROTO_IPV6, IPV6_PKTINFO, address + struct.pack("I", 0))
    # struct in_pktinfo: ifindex 0 (routing decides), spec_dst = our address, addr unused.
    return (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("I", 0) + address + bytes(4))


# ----- waiting


def wait_for(
    condition: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll `condition` until it returns something truthy, and return that; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)
