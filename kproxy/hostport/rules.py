"""hostPort, pure: Pods of this node → port mappings → iptables rules → one restore transaction.

This is what the CNI portmap plugin does at CNI ADD/DEL, done instead from the Pods the API
server says run on this node (see `kproxy.hostport.syncer` for the driver). Nothing here touches
the kernel: node addresses and the chains already present come in as values.

Guarantees:

- **Claims.** Every ``ports[]`` entry with a ``hostPort`` of a container or init container (a
  restartable sidecar may hold one) is a claim on (hostIP, hostPort, protocol); protocol defaults
  to TCP, hostIP to every address. Pods that have finished (Succeeded, Failed) claim nothing.
  A hostNetwork pod's claims are counted for conflicts but need no rule (it binds the port
  itself). Pods without an IP yet claim (they will hold the port) but map nothing.
- **Conflicts** (two claims on one port and protocol whose hostIPs overlap: equal, or either is
  the wildcard, as the scheduler's NodePorts filter sees it) go to the **oldest** pod
  (creationTimestamp, then namespace/name), never to whichever came last; every losing claim is
  a `Conflict` naming both pods, and is not programmed. Other claims of the losing pod still are.
- **Mappings** per pod IP: a hostIP of the other family is skipped (portmap does the same);
  ``""`` maps in every family, ``0.0.0.0``/``::`` in their own family only, both meaning "every
  address of the node".
- **Which destinations are captured.** Not ``addrtype LOCAL`` alone: in IPVS mode every
  ClusterIP, externalIP and LoadBalancer IP is a LOCAL address on the dummy device
  ``kproxy-ipvs0`` (``kube-ipvs0`` under kube-proxy), and an ingress pod on hostPort 443 would
  then capture ``kubernetes.default``'s ClusterIP:443 (kubernetes/kubernetes#60305, #61938). The
  entry chain `DNAT_CHAIN` accepts only an explicit allow-list of the node's own addresses: every
  address of every interface except those devices and link-local ones, plus 127.0.0.0/8 in
  IPv4. An address that is not on the list is never captured, so a VIP added later by a Service
  proxy is safe even before the next hostPort sync (failing closed: a new node address is served
  only from the next sync, which the driver runs when it sees the addresses change). The jumps
  from PREROUTING and OUTPUT are placed **after** the Service proxy's own jumps
  (``KPROXY-SERVICES``, or ``KUBE-SERVICES``), so a Service port on a node address (a NodePort
  equal to a hostPort, an externalIP on eth0) keeps going to the Service.
- **Masquerade** exactly where a reply would otherwise not come back through this node's
  conntrack: hairpin (the pod reaches its own hostPort; the reply would stay inside the pod) and
  localhost (IPv4 ``127.0.0.1:hostPort``, which also needs ``route_localnet`` on the interface
  towards the pod — the driver sets it — guarded by `LOCALNET_CHAIN` against packets from
  elsewhere to 127.0.0.0/8, the CVE-2020-8558 class). As portmap, the first packet is marked
  with `MASQ_MARK` in the per-pod chain and `MASQ_CHAIN`, first in POSTROUTING, masquerades it.
  Other pods of the node reach a hostPort with their own address, as they reach a Service:
  bridged replies pass netfilter (br_netfilter), which kubelet requires anyway.
- **One transaction per family**, rewriting only our chains (prefixes `OWN_PREFIXES`): the
  chains are declared (flushed) and refilled, stale ones deleted, and our jumps added, moved or
  removed, in one ``iptables-restore --noflush`` input. Rule bodies are never read back; only
  chain names and the order of the jumps in the built-in chains are.

Why one module of ~590 lines: it is one pure pipeline (claims, conflicts, mappings, chains,
plan) whose stages share the portmap plugin's names and ordering rules.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kproxy.errors import InvalidObject
from kproxy.model import IPFamily, Protocol

# --- names ----------------------------------------------------------------------------------

DNAT_CHAIN = "KPROXY-HOSTPORT-DNAT"  # entry from PREROUTING/OUTPUT: the node-address allow-list
PODS_CHAIN = "KPROXY-HOSTPORT-PODS"  # one rule per pod and protocol → the pod's chain
MASQ_CHAIN = "KPROXY-HOSTPORT-MASQ"  # from POSTROUTING: masquerade what a pod chain marked
LOCALNET_CHAIN = "KPROXY-HOSTPORT-LOCALNET"  # filter INPUT: the route_localnet guard
POD_CHAIN_PREFIX = "KPROXY-HP-"
OWN_PREFIXES = ("KPROXY-HOSTPORT-", POD_CHAIN_PREFIX)
CHAIN_MAX = 28  # iptables user chain names (XT_EXTENSION_MAXNAMELEN - 1)
MASQ_MARK = 0x2000  # bit 13, portmap's default; kube-proxy and kproxy use bits 14 and 15
SERVICE_CHAINS = ("KPROXY-SERVICES", "KUBE-SERVICES")
# Dummy devices that hold Service VIPs in IPVS mode; their addresses are never node addresses.
VIP_DEVICES = ("kproxy-ipvs0", "kube-ipvs0")
MULTIPORT_MAX = 15  # the multiport match takes at most 15 ports

NAT = "nat"
FILTER = "filter"

_LOOPBACK_V4 = "127.0.0.0/8"


def pod_chain(namespace: str, name: str, uid: str) -> str:
    """``KPROXY-HP-`` + 16 base32 characters of sha256(namespace/name/uid): stable across
    restarts, new for a recreated pod (new uid), 26 characters."""
    digest = hashlib.sha256(f"{namespace}/{name}/{uid}".encode()).digest()
    name_ = POD_CHAIN_PREFIX + base64.b32encode(digest).decode()[:16]
    assert len(name_) <= CHAIN_MAX
    return name_


def is_own_chain(name: str) -> bool:
    return name.startswith(OWN_PREFIXES)


# --- pods → claims --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class PodRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"Pod {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PortClaim:
    pod: PodRef
    field: str  # spec.containers[0].ports[1]
    host_ip: str  # "" = every address of the node
    host_port: int
    protocol: Protocol
    container_port: int

    @property
    def wildcard(self) -> bool:
        return self.host_ip in ("", "0.0.0.0", "::")

    def overlaps(self, other: PortClaim) -> bool:
        """Two claims compete for the same packets (the scheduler's NodePorts rule)."""
        if (self.protocol, self.host_port) != (other.protocol, other.host_port):
            return False
        return self.wildcard or other.wildcard or self.host_ip == other.host_ip

    def __str__(self) -> str:
        where = self.host_ip or "every address"
        return f"hostPort {self.host_port}/{self.protocol.value} on {where}"


@dataclass(frozen=True, slots=True)
class PodPorts:
    """One pod's hostPort claims, as `parse_pod` reads them."""

    ref: PodRef
    uid: str
    created: datetime | None
    pod_ips: tuple[str, ...]
    host_network: bool
    claims: tuple[PortClaim, ...]

    @property
    def age_key(self) -> tuple[int, datetime, str, str]:
        if self.created is None:
            return (1, _EPOCH_MIN, self.ref.namespace, self.ref.name)
        return (0, self.created, self.ref.namespace, self.ref.name)


_EPOCH_MIN = datetime.min.replace(tzinfo=UTC)
_FINISHED = ("Succeeded", "Failed")


def parse_pod(obj: Mapping[str, Any]) -> PodPorts | None:
    """A v1 Pod → its claims; None when it claims nothing. Raises `InvalidObject` on a
    malformed hostPort entry (the other pods still go on)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        raise InvalidObject("Pod ?", "metadata", "not a Pod object")
    ns, name = meta.get("namespace") or "default", meta.get("name")
    if not isinstance(name, str) or not name or not isinstance(ns, str):
        raise InvalidObject("Pod ?", "metadata.name", "missing")
    ref = PodRef(ns, name)
    if status.get("phase") in _FINISHED:
        return None
    claims: list[PortClaim] = []
    for section in ("initContainers", "containers"):
        containers = spec.get(section) or []
        if not isinstance(containers, list):
            raise InvalidObject(str(ref), f"spec.{section}", "not a list")
        for ci, c in enumerate(containers):
            ports = c.get("ports") if isinstance(c, Mapping) else None
            if not ports:
                continue
            if not isinstance(ports, list):
                raise InvalidObject(str(ref), f"spec.{section}[{ci}].ports", "not a list")
            for pi, p in enumerate(ports):
                f = f"spec.{section}[{ci}].ports[{pi}]"
                if not isinstance(p, Mapping) or not p.get("hostPort"):
                    continue
                claims.append(_claim(ref, f, p, bool(spec.get("hostNetwork"))))
    if not claims:
        return None
    return PodPorts(
        ref=ref,
        uid=str(meta.get("uid") or ""),
        created=_timestamp(meta.get("creationTimestamp"), ref),
        pod_ips=_pod_ips(status, ref),
        host_network=bool(spec.get("hostNetwork")),
        claims=tuple(claims),
    )


def _claim(ref: PodRef, f: str, p: Mapping[str, Any], host_network: bool) -> PortClaim:
    host_port = _port(p.get("hostPort"), ref, f"{f}.hostPort")
    # hostNetwork pods: the API defaults containerPort to hostPort and requires them equal.
    container_port = _port(p.get("containerPort", host_port if host_network else None), ref, f"{f}.containerPort")
    raw_proto = p.get("protocol") or "TCP"
    try:
        protocol = Protocol(raw_proto)
    except ValueError:
        raise InvalidObject(str(ref), f"{f}.protocol", f"unknown protocol {str(raw_proto)[:20]!r}") from None
    host_ip = p.get("hostIP") or ""
    if host_ip:
        try:
            host_ip = str(ipaddress.ip_address(host_ip))
        except ValueError:
            raise InvalidObject(str(ref), f"{f}.hostIP", f"{str(host_ip)[:50]!r} is not an IP address") from None
    return PortClaim(ref, f, host_ip, host_port, protocol, container_port)


def _port(v: Any, ref: PodRef, f: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
        raise InvalidObject(str(ref), f, "not a port number (1-65535)")
    return v


def _pod_ips(status: Mapping[str, Any], ref: PodRef) -> tuple[str, ...]:
    raw = [e.get("ip") for e in status.get("podIPs") or [] if isinstance(e, Mapping)]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    out = []
    for i, ip in enumerate(raw):
        try:
            out.append(str(ipaddress.ip_address(str(ip))))
        except ValueError:
            raise InvalidObject(str(ref), f"status.podIPs[{i}].ip", "not an IP address") from None
    return tuple(dict.fromkeys(out))


def _timestamp(v: Any, ref: PodRef) -> datetime | None:
    if not v:
        return None
    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidObject(str(ref), "metadata.creationTimestamp", "not a timestamp") from None


# --- claims → mappings ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class PortMapping:
    """One DNAT: (hostIP or every node address, hostPort, protocol) → podIP:containerPort."""

    family: IPFamily
    pod: PodRef
    protocol: Protocol
    host_port: int
    host_ip: str  # "" = every node address of this family
    pod_ip: str
    container_port: int
    chain: str = field(compare=False)

    @property
    def localhost(self) -> bool:
        """Reachable on 127.0.0.1 (IPv4 only: IPv6 has no route_localnet)."""
        if self.family is not IPFamily.V4:
            return False
        return not self.host_ip or ipaddress.ip_address(self.host_ip).is_loopback


@dataclass(frozen=True, slots=True)
class Conflict:
    loser: PortClaim
    winner: PortClaim

    def __str__(self) -> str:
        same = self.loser.pod == self.winner.pod
        by = f"{self.winner.field} of this pod" if same else f"the older {self.winner.pod}"
        return (
            f"{self.loser.pod}: {self.loser.field}: {self.loser} is already claimed by {by} "
            f"({self.winner}); not programmed"
        )


@dataclass(frozen=True, slots=True)
class Resolved:
    mappings: tuple[PortMapping, ...]
    conflicts: tuple[Conflict, ...]
    unmapped: tuple[str, ...]  # claims that map to nothing, with why (no pod IP yet, family)


def resolve(pods: Iterable[PodPorts]) -> Resolved:
    """Oldest pod first: each claim is kept unless an earlier kept claim overlaps it."""
    kept: list[PortClaim] = []
    conflicts: list[Conflict] = []
    mappings: list[PortMapping] = []
    unmapped: list[str] = []
    for pod in sorted(pods, key=lambda p: p.age_key):
        chain = pod_chain(pod.ref.namespace, pod.ref.name, pod.uid)
        for claim in pod.claims:
            winner = next((k for k in kept if k.overlaps(claim)), None)
            if winner is not None:
                conflicts.append(Conflict(claim, winner))
                continue
            kept.append(claim)
            if pod.host_network:
                continue  # the pod binds the port on the node itself
            if not pod.pod_ips:
                unmapped.append(f"{pod.ref}: {claim.field}: no pod IP yet")
                continue
            n = 0
            for ip in pod.pod_ips:
                family = IPFamily(ipaddress.ip_address(ip).version)
                if claim.host_ip and IPFamily(ipaddress.ip_address(claim.host_ip).version) is not family:
                    continue
                host_ip = "" if claim.host_ip in ("0.0.0.0", "::") else claim.host_ip
                mappings.append(
                    PortMapping(
                        family, pod.ref, claim.protocol, claim.host_port, host_ip, ip, claim.container_port, chain
                    )
                )
                n += 1
            if n == 0:
                unmapped.append(f"{pod.ref}: {claim.field}: hostIP {claim.host_ip} has no pod IP of its family")
    return Resolved(tuple(sorted(set(mappings))), tuple(conflicts), tuple(unmapped))


# --- node addresses -------------------------------------------------------------------------


def node_addresses(
    by_device: Mapping[str, Iterable[str]], family: IPFamily, vip_devices: Sequence[str] = VIP_DEVICES
) -> tuple[str, ...]:
    """The destinations hostPorts answer on: every address of `family` on every device but the
    VIP devices, without link-local ones; IPv4 adds 127.0.0.0/8 (portmap's LOCAL covers it),
    IPv6 leaves out ::1 (a DNAT from ::1 to a pod cannot be routed)."""
    out: set[str] = set()
    for dev, addrs in by_device.items():
        if dev in vip_devices:
            continue
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if ip.version != int(family) or ip.is_link_local or ip.is_loopback:
                continue
            out.add(str(ip))
    ordered = sorted(out, key=lambda a: ipaddress.ip_address(a))
    if family is IPFamily.V4:
        ordered.append(_LOOPBACK_V4)
    return tuple(ordered)


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule in a built-in chain that enters one of ours. `after_services`: it must come after
    the Service proxy's jump in the same chain; otherwise it is inserted first."""

    table: str
    chain: str
    spec: str  # the match part, without -A CHAIN and -j TARGET
    target: str
    after_services: bool

    @property
    def rule(self) -> str:
        return f"-A {self.chain} {self.spec} -j {self.target}".replace("  ", " ")


@dataclass(frozen=True, slots=True)
class HostPortRules:
    """Everything one family needs: chains per table (full restore lines), and the jumps."""

    family: IPFamily
    tables: Mapping[str, Mapping[str, tuple[str, ...]]]
    jumps: tuple[Jump, ...]

    @property
    def empty(self) -> bool:
        return not self.jumps

    def __str__(self) -> str:
        out = []
        for table in (NAT, FILTER):
            chains = self.tables.get(table, {})
            if not chains:
                continue
            out.append(f"*{table}")
            out.extend(f":{c} - [0:0]" for c in _chain_order(chains))
            out.extend(j.rule for j in self.jumps if j.table == table)
            for c in _chain_order(chains):
                out.extend(chains[c])
            out.append("COMMIT")
        return "\n".join(out) + ("\n" if out else "")


def _chain_order(chains: Mapping[str, Any]) -> list[str]:
    fixed = [c for c in (DNAT_CHAIN, PODS_CHAIN, MASQ_CHAIN, LOCALNET_CHAIN) if c in chains]
    return fixed + sorted(c for c in chains if c not in fixed)


def _q(text: str) -> str:
    """A comment value: only what Kubernetes names and our fixed words use, always quoted."""
    safe = "".join(ch for ch in text if ch.isalnum() or ch in "-./_: ")
    return f'"{safe[:250]}"'


def _host(ip: str) -> str:
    return f"{ip}/{32 if ':' not in ip else 128}" if "/" not in ip else ip


def _dnat_to(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def render(mappings: Iterable[PortMapping], family: IPFamily, addresses: Sequence[str]) -> HostPortRules:
    """The chains and jumps for `family`'s mappings; empty (no chains, no jumps) without any."""
    mine = sorted(m for m in mappings if m.family is family)
    if not mine:
        return HostPortRules(family, {}, ())
    mark = f"0x{MASQ_MARK:x}/0x{MASQ_MARK:x}"
    nat: dict[str, list[str]] = {DNAT_CHAIN: [], PODS_CHAIN: [], MASQ_CHAIN: []}
    for addr in addresses:
        nat[DNAT_CHAIN].append(f"-A {DNAT_CHAIN} -d {_host(addr)} -j {PODS_CHAIN}")

    by_pod: dict[tuple[PodRef, str], list[PortMapping]] = {}
    for m in mine:
        by_pod.setdefault((m.pod, m.chain), []).append(m)
    for (pod, chain), ms in sorted(by_pod.items()):
        comment = _q(f"{pod.namespace}/{pod.name} hostports")
        for proto in sorted({m.protocol for m in ms}, key=lambda p: p.value):
            ports = sorted({m.host_port for m in ms if m.protocol is proto})
            for i in range(0, len(ports), MULTIPORT_MAX):
                group = ",".join(str(p) for p in ports[i : i + MULTIPORT_MAX])
                nat[PODS_CHAIN].append(
                    f"-A {PODS_CHAIN} -m comment --comment {comment} -p {proto.lowercase} "
                    f"-m multiport --dports {group} -j {chain}"
                )
        rules: list[str] = []
        for m in ms:
            dst = f"-d {_host(m.host_ip)} " if m.host_ip else ""
            match = f"-p {m.protocol.lowercase} -m {m.protocol.lowercase} --dport {m.host_port}"
            loopback_only = bool(m.host_ip) and ipaddress.ip_address(m.host_ip).is_loopback
            if not loopback_only:
                # Hairpin: the pod reaches its own hostPort; without SNAT its reply stays inside it.
                rules.append(f"-A {chain} {dst}-s {_host(m.pod_ip)} {match} -j MARK --set-xmark {mark}")
            if m.localhost:
                rules.append(f"-A {chain} {dst}-s {_LOOPBACK_V4} {match} -j MARK --set-xmark {mark}")
            rules.append(f"-A {chain} {dst}{match} -j DNAT --to-destination {_dnat_to(m.pod_ip, m.container_port)}")
        nat[chain] = rules
    nat[MASQ_CHAIN].append(
        f"-A {MASQ_CHAIN} -m comment --comment {_q('kproxy hostport hairpin and localhost')} "
        f"-m mark --mark {mark} -j MASQUERADE"
    )
    tables: dict[str, dict[str, tuple[str, ...]]] = {NAT: {c: tuple(r) for c, r in nat.items()}}
    jumps = [
        Jump(
            NAT,
            "PREROUTING",
            f"-m comment --comment {_q('kproxy hostports')} -m addrtype --dst-type LOCAL",
            DNAT_CHAIN,
            True,
        ),
        Jump(
            NAT,
            "OUTPUT",
            f"-m comment --comment {_q('kproxy hostports')} -m addrtype --dst-type LOCAL",
            DNAT_CHAIN,
            True,
        ),
        Jump(NAT, "POSTROUTING", f"-m comment --comment {_q('kproxy hostport masquerade')}", MASQ_CHAIN, False),
    ]
    if any(m.localhost for m in mine):
        # route_localnet lets 127.0.0.0/8 cross into the pod; nothing else may use it to reach the
        # node's loopback services from outside (CVE-2020-8558; kube-proxy's KUBE-FIREWALL rule).
        tables[FILTER] = {
            LOCALNET_CHAIN: (
                f"-A {LOCALNET_CHAIN} ! -s {_LOOPBACK_V4} -d {_LOOPBACK_V4} -m comment --comment "
                f"{_q('block incoming localnet connections')} -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
                "-j DROP",
            )
        }
        jumps.append(Jump(FILTER, "INPUT", "", LOCALNET_CHAIN, False))
    return HostPortRules(family, tables, tuple(jumps))


# --- plan -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelView:
    """What the kernel holds, as names only: chains per table, and per table the rules of the
    built-in chains that jump to kproxy's (or kube-proxy's) chains, in ``iptables-save`` order."""

    chains: Mapping[str, set[str]]
    jump_rules: Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True)
class Plan:
    text: str  # "" when the kernel already matches
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    jumps_fixed: tuple[str, ...] = ()


def _parse_jump(line: str) -> tuple[str, str]:
    chain = line.split(" ", 2)[1]
    target = line.rsplit("-j ", 1)[1].split(" ", 1)[0]
    return chain, target


def plan(desired: HostPortRules, kernel: KernelView, applied: HostPortRules | None) -> Plan:
    """The restore input that makes the kernel hold `desired` and nothing else of ours.

    The chains are rewritten whole when anything differs from `applied` (what the last
    transaction wrote; None: unknown) or when one is missing; our stale chains are deleted; a
    jump is re-added when it is missing, duplicated or (for the DNAT entry) sits before the
    Service proxy's jump; a jump we no longer want is deleted. Returns an empty text when
    nothing needs doing.
    """
    tables = (NAT, FILTER)
    out: list[str] = []
    written: list[str] = []
    deleted: list[str] = []
    fixed: list[str] = []
    same_rules = applied is not None and applied.tables == desired.tables
    for table in tables:
        want = desired.tables.get(table, {})
        have = kernel.chains.get(table, set())
        stale = sorted(c for c in have if is_own_chain(c) and c not in want)
        rewrite = not same_rules or any(c not in have for c in want)
        lines = list(kernel.jump_rules.get(table, ()))
        delete_jumps: list[str] = []
        add_jumps: list[Jump] = []
        desired_jumps = [j for j in desired.jumps if j.table == table]
        for builtin in sorted({_parse_jump(x)[0] for x in lines} | {j.chain for j in desired_jumps}):
            in_chain = [x for x in lines if _parse_jump(x)[0] == builtin]
            targets = [_parse_jump(x)[1] for x in in_chain]
            for j in (j for j in desired_jumps if j.chain == builtin):
                mine = [i for i, t in enumerate(targets) if t == j.target]
                ok = len(mine) == 1
                if ok and j.after_services:
                    services = [i for i, t in enumerate(targets) if t in SERVICE_CHAINS]
                    ok = all(s < mine[0] for s in services)
                if not ok:
                    delete_jumps += [in_chain[i] for i in mine]
                    add_jumps.append(j)
            wanted_targets = {j.target for j in desired_jumps if j.chain == builtin}
            for x, t in zip(in_chain, targets, strict=True):
                if is_own_chain(t) and t not in wanted_targets:
                    delete_jumps.append(x)
        if not (rewrite and want) and not stale and not delete_jumps and not add_jumps:
            continue
        out.append(f"*{table}")
        chains = _chain_order(want) if rewrite else []
        out.extend(f":{c} - [0:0]" for c in chains)
        out.extend(f":{c} - [0:0]" for c in stale)  # flushed first, so they can go
        out.extend("-D " + x[len("-A ") :] for x in delete_jumps)
        for c in chains:
            out.extend(want[c])
        for j in add_jumps:
            if j.after_services:
                out.append(j.rule)
            else:
                out.append(f"-I {j.chain} 1 {j.spec} -j {j.target}".replace("  ", " "))
        out.extend(f"-X {c}" for c in stale)
        out.append("COMMIT")
        written += chains
        deleted += stale
        fixed += [f"{table} {j.chain} -> {j.target}" for j in add_jumps]
        fixed += [
            f"{table} -{_parse_jump(x)[0]} -> {_parse_jump(x)[1]}"
            for x in delete_jumps
            if not any(_parse_jump(x)[1] == j.target for j in add_jumps)
        ]
    return Plan("\n".join(out) + "\n" if out else "", tuple(written), tuple(deleted), tuple(fixed))


def udp_ports_to_flush(before: Iterable[PortMapping], after: Iterable[PortMapping]) -> tuple[int, ...]:
    """UDP hostPorts whose mapping appeared or changed target: conntrack entries created before
    (replies from a host socket, or ICMP errors) would keep bypassing the new DNAT."""
    old = {(m.family, m.host_ip, m.host_port, m.pod_ip, m.container_port) for m in before if m.protocol is Protocol.UDP}
    return tuple(
        sorted(
            {
                m.host_port
                for m in after
                if m.protocol is Protocol.UDP
                and (m.family, m.host_ip, m.host_port, m.pod_ip, m.container_port) not in old
            }
        )
    )
