"""Test support for tests/vm: tests that need IPVS, run inside the virtme-ng guest.

What this module guarantees:
- Every test under tests/vm carries the ``vm`` marker (added if missing), so ``-m vm`` selects
  them all and a forgotten marker cannot make one run on the host.
- Outside the VM (``KPROXY_IN_VM`` unset: a plain ``pytest tests`` on the host) every ``vm`` test
  is skipped, with a reason saying how to run it. The host kernel is not touched (no modprobe).
- Inside the VM (``KPROXY_IN_VM=1``, set by tests/vm/run_in_vm.sh), a kernel that cannot load
  ip_vs makes every ``vm`` test *fail*: the runner asked for them, a skip would hide a broken VM.
- Namespaces from ``make_netns``/``lab`` and servers from ``echo_server`` are removed after the
  test, whatever happened; IPVS services, devices and addresses die with their namespace.

Test modules reach these helpers through fixtures only: several test directories have a
conftest.py, so ``from conftest import ...`` would get whichever one was imported last.

Namespaces are entered per thread (``Netns.entered``: setns(2) moves only the calling thread).
A socket belongs to the namespace it was created in for its whole life, so sockets and servers
are placed without subprocesses. pyroute2 handles are different: ``IPRoute``/``IPVS`` open one
netlink socket per *thread that uses them*, in that thread's namespace at first use. Create and
use a handle in the same thread (``Netns.iproute()``/``Netns.ipvs()``), as STYLE.md asks anyway.

Everything is built over netlink and /proc rather than with ``ip``: under TCG (no KVM) each
exec costs 0.1-0.3 s, a pyroute2 call a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPVS, IPRoute

IN_VM_ENV = "KPROXY_IN_VM"
HOW_TO_RUN = "tests/vm/run_in_vm.sh (make test-vm)"
IO_TIMEOUT = 10.0  # seconds a connect/recv may block before the test fails (never a sleep)
_CLONE_NEWNET = 0x40000000
_RT_SCOPE_LINK = 253
_VM_DIR = Path(__file__).parent.resolve()


def in_vm() -> bool:
    return os.environ.get(IN_VM_ENV) == "1"


# --- selection: skip on the host, fail in a VM without IPVS --------------------------------------


def _ipvs_present() -> bool:
    # ip_vs creates /proc/net/ip_vs in every namespace, loaded as a module or built in.
    return Path("/proc/net/ip_vs").exists()


def _ipvs_unavailable_reason() -> str | None:
    """Why IPVS is unusable in this (guest) kernel, or None. Loads ip_vs if needed."""
    if _ipvs_present():
        return None
    try:
        done = subprocess.run(["modprobe", "ip_vs"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"{IN_VM_ENV}=1 but there is no modprobe to load ip_vs"
    if _ipvs_present():
        return None
    return f"{IN_VM_ENV}=1 but ip_vs cannot be loaded: {done.stderr.strip() or 'no /proc/net/ip_vs'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _VM_DIR in Path(str(item.path)).resolve().parents and item.get_closest_marker("vm") is None:
            item.add_marker(pytest.mark.vm)
    if in_vm():
        return
    skip = pytest.mark.skip(reason=f"needs IPVS in the kproxy VM ({IN_VM_ENV} unset): run {HOW_TO_RUN}")
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip)


_ipvs_reason: list[str | None] = []  # computed once, at the first vm test


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not in_vm() or item.get_closest_marker("vm") is None:
        return
    if not _ipvs_reason:
        _ipvs_reason.append(_ipvs_unavailable_reason())
    if _ipvs_reason[0] is not None:
        pytest.fail(_ipvs_reason[0], pytrace=False)


# --- commands ------------------------------------------------------------------------------------


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises with argv, exit status and both outputs."""
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        )
    return done


# --- network namespaces --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns exists only from Python 3.12; kproxy supports 3.11.
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace, and back afterwards."""
        with open("/proc/thread-self/ns/net") as home, open(self.path) as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in this namespace (``ip netns exec``, which also remounts /sys)."""
        return run("ip", "netns", "exec", self.name, *argv, check=check)

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        with self.entered():
            return socket.socket(family, type, proto)

    @contextlib.contextmanager
    def iproute(self) -> Iterator[IPRoute]:
        """An ``IPRoute`` in this namespace, for use in the calling thread only."""
        with self.entered():
            ipr = IPRoute()  # the constructor opens this thread's netlink socket, here
        with contextlib.closing(ipr):
            yield ipr

    @contextlib.contextmanager
    def ipvs(self) -> Iterator[IPVS]:
        """An ``IPVS`` handle in this namespace, for use in the calling thread only."""
        with self.entered():
            ipvs = IPVS()  # opens the socket and resolves the "IPVS" genl family, here
        with contextlib.closing(ipvs):
            yield ipvs

    def sysctl(self, key: str, value: str | None = None) -> str:
        """Read, or set then read, a sysctl as this namespace sees it (net.* are per namespace;
        /proc/sys/net follows the namespace of the thread that opens the file)."""
        path = Path("/proc/sys", *key.split("."))
        with self.entered():
            if value is not None:
                path.write_text(value)
            return path.read_text().strip()

    def veth(self, name: str, peer: Netns, peer_name: str) -> None:
        """A veth pair from this namespace to ``peer``, both ends up."""
        with self.iproute() as ipr:
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer_name, "net_ns_fd": peer.path})
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        with peer.iproute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=peer_name)[0], state="up")


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], Netns]]:
    """Factory: ``make_netns("node")`` creates the namespace (loopback up); teardown deletes it."""
    created: list[Netns] = []

    def make(name: str) -> Netns:
        run("ip", "netns", "add", name)  # also creates /run/netns, shared-mounted, on first use
        ns = Netns(name)
        created.append(ns)
        with ns.iproute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return ns

    yield make
    failed = [done for ns in reversed(created) if (done := run("ip", "netns", "del", ns.name, check=False)).returncode]
    assert not failed, f"could not delete namespaces: {[done.stderr for done in failed]}"


# --- the shared topology (DESIGN.md test IP plan) ------------------------------------------------


@dataclass(frozen=True)
class Lab:
    """client ──eth0── node ──vethpod── pod, routed, with forwarding on in the node.

    The external client 203.0.113.10/32 reaches the node's 192.168.0.2 through on-link routes; the
    pod is 10.0.1.10/24 behind the node's 10.0.1.1. Nothing kproxy creates (dummy device, IPVS,
    rules) is here: tests add that by hand or by running kproxy in ``node``.
    """

    node: Netns
    pod: Netns
    client: Netns
    node_ip: str = "192.168.0.2"
    pod_gateway: str = "10.0.1.1"
    pod_ip: str = "10.0.1.10"
    client_ip: str = "203.0.113.10"


@pytest.fixture
def lab(make_netns: Callable[[str], Netns]) -> Lab:
    lab = Lab(node=make_netns("node"), pod=make_netns("pod"), client=make_netns("client"))
    lab.node.veth("eth0", lab.client, "eth0")
    lab.node.veth("vethpod", lab.pod, "eth0")
    with lab.node.iproute() as ipr:
        (eth0,) = ipr.link_lookup(ifname="eth0")
        (vethpod,) = ipr.link_lookup(ifname="vethpod")
        ipr.addr("add", index=eth0, address=lab.node_ip, prefixlen=24)
        ipr.route("add", dst=f"{lab.client_ip}/32", oif=eth0, scope=_RT_SCOPE_LINK)
        ipr.addr("add", index=vethpod, address=lab.pod_gateway, prefixlen=24)
    with lab.client.iproute() as ipr:
        (eth0,) = ipr.link_lookup(ifname="eth0")
        ipr.addr("add", index=eth0, address=lab.client_ip, prefixlen=32)
        ipr.route("add", dst=f"{lab.node_ip}/32", oif=eth0, scope=_RT_SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=lab.node_ip)
    with lab.pod.iproute() as ipr:
        (eth0,) = ipr.link_lookup(ifname="eth0")
        ipr.addr("add", index=eth0, address=lab.pod_ip, prefixlen=24)
        ipr.route("add", dst="0.0.0.0/0", gateway=lab.pod_gateway)
    lab.node.sysctl("net.ipv4.ip_forward", "1")
    return lab


# --- real traffic --------------------------------------------------------------------------------


def _recv_until(conn: socket.socket, end: bytes = b"") -> bytes:
    """Read until ``end`` (a line terminator) or, with no ``end``, until the peer closes."""
    data = b""
    while not (end and data.endswith(end)) and (chunk := conn.recv(65536)):
        data += chunk
    return data


class EchoServer:
    """Reads one line per connection, answers ``b"<peer ip> <the line>"`` and closes, so tests
    see the payload and the source address the server saw (NAT or not). A line, not a
    half-close, ends a request: SCTP has no half-closed state.

    The socket listens before the constructor returns, so clients may connect at once. stop()
    wakes the thread through a socketpair: shutdown() of a listener wakes accept() for TCP but
    not for SCTP.
    """

    def __init__(self, ns: Netns, port: int, proto: int = socket.IPPROTO_TCP, host: str = "0.0.0.0"):
        self.peers: list[str] = []
        self.errors: list[BaseException] = []
        self._listener = ns.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(64)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"echo-{ns.name}-{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while all(key.fileobj is self._listener for key, _ in sel.select()):
                try:
                    conn, (peer, *_) = self._listener.accept()
                    with conn:
                        conn.settimeout(IO_TIMEOUT)
                        line = _recv_until(conn, b"\n")
                        self.peers.append(peer)
                        conn.sendall(peer.encode() + b" " + line)
                except OSError as exc:  # raised again by stop(), never swallowed
                    self.errors.append(exc)

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(IO_TIMEOUT)
        alive = self._thread.is_alive()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        assert not alive, "echo server thread did not stop"
        if self.errors:
            raise AssertionError(f"echo server failed: {self.errors!r}") from self.errors[0]


@pytest.fixture
def echo_server() -> Iterator[Callable[..., EchoServer]]:
    """Factory: ``echo_server(lab.pod, 8080[, proto, host])``; teardown stops every server."""
    servers: list[EchoServer] = []

    def start(ns: Netns, port: int, proto: int = socket.IPPROTO_TCP, host: str = "0.0.0.0") -> EchoServer:
        server = EchoServer(ns, port, proto, host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def request(ns: Netns, ip: str, port: int, payload: bytes, proto: int = socket.IPPROTO_TCP) -> bytes:
    """Connect from ``ns`` to ip:port, send one line, return the whole answer."""
    assert b"\n" not in payload, "the payload is one line"
    with ns.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as conn:
        conn.settimeout(IO_TIMEOUT)
        conn.connect((ip, port))
        conn.sendall(payload + b"\n")
        return _recv_until(conn)


@pytest.fixture
def send() -> Callable[..., bytes]:
    """``send(ns, ip, port, payload[, proto])`` → the server's answer (see ``request``)."""
    return request
