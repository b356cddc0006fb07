"""A multi-node cluster made of network namespaces, for the demo and the kernel tests.

What a `Lab` guarantees once `up()` returns:

- Every host (node, pod, client) is its own network namespace with the project's shared IP plan,
  IPv4 and IPv6 side by side, and the first packet to any address goes through: duplicate
  address detection is off, every address has joined its solicited-node group, every interface
  can send (the kernel's linkwatch has run) and every bridge port is forwarding.
- Plain routing works with no kproxy rules at all: client → pod, pod → pod across nodes,
  node → pod, and the replies find their way back with the real source addresses.
- Every namespace behaves the same whatever the host's defaults: rp_filter off, no ICMP
  redirects, no rate limit on ICMP errors (so a REJECT answers every probe, not the first six).
- Nothing changes in the namespace the lab is run from, apart from the namespace names under
  /run/netns: ``{prefix}-lan``, ``{prefix}-node{i}``, ``{prefix}-pod{i}{letter}`` and
  ``{prefix}-client{k}``. Every interface is created directly inside one of them
  (``ip link add ... netns``), so interface names never collide between labs and stay short.
- `up()` first removes whatever an earlier run with the same prefix left behind; a failing
  `up()` removes what it built before raising; `down()` removes every namespace of the prefix.

The topology, for ``Lab(prefix="kp", nodes=2, pods_per_node=2, clients=1)``::

    kp-client1 eth0 ─┐                  kp-lan: bridge br0 (no addresses, no netfilter)
    kp-node1   eth0 ─┼─ br0             kp-nodeI: eth0 192.168.0.(1+I), bridge cbr0 10.0.I.1
    kp-node2   eth0 ─┘                  kp-podIx: eth0 10.0.I.(10+j) on cbr0 of node I

Namespaces are driven with iproute2 (``ip -n NS -batch -``, one process per namespace and
step, steps run in parallel across namespaces), so a lab comes up in well under a second.

Why one module of ~700 lines: building the lab is one ordered transaction (namespaces, links,
addresses, sysctls, readiness checks) whose steps share the address plan; the sockets and probes
that run inside it are in kproxy/testing/netns.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import string
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Protocol

from kproxy.errors import KproxyError

NETNS_DIR = "/run/netns"

# The shared test IP plan. Node i, pod j (1-based) and client k are placed by these formulas.
LAN_V4 = "192.168.0.{n}"
LAN_V6 = "fd00:192:168::{n}"
LAN_V4_PREFIXLEN = 24
LAN_V6_PREFIXLEN = 64
CLIENT_NET_V4 = "203.0.113.0/24"
CLIENT_NET_V6 = "2001:db8:203::/64"

MAX_NODES = 89  # node LAN addresses 192.168.0.2-90 stay below the clients' .101 and up
MAX_PODS_PER_NODE = 26  # one letter per pod
MAX_CLIENTS = 25  # 203.0.113.(10k+1) and .(200+k) must stay within the /24

_READY_TIMEOUT = 10.0
_COMMAND_TIMEOUT = 60.0


class LabError(KproxyError):
    """The lab could not be built or a command inside it failed."""


class LabCommandError(LabError, subprocess.CalledProcessError):
    """A command run in a lab namespace exited non-zero; the message carries its stderr.

    It is also a `subprocess.CalledProcessError`, so callers used to `check=True` catch it as such.
    """

    def __init__(self, ns: str, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, list(argv), stdout, stderr)
        self.ns = ns

    def __str__(self) -> str:
        command = " ".join(self.cmd)
        return f"in netns {self.ns}: {command!r} exited {self.returncode}: {(self.stderr or '').strip()}"


class HasNamespace(Protocol):
    """Anything that names a network namespace: a lab host, or a plain object with `ns`."""

    @property
    def ns(self) -> str: ...


NamespaceRef = str | HasNamespace


def ns_name(ref: NamespaceRef) -> str:
    """The namespace name of `ref`, which is a name already or a host describing one."""
    return ref if isinstance(ref, str) else ref.ns


@dataclass(frozen=True, slots=True)
class Node:
    """A node: its LAN interface eth0 and the bridge cbr0 that its pods hang off."""

    index: int
    name: str  # the Kubernetes node name, node-{index}
    ns: str
    ipv4: str  # eth0, on the LAN
    ipv6: str
    gateway_v4: str  # cbr0, the pods' default gateway
    gateway_v6: str
    pod_cidr_v4: str
    pod_cidr_v6: str

    def ip(self, family: int) -> str:
        """The LAN address of family 4 or 6."""
        return _pick(family, self.ipv4, self.ipv6)


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod: eth0 on its node's cbr0, default routes via the node."""

    node_index: int
    letter: str
    name: str  # pod-{node_index}{letter}
    ns: str
    node: str  # the name of the node it runs on, as an EndpointSlice's nodeName
    ipv4: str
    ipv6: str

    def ip(self, family: int) -> str:
        return _pick(family, self.ipv4, self.ipv6)


@dataclass(frozen=True, slots=True)
class Client:
    """A host outside the cluster on the LAN, with extra addresses to choose a source from.

    `extra_v4` is ``(203.0.113.{10k}, 203.0.113.{10k+1}, 203.0.113.{200+k})`` and `extra_v6` is
    ``(2001:db8:203::{10k}, 2001:db8:203::{200+k})``: a test can send from inside or outside a
    source range such as 203.0.113.0/28 by passing one of them as the probe's source address.
    Without a source address the kernel picks the LAN address.
    """

    index: int
    name: str  # client-{index}
    ns: str
    ipv4: str  # eth0, on the LAN
    ipv6: str
    extra_v4: tuple[str, ...]
    extra_v6: tuple[str, ...]

    def ip(self, family: int) -> str:
        return _pick(family, self.ipv4, self.ipv6)


Host = Node | Pod | Client


def _pick(family: int, v4: str, v6: str) -> str:
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    return v4 if family == 4 else v6


class Lab:
    """The lab's hosts as data, and `up()` / `down()` to build and remove them.

    Use it as a context manager (``with Lab(prefix="t1") as lab:``) so the namespaces go away
    whatever happens in the block.
    """

    def __init__(self, prefix: str = "kp", nodes: int = 2, pods_per_node: int = 2, clients: int = 1) -> None:
        _check_layout(prefix, nodes, pods_per_node, clients)
        self.prefix = prefix
        self.lan_ns = f"{prefix}-lan"
        self.nodes: tuple[Node, ...] = tuple(_make_node(prefix, i) for i in range(1, nodes + 1))
        self.all_pods: tuple[Pod, ...] = tuple(
            _make_pod(prefix, i, j) for i in range(1, nodes + 1) for j in range(1, pods_per_node + 1)
        )
        self.clients: tuple[Client, ...] = tuple(_make_client(prefix, k) for k in range(1, clients + 1))
        self._is_up = False

    # ----- describing the hosts

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (*self.nodes, *self.all_pods, *self.clients)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, the LAN first."""
        return (self.lan_ns, *(h.ns for h in self.hosts))

    def node(self, which: int | str) -> Node:
        """A node by index (1-based) or by name (``node-1``)."""
        for node in self.nodes:
            if which in (node.index, node.name):
                return node
        raise KeyError(f"no node {which!r} in lab {self.prefix!r}")

    def pods(self, node: int | str | None = None) -> tuple[Pod, ...]:
        """All pods, or the pods of one node (by index or name)."""
        if node is None:
            return self.all_pods
        wanted = self.node(node).name
        return tuple(p for p in self.all_pods if p.node == wanted)

    def pod(self, name: str) -> Pod:
        """A pod by name (``pod-1a``)."""
        for pod in self.all_pods:
            if pod.name == name:
                return pod
        raise KeyError(f"no pod {name!r} in lab {self.prefix!r}")

    def client(self, which: int | str = 1) -> Client:
        """A client by index (1-based) or by name (``client-1``)."""
        for client in self.clients:
            if which in (client.index, client.name):
                return client
        raise KeyError(f"no client {which!r} in lab {self.prefix!r}")

    def host(self, name: str) -> Host:
        """Any host by its name (``node-1``, ``pod-2b``, ``client-1``)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} in lab {self.prefix!r}")

    # ----- running things inside

    def run(
        self,
        ns: NamespaceRef,
        argv: Sequence[str],
        check: bool = True,
        input: str | None = None,
        timeout: float = _COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside namespace `ns` (``ip netns exec``); output is captured as text.

        With `check`, a non-zero exit raises `LabCommandError` naming the namespace and stderr.
        """
        return run_in(ns, argv, check=check, input=input, timeout=timeout)

    # ----- lifecycle

    def up(self) -> Lab:
        """Build the lab, replacing any leftovers of the same prefix; returns self."""
        remove_namespaces(self.prefix)
        try:
            self._build()
        except BaseException:
            remove_namespaces(self.prefix)
            raise
        self._is_up = True
        return self

    def down(self) -> None:
        """Remove every namespace of this lab's prefix (their interfaces go with them)."""
        self._is_up = False
        remove_namespaces(self.prefix)

    @property
    def is_up(self) -> bool:
        return self._is_up

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def describe(self) -> str:
        """One line per host: name, namespace, IPv4 and IPv6 address (and the node of a pod)."""
        lines = []
        for host in self.hosts:
            where = f"on {host.node}" if isinstance(host, Pod) else ""
            lines.append(f"{host.name:<10} {host.ns:<20} {host.ipv4:<15} {host.ipv6:<20} {where}".rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Lab(prefix={self.prefix!r}, nodes={len(self.nodes)}, "
            f"pods_per_node={len(self.all_pods) // max(len(self.nodes), 1)}, clients={len(self.clients)})"
        )

    # ----- building

    def _build(self) -> None:
        _ip_batch(None, [f"netns add {ns}" for ns in self.namespaces])
        # Sysctls come first: interfaces copy the namespace's `default` settings (accept_dad
        # above all) when they are created, not later.
        _parallel([partial(_sysctl, ns, settings) for ns, settings in self._sysctls().items()])
        # Each namespace creates the links it is the upstream end of (the LAN creates the
        # nodes' and clients' eth0, a node creates its pods' eth0), then every namespace
        # configures its own side once all links exist.
        _parallel([partial(_ip_batch, ns, lines) for ns, lines in self._link_batches().items()])
        _parallel([partial(_ip_batch, ns, lines) for ns, lines in self._config_batches().items()])
        _wait_ready(self.namespaces)

    def _sysctls(self) -> dict[str, list[str]]:
        # A plain switch: no netfilter on bridged LAN frames (br_netfilter is on by default in
        # every new namespace on this kernel).
        lan = [
            "net.bridge.bridge-nf-call-iptables=0",
            "net.bridge.bridge-nf-call-ip6tables=0",
            "net.bridge.bridge-nf-call-arptables=0",
            *_NO_DAD,
        ]
        node = [
            *_NO_DAD,
            *_NO_RP_FILTER,
            *_NO_ICMP_RATELIMIT,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.forwarding=1",
            # Pod → ServiceIP → pod on the same cbr0 is bridged, not routed; without these the
            # reply skips the un-DNAT and the client drops it.
            "net.bridge.bridge-nf-call-iptables=1",
            "net.bridge.bridge-nf-call-ip6tables=1",
            # node-1 forwards client traffic for node-2's pods back out of eth0; a redirect
            # would make the client bypass node-1 and change which node's rules apply.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ]
        host = [*_NO_DAD, *_NO_RP_FILTER, *_NO_ICMP_RATELIMIT, *_NO_ACCEPT_REDIRECTS]
        table = {self.lan_ns: lan}
        table.update({n.ns: node for n in self.nodes})
        table.update({p.ns: [*host, *_NO_TIME_WAIT] for p in self.all_pods})
        table.update({c.ns: host for c in self.clients})
        return table

    def _veth_number(self, host: Host) -> int:
        return self.hosts.index(host)

    def _link_batches(self) -> dict[str, list[str]]:
        lan = [_BRIDGE.format(name="br0"), "link set br0 up"]
        for node in self.nodes:
            lan += _veth(f"node{node.index}", node.ns, "br0", self._veth_number(node))
        for client in self.clients:
            lan += _veth(f"client{client.index}", client.ns, "br0", self._veth_number(client))
        batches = {self.lan_ns: lan}
        for node in self.nodes:
            lines = [
                _BRIDGE.format(name="cbr0"),
                f"addr add {node.gateway_v4}/24 dev cbr0",
                f"addr add {node.gateway_v6}/64 dev cbr0 nodad",
                "link set cbr0 up",
            ]
            for pod in self.pods(node.index):
                lines += _veth(f"veth-{node.index}{pod.letter}", pod.ns, "cbr0", self._veth_number(pod))
                # As the CNI bridge plugin's hairpinMode (kubelet's hairpin-veth): a pod reaching
                # itself through a Service is DNATed by br_netfilter and bridged back out of the
                # port it came in on, which a bridge refuses unless the port is in hairpin mode.
                lines.append(f"link set veth-{node.index}{pod.letter} type bridge_slave hairpin on")
            batches[node.ns] = lines
        return batches

    def _config_batches(self) -> dict[str, list[str]]:
        batches: dict[str, list[str]] = {self.lan_ns: ["link set lo up"]}
        first_client = self.clients[0] if self.clients else None
        for node in self.nodes:
            lines = _eth0(node.ipv4, LAN_V4_PREFIXLEN, node.ipv6, LAN_V6_PREFIXLEN)
            for other in self.nodes:
                if other is not node:
                    lines += [
                        f"route add {other.pod_cidr_v4} via {other.ipv4}",
                        f"route add {other.pod_cidr_v6} via {other.ipv6}",
                    ]
            if first_client is not None:
                lines += [
                    f"route add {CLIENT_NET_V4} via {first_client.ipv4}",
                    f"route add {CLIENT_NET_V6} via {first_client.ipv6}",
                ]
            # The /24 above reaches client-1 only; the other clients' extra addresses get
            # host routes so that replies to them go to the right client.
            for client in self.clients[1:]:
                lines += [f"route add {a}/32 via {client.ipv4}" for a in client.extra_v4]
                lines += [f"route add {a}/128 via {client.ipv6}" for a in client.extra_v6]
            batches[node.ns] = lines
        for pod in self.all_pods:
            node = self.node(pod.node_index)
            batches[pod.ns] = [
                *_eth0(pod.ipv4, 24, pod.ipv6, 64),
                f"route add default via {node.gateway_v4}",
                f"route add default via {node.gateway_v6}",
            ]
        gateway = self.nodes[0]
        for client in self.clients:
            batches[client.ns] = [
                *_eth0(client.ipv4, LAN_V4_PREFIXLEN, client.ipv6, LAN_V6_PREFIXLEN),
                *(f"addr add {a}/32 dev eth0" for a in client.extra_v4),
                *(f"addr add {a}/128 dev eth0 nodad" for a in client.extra_v6),
                f"route add default via {gateway.ipv4}",
                f"route add default via {gateway.ipv6}",
            ]
        return batches


_VETH_INDEX = 10000  # + a number per host: the ifindex of the upstream end of its veth
_VETH_PEER_INDEX = 20000  # + the same number: its eth0
# No STP: ports forward as soon as they are up. No multicast snooping: Neighbour
# Solicitations are flooded rather than depending on MLD reports the bridge may not have seen.
_BRIDGE = "link add {name} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"
_NO_DAD = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
# A new namespace inherits IPv4 settings from the host's; pin them so the lab routes the same
# on every host (kube-proxy setups differ on rp_filter, and the lab is about plain routing).
_NO_RP_FILTER = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
# ICMP errors (a REJECT's port unreachable too) are rate-limited per destination (IPv4: a
# burst of 6, then one a second; IPv6: one per 100 ms) and per namespace (a burst of 50, both
# families together); tests probing a rejected Service in a loop would see timeouts instead of
# refusals. For IPv4 no type is rate-limited (ratemask 0) rather than icmp_ratelimit=0: the
# latter empties the per-source token bucket that the routing code shares for its own "no
# route" errors (1 per second, burst 5, not settable in a namespace), silencing those. All of
# these settings are per namespace.
_NO_ICMP_RATELIMIT = [
    "net.ipv4.icmp_ratemask=0",
    "net.ipv6.icmp.ratelimit=0",
    "net.ipv4.icmp_msgs_per_sec=1000000",
    "net.ipv4.icmp_msgs_burst=1000000",
]
# The pods' echo servers close first, so every connection would leave a TIME_WAIT socket in the
# pod for 60 s; tests open new connections to one pod many times a second, and a later SYN whose
# masqueraded source meets one of them is refused (PAWS), retried a second later, or times out:
# connections lost that no proxy rule lost (seen as TcpExtPAWSTimewait in the pod). Pods of the
# lab keep no TIME_WAIT sockets (a per-namespace limit of 0), so what a probe sees is the proxy's.
_NO_TIME_WAIT = ["net.ipv4.tcp_max_tw_buckets=0"]
_NO_ACCEPT_REDIRECTS = [
    "net.ipv4.conf.all.accept_redirects=0",
    "net.ipv4.conf.default.accept_redirects=0",
    "net.ipv6.conf.all.accept_redirects=0",
    "net.ipv6.conf.default.accept_redirects=0",
]


def _veth(name: str, peer_ns: str, master: str, number: int) -> list[str]:
    """Lines creating veth `name` here with its peer `eth0` created directly in `peer_ns`.

    The two ends get distinct interface indexes (`number` is unique in the lab). The kernel's
    linkwatch handles a carrier change at once only when a device's index differs from its
    peer's; otherwise it batches it for up to a second, and until it runs the device keeps the
    `noop` qdisc, which drops every packet sent.
    """
    return [
        f"link add {name} index {_VETH_INDEX + number} type veth"
        f" peer name eth0 index {_VETH_PEER_INDEX + number} netns {peer_ns}",
        f"link set {name} master {master}",
        f"link set {name} up",
    ]


def _eth0(v4: str, v4_len: int, v6: str, v6_len: int) -> list[str]:
    return [
        "link set lo up",
        f"addr add {v4}/{v4_len} dev eth0",
        f"addr add {v6}/{v6_len} dev eth0 nodad",
        "link set eth0 up",
    ]


def _check_layout(prefix: str, nodes: int, pods_per_node: int, clients: int) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", prefix):
        raise ValueError(f"prefix must be a lowercase letter then up to 15 letters or digits: {prefix!r}")
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}, not {nodes}")
    if not 0 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise ValueError(f"pods_per_node must be 0..{MAX_PODS_PER_NODE}, not {pods_per_node}")
    if not 0 <= clients <= MAX_CLIENTS:
        raise ValueError(f"clients must be 0..{MAX_CLIENTS}, not {clients}")


def _make_node(prefix: str, i: int) -> Node:
    return Node(
        index=i,
        name=f"node-{i}",
        ns=f"{prefix}-node{i}",
        ipv4=LAN_V4.format(n=1 + i),
        ipv6=LAN_V6.format(n=1 + i),
        gateway_v4=f"10.0.{i}.1",
        gateway_v6=f"fd00:10:{i}::1",
        pod_cidr_v4=f"10.0.{i}.0/24",
        pod_cidr_v6=f"fd00:10:{i}::/64",
    )


def _make_pod(prefix: str, i: int, j: int) -> Pod:
    letter = string.ascii_lowercase[j - 1]
    return Pod(
        node_index=i,
        letter=letter,
        name=f"pod-{i}{letter}",
        ns=f"{prefix}-pod{i}{letter}",
        node=f"node-{i}",
        ipv4=f"10.0.{i}.{10 + j}",
        ipv6=f"fd00:10:{i}::{10 + j}",
    )


def _make_client(prefix: str, k: int) -> Client:
    return Client(
        index=k,
        name=f"client-{k}",
        ns=f"{prefix}-client{k}",
        ipv4=LAN_V4.format(n=100 + k),
        ipv6=LAN_V6.format(n=100 + k),
        extra_v4=(f"203.0.113.{10 * k}", f"203.0.113.{10 * k + 1}", f"203.0.113.{200 + k}"),
        extra_v6=(f"2001:db8:203::{10 * k}", f"2001:db8:203::{200 + k}"),
    )


# ----- namespaces of a prefix


def lab_namespaces(prefix: str) -> list[str]:
    """The namespaces that exist now and belong to a lab with `prefix` (any size)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(lan|node\d+|pod\d+[a-z]|client\d+)")
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if pattern.fullmatch(n))


def remove_namespaces(prefix: str) -> None:
    """Delete every namespace of a lab with `prefix`; absent ones are fine.

    A namespace whose name is gone lives on while something still holds it (a process inside,
    an open socket), but it no longer matters: nothing of it is in the host namespace.
    """
    names = lab_namespaces(prefix)
    if not names:
        return
    # -force: go on past a namespace deleted concurrently, then check what is really left.
    _ip_batch(None, [f"netns del {n}" for n in names], force=True, check=False)
    left = lab_namespaces(prefix)
    if left:
        raise LabError(f"could not delete lab namespaces: {', '.join(left)}")


# ----- commands


def start_detached(argv: Sequence[str]) -> int:
    """Start `argv` in a session of its own, outliving this process; its pid."""
    proc = subprocess.Popen(
        argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc.pid


def run_in(
    ns: NamespaceRef,
    argv: Sequence[str],
    check: bool = True,
    input: str | None = None,
    timeout: float = _COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside namespace `ns` with ``ip netns exec``; see `Lab.run`."""
    name = ns_name(ns)
    full = ["ip", "netns", "exec", name, *argv]
    done = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise LabCommandError(name, argv, done.returncode, done.stdout, done.stderr)
    return done


def _ip_batch(ns: str | None, lines: Iterable[str], force: bool = False, check: bool = True) -> None:
    """Feed `lines` to one ``ip -batch -`` in namespace `ns` (None: where we are, for netns add/del)."""
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    text = "".join(f"{line}\n" for line in lines)
    done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    if check and done.returncode != 0:
        where = ns or "the current namespace"
        raise LabError(f"ip -batch in {where} failed: {done.stderr.strip()}\ninput:\n{text}")


def _sysctl(ns: str, settings: Sequence[str]) -> None:
    run_in(ns, ["sysctl", "-q", "-w", *settings])


def _parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run the jobs on threads (each mostly waits on a child process); re-raise the first error."""
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        futures = [pool.submit(job) for job in jobs]
        for future in futures:
            future.result()


# ----- readiness


def _wait_ready(namespaces: Sequence[str]) -> None:
    """Poll every namespace until its addresses answer and its bridge ports forward, or raise."""
    deadline = time.monotonic() + _READY_TIMEOUT
    pending = list(namespaces)
    while True:
        with ThreadPoolExecutor(max_workers=min(16, len(pending))) as pool:
            problems = dict(zip(pending, pool.map(_not_ready_reason, pending), strict=True))
        pending = [ns for ns, problem in problems.items() if problem]
        if not pending:
            return
        if time.monotonic() > deadline:
            detail = "; ".join(f"{ns}: {problems[ns]}" for ns in pending)
            raise LabError(f"lab namespaces not ready after {_READY_TIMEOUT}s: {detail}")
        time.sleep(0.01)


def _not_ready_reason(ns: str) -> str:
    """Why `ns` cannot carry traffic yet, or "" when it can."""
    return _links_not_ready(ns) or _ipv6_not_ready(ns) or _bridge_ports_not_ready(ns)


def _links_not_ready(ns: str) -> str:
    """Every interface with a carrier must be able to send.

    Until the kernel's linkwatch has seen a veth's carrier come up, the veth keeps the `noop`
    qdisc, which drops every packet sent. (A bridge's operational state may read UNKNOWN for up
    to a second longer, as linkwatch batches bridge events, but it sends from the start.) A
    bridge without ports has no carrier and is left alone: nothing can use it.
    """
    for link in _ip_json(ns, ["link", "show"]):
        flags = link.get("flags")
        if not isinstance(flags, list) or "NO-CARRIER" in flags:
            continue
        if link.get("qdisc") == "noop" or link.get("operstate") not in ("UP", "UNKNOWN"):
            return f"{link.get('ifname')} is {link.get('operstate')} with qdisc {link.get('qdisc')}"
    return ""


def _ipv6_not_ready(ns: str) -> str:
    """Every IPv6 address must be usable for Neighbour Discovery, not merely non-tentative.

    A ``nodad`` address is never tentative, yet the kernel joins its solicited-node multicast
    group later, from a workqueue; before that a Neighbour Solicitation for it is dropped and
    the first packet stalls for the one-second retransmission. (Link-local addresses may come
    later still; nothing in the lab routes through them.)
    """
    joined = _joined_groups(ns)
    for link in _ip_json(ns, ["-6", "addr", "show"]):
        ifname = str(link.get("ifname"))
        if ifname == "lo":
            continue
        for info in _as_dicts(link.get("addr_info")):
            if info.get("tentative") or info.get("dadfailed"):
                return f"{info.get('local')} on {ifname} is tentative"
            group = _solicited_node_group(str(info.get("local")))
            if group not in joined.get(ifname, set()):
                return f"{ifname} has not joined {group} yet"
    return ""


def _bridge_ports_not_ready(ns: str) -> str:
    for port in _bridge_json(ns):
        if port.get("state") != "forwarding":
            return f"bridge port {port.get('ifname')} is {port.get('state')}"
    return ""


def _solicited_node_group(address: str) -> str:
    low24 = int(ipaddress.IPv6Address(address)) & 0xFFFFFF
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | low24))


def _joined_groups(ns: str) -> dict[str, set[str]]:
    """IPv6 multicast groups per interface (``ip -6 maddr`` has no JSON output)."""
    done = subprocess.run(["ip", "-n", ns, "-6", "maddr", "show"], capture_output=True, text=True, check=True)
    groups: dict[str, set[str]] = {}
    current: set[str] = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if not line.startswith((" ", "\t")) and len(fields) == 2 and fields[0].endswith(":"):
            current = groups.setdefault(fields[1], set())
        elif len(fields) >= 2 and fields[0] == "inet6":
            current.add(str(ipaddress.IPv6Address(fields[1])))
    return groups


def _ip_json(ns: str, args: Sequence[str]) -> list[dict[str, object]]:
    done = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True, check=True)
    return _as_dicts(json.loads(done.stdout or "[]"))


def _bridge_json(ns: str) -> list[dict[str, object]]:
    argv = ["bridge", "-n", ns, "-j", "link", "show"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return _as_dicts(json.loads(done.stdout or "[]"))


def _as_dicts(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
