"""`kproxy status` and the daemon's `/debug/services`: the effective Service table of one node.

Pure. For each Service port of each IP family: its addresses, policies, traffic distribution and
affinity; each endpoint with its conditions, node, zone and hints, and whether this node sends
cluster traffic, local traffic or nothing to it, and why; what happens to traffic that finds no
endpoint (REJECT when the Service has none anywhere, DROP when a Local policy has none here);
and the kernel objects that implement it. The endpoint choice is `topology.categorize`'s, the
same call every mode renders from, so the table cannot disagree with the rules. The kernel
objects come from the mode (`DataPlaneMode.describe`, derived from its own render), so no name
is worked out twice.

One JSON form (`ServiceTable.to_json`) is what `kproxy status -o json` prints and the daemon
serves; the text form is rendered from that JSON (`text`), so `kproxy status --from` a running
daemon prints exactly what a local computation would. Text lines never exceed `WIDTH` columns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.node import NodeContext
from kproxy.topology import EndpointSets, Selection, categorize
from kproxy.view import FamilyView

WIDTH = 100


@dataclass(frozen=True, slots=True)
class KernelObject:
    """One kernel object a Service port needs, as `--check` looks it up.

    kind: `chain` (iptables: `where` is the table; nftables: `where` is the table, `kproxy`),
    `rules-in` (iptables: `rules` of the Service port's rules in the shared chain `where/name`),
    `element` (nftables: `where` is the set or map, `name` the key), `set` (nftables affinity
    sets), `virtual-server` and `real-server` (IPVS: `name` is `TCP 172.30.0.41:80`, a real
    server's `where` its virtual server), `ipset-entry` (IPVS: `where` is the ipset).
    `rules`: how many rules the chain holds, where the mode knows it (a count, not rule text)."""

    kind: str
    where: str
    name: str
    rules: int | None = None
    value: str = ""  # a map element's value (`goto reject-chain`), shown but not checked

    def __str__(self) -> str:
        if self.kind == "rules-in":  # a Service port's rules in a chain every Service shares
            return f"{self.rules} rule{'' if self.rules == 1 else 's'} in {self.where}/{self.name}"
        if self.kind == "chain":
            head = f"chain {self.where}/{self.name}"
        else:
            head = f"{self.kind} {self.where}: {self.name}" + (f" : {self.value}" if self.value else "")
        if self.rules is None:
            return head
        return f"{head} ({self.rules} rule{'' if self.rules == 1 else 's'})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "where": self.where, "name": self.name}
        if self.rules is not None:
            out["rules"] = self.rules
        if self.value:
            out["value"] = self.value
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KernelObject:
        rules = d.get("rules")
        kind, where, name = str(d["kind"]), str(d["where"]), str(d["name"])
        return cls(kind, where, name, None if rules is None else int(rules), str(d.get("value") or ""))


class Unused(str, enum.Enum):
    """Why this node sends no traffic to an endpoint."""

    NOT_SERVING = "not-serving"  # neither ready nor serving-and-terminating
    TERMINATING = "terminating"  # serving but terminating, and ready endpoints exist
    OTHER_NODE_HINT = "hinted-for-other-node"  # node hints in use, none names this node
    OTHER_ZONE_HINT = "hinted-for-other-zone"  # zone hints in use, none names this zone
    NOT_LOCAL = "not-on-this-node"  # only a Local policy's set is used, and it is elsewhere


FORWARD, REJECT, DROP = "forward", "REJECT", "DROP"


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node: str
    zone: str
    zone_hints: tuple[str, ...]
    node_hints: tuple[str, ...]
    cluster: bool  # in the set cluster-policy traffic goes to
    local: bool  # in the set Local-policy traffic goes to
    why: str  # the rule that chose it (`node-hints`, `policy-local`...) or an `Unused` value

    def to_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "port": self.port,
            "ready": self.ready,
            "serving": self.serving,
            "terminating": self.terminating,
            "node": self.node,
            "zone": self.zone,
            "hints": {"forZones": list(self.zone_hints), "forNodes": list(self.node_hints)},
            "usedFor": [u for u, on in (("cluster", self.cluster), ("local", self.local)) if on],
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class PortStatus:
    family: IPFamily
    name: ServicePortName
    port: int
    cluster_ips: tuple[str, ...]
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    lb_source_ranges: tuple[str, ...]
    node_port: int
    health_check_node_port: int
    internal_policy: str  # Cluster or Local
    external_policy: str  # Cluster or Local ("" when nothing outside can reach the Service)
    traffic_distribution: str
    affinity_timeout: int
    cluster_rule: str
    local_rule: str
    hints_skipped: tuple[str, ...]
    internal: str  # forward, REJECT or DROP: traffic to the ClusterIP
    external: str  # the same for NodePort, external and LB IPs ("" when none)
    endpoints: tuple[EndpointStatus, ...]
    objects: tuple[KernelObject, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "family": int(self.family),
            "namespace": self.name.namespace,
            "name": self.name.name,
            "portName": self.name.port,
            "protocol": self.name.protocol.value,
            "port": self.port,
            "clusterIPs": list(self.cluster_ips),
            "externalIPs": list(self.external_ips),
            "loadBalancerIPs": list(self.lb_ips),
            "loadBalancerSourceRanges": list(self.lb_source_ranges),
            "nodePort": self.node_port,
            "healthCheckNodePort": self.health_check_node_port,
            "internalTrafficPolicy": self.internal_policy,
            "externalTrafficPolicy": self.external_policy or None,
            "trafficDistribution": self.traffic_distribution or None,
            "sessionAffinityTimeoutSeconds": self.affinity_timeout or None,
            "clusterRule": self.cluster_rule,
            "localRule": self.local_rule,
            "hintsSkipped": list(self.hints_skipped),
            "internal": self.internal,
            "external": self.external or None,
            "endpoints": [e.to_json() for e in self.endpoints],
            "kernelObjects": [o.to_json() for o in self.objects],
        }


@dataclass(frozen=True, slots=True)
class ServiceTable:
    node: str
    zone: str
    mode: str
    source: str  # "state", "api" or "daemon"
    ports: tuple[PortStatus, ...]
    last_sync: str | None = None  # RFC 3339, the daemon's last successful sync
    families: tuple[int, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "zone": self.zone,
            "mode": self.mode,
            "source": self.source,
            "lastSync": self.last_sync,
            "families": list(self.families),
            "servicePorts": [p.to_json() for p in self.ports],
        }


# -- building ------------------------------------------------------------------------------------


def _unused(ep: Endpoint, sets: EndpointSets) -> Unused:
    if not ep.ready and not (ep.serving and ep.terminating):
        return Unused.NOT_SERVING
    if not ep.ready:
        return Unused.TERMINATING
    if sets.cluster_rule is Selection.NODE_HINTS:
        return Unused.OTHER_NODE_HINT
    if sets.cluster_rule is Selection.ZONE_HINTS:
        return Unused.OTHER_ZONE_HINT
    # Left: a ready endpoint outside every hint rule, so the cluster set is unused (iTP Local, not
    # externally reachable) and the endpoint is not this node's (a ready local one is in the set).
    return Unused.NOT_LOCAL


def _verdict(chosen: tuple[Endpoint, ...], has_any: bool) -> str:
    if chosen:
        return FORWARD
    return DROP if has_any else REJECT


def port_status(
    svc: ServicePort, eps: tuple[Endpoint, ...], ctx: NodeContext, objects: Iterable[KernelObject] = ()
) -> PortStatus:
    """One Service port of one family as this node proxies it."""
    sets = categorize(eps, svc, ctx.node_name, ctx.zone)
    cluster = {ep.addr for ep in sets.cluster}
    local = {ep.addr for ep in sets.local}
    endpoints = []
    for ep in eps:
        in_cluster, in_local = ep.addr in cluster, ep.addr in local
        rules = [r.value for r, on in ((sets.cluster_rule, in_cluster), (sets.local_rule, in_local)) if on]
        why = ", ".join(rules) if rules else _unused(ep, sets).value
        endpoints.append(
            EndpointStatus(
                ep.ip,
                ep.port,
                ep.ready,
                ep.serving,
                ep.terminating,
                ep.node_name,
                ep.zone,
                tuple(sorted(ep.zone_hints)),
                tuple(sorted(ep.node_hints)),
                in_cluster,
                in_local,
                why,
            )
        )
    internal = _verdict(sets.local if svc.internal_policy_local else sets.cluster, sets.has_any)
    external = ""
    if svc.externally_accessible:
        external = _verdict(sets.local if svc.external_policy_local else sets.cluster, sets.has_any)
    return PortStatus(
        family=ctx.family,
        name=svc.name,
        port=svc.port,
        cluster_ips=svc.cluster_ips,
        external_ips=svc.external_ips,
        lb_ips=svc.lb_ips,
        lb_source_ranges=svc.lb_source_ranges,
        node_port=svc.node_port,
        health_check_node_port=svc.health_check_node_port,
        internal_policy="Local" if svc.internal_policy_local else "Cluster",
        external_policy=("Local" if svc.external_policy_local else "Cluster") if svc.externally_accessible else "",
        traffic_distribution=svc.traffic_distribution.value,
        affinity_timeout=svc.affinity_timeout,
        cluster_rule=sets.cluster_rule.value,
        local_rule=sets.local_rule.value,
        hints_skipped=tuple(h.value for h in sets.hints_skipped),
        internal=internal,
        external=external,
        endpoints=tuple(endpoints),
        objects=tuple(objects),
    )


Describe = Callable[[FamilyView, NodeContext], Mapping[ServicePortName, Sequence[KernelObject]]]


def service_key(text: str) -> tuple[str, str] | None:
    """``NAMESPACE/NAME`` as (namespace, name), or None when it is not that."""
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        return None
    return namespace, name


def narrowed(view: FamilyView, service: tuple[str, str] | None) -> FamilyView:
    """The view of one Service (namespace, name), or the whole view for None."""
    if service is None:
        return view
    ports = {n: p for n, p in view.ports.items() if n.service_key == service}
    return FamilyView(ports, {n: e for n, e in view.endpoints.items() if n in ports})


def service_table(
    families: Mapping[IPFamily, tuple[FamilyView, NodeContext]],
    describe: Describe,
    *,
    mode: str,
    source: str,
    service: tuple[str, str] | None = None,
    last_sync: str | None = None,
) -> ServiceTable:
    """Every Service port of every family (or of one Service), in name order, IPv4 first."""
    ports: list[PortStatus] = []
    node, zone = "", ""
    for family in sorted(families):
        view, ctx = families[family]
        node, zone = ctx.node_name, ctx.zone or zone
        view = narrowed(view, service)
        objects = describe(view, ctx)
        for name in sorted(view.ports):
            ports.append(port_status(view.ports[name], view.endpoints.get(name, ()), ctx, objects.get(name, ())))
    return ServiceTable(node, zone, mode, source, tuple(ports), last_sync, tuple(int(f) for f in sorted(families)))


def only_service(table: Mapping[str, Any], service: tuple[str, str] | None) -> dict[str, Any]:
    """The JSON form narrowed to one Service (what `--service` does to a daemon's answer)."""
    out = dict(table)
    if service is not None:
        out["servicePorts"] = [
            p for p in table.get("servicePorts", ()) if (p.get("namespace"), p.get("name")) == service
        ]
    return out


def expected_objects(table: Mapping[str, Any]) -> dict[int, list[KernelObject]]:
    """The kernel objects of the JSON form, per family: what `--check` looks for."""
    out: dict[int, list[KernelObject]] = {int(f): [] for f in table.get("families", ())}
    for p in table.get("servicePorts", ()):
        out.setdefault(int(p["family"]), []).extend(KernelObject.from_json(o) for o in p.get("kernelObjects", ()))
    return out


# -- text ----------------------------------------------------------------------------------------


def _fit(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _wrapped(label: str, items: Sequence[str], width: int = WIDTH) -> list[str]:
    """`label` then `items` separated by commas, continued on indented lines past `width`."""
    indent = " " * len(label)
    lines, line = [], label
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and line != label and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = indent + piece
        else:
            line = line + ("" if line == label else " ") + piece
    lines.append(line)
    return lines


def _yes(v: bool) -> str:
    return "y" if v else "n"


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _traffic(p: Mapping[str, Any], which: str) -> str:
    verdict = p[which]
    if verdict == FORWARD:
        used = (
            "local"
            if p["internalTrafficPolicy" if which == "internal" else "externalTrafficPolicy"] == "Local"
            else "cluster"
        )
        n = sum(1 for e in p["endpoints"] if used in e["usedFor"])
        rule = p["localRule"] if used == "local" else p["clusterRule"]
        return f"forward to {n} of {len(p['endpoints'])} endpoints ({rule})"
    if verdict == DROP:
        return "DROP (no endpoint on this node for a Local policy)"
    return "REJECT (no usable endpoint anywhere)"


def _port_lines(p: Mapping[str, Any]) -> list[str]:
    family = "IPv6" if p["family"] == 6 else "IPv4"
    head = f"{p['namespace']}/{p['name']}" + (f":{p['portName']}" if p["portName"] else "")
    lines = [f"{head}  {p['protocol']} {family}"]
    vips = [f"{_addr(ip, p['port'])} (cluster)" for ip in p["clusterIPs"]]
    vips += [f"{_addr(ip, p['port'])} (external)" for ip in p["externalIPs"]]
    vips += [f"{_addr(ip, p['port'])} (LB)" for ip in p["loadBalancerIPs"]]
    if p["nodePort"]:
        vips.append(f"node port {p['nodePort']}")
    lines += _wrapped("  addresses  ", vips)
    if p["loadBalancerSourceRanges"]:
        lines += _wrapped("  LB sources ", p["loadBalancerSourceRanges"])
    policy = f"internal {p['internalTrafficPolicy']}"
    if p["externalTrafficPolicy"]:
        policy += f", external {p['externalTrafficPolicy']}"
        if p["healthCheckNodePort"]:
            policy += f" (health check {p['healthCheckNodePort']})"
    policy += f"; distribution {p['trafficDistribution'] or '-'}"
    timeout = p["sessionAffinityTimeoutSeconds"]
    policy += f"; affinity {'ClientIP ' + str(timeout) + 's' if timeout else 'None'}"
    lines.append("  policies   " + policy)
    lines.append("  internal   " + _traffic(p, "internal"))
    if p["external"]:
        lines.append("  external   " + _traffic(p, "external"))
    rules = f"cluster set: {p['clusterRule']}; local set: {p['localRule']}"
    if p["hintsSkipped"]:
        rules += "; hints passed over: " + ", ".join(p["hintsSkipped"])
    lines.append("  chosen by  " + rules)
    if p["endpoints"]:
        # R S T: ready, serving, terminating (the EndpointSlice conditions), y or n.
        rows = [("ENDPOINT", "R S T", "NODE", "ZONE", "HINTS", "USED", "WHY")]
        for e in p["endpoints"]:
            hints = "/".join(x for x in (",".join(e["hints"]["forNodes"]), ",".join(e["hints"]["forZones"])) if x)
            rows.append(
                (
                    _addr(e["ip"], e["port"]),
                    " ".join(_yes(e[c]) for c in ("ready", "serving", "terminating")),
                    e["node"] or "-",
                    e["zone"] or "-",
                    hints or "-",
                    "+".join(e["usedFor"]) or "no",
                    e["why"],
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines.append("  endpoints  (R S T: ready, serving, terminating)")
        for r in rows:
            lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    else:
        lines.append("  endpoints  none")
    if p["kernelObjects"]:
        lines.append("  kernel")
        lines += ["    " + str(KernelObject.from_json(o)) for o in p["kernelObjects"]]
    return [_fit(line.rstrip()) for line in lines]


def text(table: Mapping[str, Any]) -> str:
    """The terminal form: a header, then one block per Service port."""
    where = {"daemon": "kproxy run", "state": "state files", "api": "the API server"}.get(
        table["source"], table["source"]
    )
    head = f"node {table['node'] or '?'}"
    if table["zone"]:
        head += f" (zone {table['zone']})"
    head += f", mode {table['mode']}, from {where}"
    if table.get("lastSync"):
        head += f", last sync {table['lastSync']}"
    lines = [_fit(head)]
    ports = table["servicePorts"]
    if not ports:
        lines.append("no Service ports")
    for p in ports:
        lines.append("")
        lines += _port_lines(p)
    return "\n".join(lines) + "\n"
