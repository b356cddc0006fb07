"""Gateway API objects → Gateway servers of the routing table, and the status of each object (pure).

Input: GatewayClasses, Gateways, HTTPRoutes (gateway.networking.k8s.io/v1), ReferenceGrants
(v1beta1), Namespaces (for ``allowedRoutes`` selectors) and Secrets as raw dicts, Services as
`kproxy.model.Service`. Output: `GatewayResult` — `Server`s keyed by (listener port, host) whose
routes carry an HTTPRoute match (`Route.action`), the wanted ``status`` of every object we own
(conditions without ``lastTransitionTime``; the controller keeps the old time when a condition
did not change), and `Reason`s.

Guarantees:
- Pure and deterministic; input order never changes the result.
- Ours: GatewayClasses whose ``spec.controllerName`` is ours, the Gateways of those classes, and
  the parentRefs of HTTPRoutes naming those Gateways. Nothing else gets status from us.
- Listener selection and hostname intersection as the Gateway API defines them: a request goes
  to the most specific listener hostname on its port (exact, then the longest wildcard, where
  ``*.example.com`` covers any number of labels, then no hostname), and there to every route
  attached to that listener whose (intersected) hostnames cover the request's host.
- Precedence (`Route.gateway_key`): matching precise hostname length, hostname length, Exact
  path, longest prefix, method, most header matches, most query matches, oldest route,
  namespace/name, rule index, match index.
- What kproxy does not support is never silently dropped: the HTTPRoute's parent gets
  ``Accepted=False`` reason ``UnsupportedValue`` with a message naming the field, and none of
  its rules are served there. An invalid backend keeps the rule and answers 500 for its share.
- Everything a user wrote is validated against a strict grammar here; the renderer quotes it
  again (two independent fences, as for Ingress).
- Ingress and Gateway on one nginx: a (port, host) that an Ingress serves on the Ingress HTTP
  or HTTPS port stays the Ingress's (see `combine`), so creating converted HTTPRoutes next to
  the Ingresses changes nothing until the Ingress rule is removed; the HTTPRoute gets a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kproxy.ingress.convert import _meta, _safe, tls_certificate
from kproxy.ingress.model import (
    Backend,
    BackendRef,
    Conditions,
    GatewayAction,
    HeaderEdits,
    IngressRef,
    PathEdit,
    PathType,
    Reason,
    Redirect,
    Route,
    RoutingTable,
    Server,
    ServerTLS,
    WeightedBackend,
    ingress_age_key,
)
from kproxy.model import Protocol, Service, ServiceType

GROUP = "gateway.networking.k8s.io"
DEFAULT_GATEWAY_CONTROLLER = "kproxy.io/gateway-controller"
MAX_CANDIDATES = 70  # per nginx location: one error_page code each (520..589)

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    kind: str
    namespace: str  # "" for GatewayClass
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    controller: str = DEFAULT_GATEWAY_CONTROLLER
    addresses: tuple[str, ...] = ()  # the edge nodes' addresses, for Gateway status
    ingress_http_port: int | None = 80  # listener ports the Ingress servers already use
    ingress_https_port: int | None = 443


@dataclass(frozen=True, slots=True)
class GatewayResult:
    servers: tuple[Server, ...] = ()
    statuses: tuple[tuple[ObjectKey, Any], ...] = ()  # wanted status (a dict) per owned object
    reasons: tuple[Reason, ...] = ()

    def status(self, kind: str, namespace: str, name: str) -> Any:
        return dict(self.statuses).get(ObjectKey(kind, namespace, name))


def condition(type_: str, ok: bool, reason: str, message: str = "", generation: int = 0) -> Obj:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


# --- grammar -------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)(?:\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_PATH = re.compile(r"/[A-Za-z0-9/_.~@:+,=-]{0,1023}")
# $http_<name> variables exist only for names of letters, digits and "-" (nginx also drops
# headers with "_" by default), so those are the header names kproxy can match and edit.
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,255}")
_QUERY_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,256}")
_DURATION = re.compile(r"(?:[0-9]{1,5}(?:h|m|s|ms)){1,4}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_HOP_BY_HOP = frozenset({"connection", "upgrade", "proxy", "keep-alive", "transfer-encoding", "te"})


class Unsupported(ValueError):
    """A field kproxy does not serve (→ Accepted=False, UnsupportedValue); `field` names it."""

    def __init__(self, field_: str, message: str) -> None:
        super().__init__(f"{field_}: {message}")
        self.field = field_
        self.message = message


def _text(v: Any, f: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or not v or len(v) > limit or not (v.isascii() and v.isprintable()):
        raise Unsupported(f, f"{_safe(v)!r} must be 1..{limit} printable ASCII characters")
    return v


def _hostname(v: Any, f: str, wildcard: bool = True) -> str:
    if not isinstance(v, str) or not _HOSTNAME.fullmatch(v) or (v.startswith("*") and not wildcard):
        raise Unsupported(f, f"{_safe(v)!r} is not a {'(wildcard) ' if wildcard else ''}DNS hostname")
    if re.fullmatch(r"[0-9.]+", v):
        raise Unsupported(f, "an IP address is not a hostname")
    return v


def _path(v: Any, f: str) -> str:
    if not isinstance(v, str) or not _PATH.fullmatch(v):
        raise Unsupported(f, f"{_safe(v)!r} is not an absolute path of [A-Za-z0-9/_.~@:+,=-]")
    if "//" in v or any(s in (".", "..") for s in v.split("/")[1:]):
        raise Unsupported(f, "path has empty, '.' or '..' segments (nginx matches normalized paths)")
    return v


def _duration_ms(v: Any, f: str) -> int:
    if not isinstance(v, str) or not _DURATION.fullmatch(v):
        raise Unsupported(f, f"{_safe(v)!r} is not a Gateway API duration like 10s or 1m30s")
    total = 0
    for n, unit in re.findall(r"([0-9]+)(h|ms|m|s)", v):
        total += int(n) * {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}[unit]
    return total


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _generation(obj: Mapping[str, Any]) -> int:
    g = _map(obj.get("metadata")).get("generation")
    return g if isinstance(g, int) and not isinstance(g, bool) else 0


# --- hostnames -----------------------------------------------------------------------------


def covers(pattern: str | None, host: str) -> bool:
    """A listener or route hostname (None: any) covers `host` (precise or wildcard)."""
    if pattern is None or pattern == host:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix) and host[: -len(suffix)] != "*"
    return False


def intersect(listener: str | None, route_hosts: tuple[str, ...]) -> tuple[str | None, ...]:
    """The hostnames a route serves through a listener (spec: hostname intersection)."""
    if not route_hosts:
        return (listener,)
    if listener is None:
        return route_hosts
    out: list[str | None] = []
    for h in route_hosts:
        if covers(listener, h):
            out.append(h)  # the route's is at least as specific
        elif covers(h, listener):
            out.append(listener)
    return tuple(dict.fromkeys(out))


# --- parsed objects ------------------------------------------------------------------------


@dataclass(slots=True)
class _Listener:
    gateway: ObjectKey
    index: int
    name: str
    hostname: str | None
    port: int
    protocol: str
    tls: ServerTLS | None = None
    allowed_from: str = "Same"
    selector: Mapping[str, Any] = field(default_factory=dict)
    conditions: dict[str, Obj] = field(default_factory=dict)
    supported_kinds: list[Obj] = field(default_factory=list)
    attached: set[ObjectKey] = field(default_factory=set)

    @property
    def valid(self) -> bool:
        c = self.conditions
        return bool(
            c["Accepted"]["status"] == "True"
            and c["Conflicted"]["status"] == "False"
            and c["ResolvedRefs"]["status"] == "True"
        )


@dataclass(slots=True)
class _Gateway:
    key: ObjectKey
    obj: Mapping[str, Any]
    age: Any
    listeners: list[_Listener] = field(default_factory=list)
    unsupported: str = ""


@dataclass(frozen=True, slots=True)
class _Match:
    rule: int
    index: int
    path_type: PathType
    path: str
    conditions: Conditions
    action: GatewayAction


@dataclass(frozen=True, slots=True)
class _Attachment:
    route: ObjectKey
    age: Any
    listener: _Listener
    hostname: str | None
    matches: tuple[_Match, ...]


class _Grants:
    def __init__(self, grants: Iterable[Mapping[str, Any]]) -> None:
        self._g: list[tuple[str, list[Mapping[str, Any]], list[Mapping[str, Any]]]] = []
        for g in grants:
            meta, spec = _map(g.get("metadata")), _map(g.get("spec"))
            ns = meta.get("namespace")
            if isinstance(ns, str):
                self._g.append(
                    (ns, [_map(x) for x in _list(spec.get("from"))], [_map(x) for x in _list(spec.get("to"))])
                )

    def allows(self, from_kind: str, from_ns: str, to_group: str, to_kind: str, to_ns: str, to_name: str) -> bool:
        if from_ns == to_ns:
            return True
        for ns, frm, to in self._g:
            if ns != to_ns:
                continue
            if not any(
                f.get("group") == GROUP and f.get("kind") == from_kind and f.get("namespace") == from_ns for f in frm
            ):
                continue
            if any(
                (t.get("group") or "") == to_group
                and t.get("kind") == to_kind
                and (not t.get("name") or t.get("name") == to_name)
                for t in to
            ):
                return True
        return False


def _selector_matches(sel: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for k, v in _map(sel.get("matchLabels")).items():
        if labels.get(k) != v:
            return False
    for e in _list(sel.get("matchExpressions")):
        e = _map(e)
        key, op, values = e.get("key"), e.get("operator"), _list(e.get("values"))
        if op == "In" and labels.get(str(key)) not in values:
            return False
        if op == "NotIn" and labels.get(str(key)) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


# --- the conversion ------------------------------------------------------------------------


def build_gateway(
    gateway_classes: Iterable[Mapping[str, Any]],
    gateways: Iterable[Mapping[str, Any]],
    routes: Iterable[Mapping[str, Any]],
    services: Iterable[Service],
    secrets: Iterable[Mapping[str, Any]] = (),
    reference_grants: Iterable[Mapping[str, Any]] = (),
    namespaces: Iterable[Mapping[str, Any]] = (),
    options: GatewayOptions = GatewayOptions(),
) -> GatewayResult:
    """See the module docstring."""
    statuses: dict[ObjectKey, Any] = {}
    reasons: list[Reason] = []
    grants = _Grants(reference_grants)
    svc_index = {s.key: s for s in services}
    secret_index = {
        (str(_map(s.get("metadata")).get("namespace", "default")), str(_map(s.get("metadata")).get("name"))): s
        for s in secrets
        if isinstance(s, Mapping)
    }
    ns_labels = {
        str(_map(n.get("metadata")).get("name")): {
            str(k): str(v) for k, v in _map(_map(n.get("metadata")).get("labels")).items()
        }
        for n in namespaces
        if isinstance(n, Mapping)
    }

    mine: set[str] = set()
    for gc in gateway_classes:
        meta, spec = _map(gc.get("metadata")), _map(gc.get("spec"))
        name = meta.get("name")
        if not isinstance(name, str) or spec.get("controllerName") != options.controller:
            continue
        mine.add(name)
        statuses[ObjectKey("GatewayClass", "", name)] = {
            "conditions": [condition("Accepted", True, "Accepted", "served by kproxy", _generation(gc))]
        }

    gws: dict[tuple[str, str], _Gateway] = {}
    for obj in gateways:
        spec = _map(obj.get("spec"))
        if spec.get("gatewayClassName") not in mine:
            continue
        try:
            ref, created = _meta(obj)
        except Exception:  # noqa: BLE001 - a malformed name is not ours to judge further
            continue
        key = ObjectKey("Gateway", ref.namespace, ref.name)
        gws[(ref.namespace, ref.name)] = _Gateway(key, obj, ingress_age_key(created, ref))
    ordered = sorted(gws.values(), key=lambda g: g.age)
    claimed_ports: dict[int, tuple[str, ObjectKey]] = {}
    for gw in ordered:
        _listeners(gw, secret_index, grants, options, claimed_ports)

    # Routes, oldest first.
    parsed: list[tuple[Any, IngressRef, Mapping[str, Any]]] = []
    for obj in routes:
        try:
            ref, created = _meta(obj)
        except Exception:  # noqa: BLE001
            continue
        ref = IngressRef(ref.namespace, ref.name, "HTTPRoute")
        parsed.append((ingress_age_key(created, ref), ref, obj))
    parsed.sort(key=lambda t: t[0])

    attachments: list[_Attachment] = []
    for age, ref, obj in parsed:
        key = ObjectKey("HTTPRoute", ref.namespace, ref.name)
        spec = _map(obj.get("spec"))
        gen = _generation(obj)
        problem: Unsupported | None = None
        host_list: tuple[str, ...] = ()
        matches: tuple[_Match, ...] = ()
        resolved: tuple[str, str] = ("ResolvedRefs", "all references resolved")
        try:
            host_list = tuple(_hostname(h, f"spec.hostnames[{i}]") for i, h in enumerate(_list(spec.get("hostnames"))))
            matches, resolved = _rules(ref, spec, svc_index, grants, reasons)
        except Unsupported as e:
            problem = e
        parents = []
        for pr in _list(spec.get("parentRefs")):
            pr = _map(pr)
            if (pr.get("group", GROUP) or "") != GROUP or pr.get("kind", "Gateway") != "Gateway":
                continue
            gw_ns = pr.get("namespace") or ref.namespace
            parent = gws.get((str(gw_ns), str(pr.get("name"))))
            if parent is None:
                continue
            conds = _attach(ref, age, pr, parent, host_list, matches, problem, ns_labels, attachments, reasons)
            conds.append(condition("ResolvedRefs", resolved[0] == "ResolvedRefs", resolved[0], resolved[1], gen))
            for c in conds:
                c["observedGeneration"] = gen
            parents.append(
                {
                    "parentRef": _parent_ref(pr, ref.namespace),
                    "controllerName": options.controller,
                    "conditions": conds,
                }
            )
            if problem is not None:
                reasons.append(Reason(str(ref), problem.field, problem.message + "; not served"))
        if parents:
            statuses[key] = {"parents": parents}

    servers = _servers(attachments, ordered, reasons)
    for gw in ordered:
        statuses[gw.key] = _gateway_status(gw, options)
    return GatewayResult(
        servers=servers,
        statuses=tuple(sorted(statuses.items(), key=lambda kv: kv[0])),
        reasons=tuple(sorted(set(reasons), key=lambda r: (r.ref, r.field, r.message))),
    )


def _parent_ref(pr: Mapping[str, Any], route_ns: str) -> Obj:
    out: Obj = {"group": GROUP, "kind": "Gateway", "namespace": pr.get("namespace") or route_ns, "name": pr.get("name")}
    for k in ("sectionName", "port"):
        if pr.get(k) is not None:
            out[k] = pr[k]
    return out


def _listeners(
    gw: _Gateway,
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
    grants: _Grants,
    options: GatewayOptions,
    claimed_ports: dict[int, tuple[str, ObjectKey]],
) -> None:
    spec = _map(gw.obj.get("spec"))
    gen = _generation(gw.obj)
    addrs = [_map(a).get("value") for a in _list(spec.get("addresses"))]
    if any(a not in options.addresses for a in addrs):
        gw.unsupported = "spec.addresses: kproxy serves on the edge nodes' addresses only: " + ", ".join(
            _safe(a) for a in addrs if a not in options.addresses
        )
    seen: dict[tuple[int, str | None], str] = {}
    for i, raw in enumerate(_list(spec.get("listeners"))):
        raw = _map(raw)
        name = str(raw.get("name") or f"listener-{i}")
        port = raw.get("port")
        protocol = str(raw.get("protocol") or "")
        hostname = raw.get("hostname") or None
        ls = _Listener(gw.key, i, name, None, port if isinstance(port, int) else 0, protocol)
        accepted: tuple[bool, str, str] = (True, "Accepted", "")
        resolved: tuple[bool, str, str] = (True, "ResolvedRefs", "")
        conflicted: tuple[bool, str, str] = (False, "NoConflicts", "")
        try:
            if hostname is not None:
                ls.hostname = _hostname(hostname, f"spec.listeners[{i}].hostname")
        except Unsupported as e:
            accepted = (False, "UnsupportedValue", e.message)
        if protocol not in ("HTTP", "HTTPS"):
            accepted = (False, "UnsupportedProtocol", f"protocol {_safe(protocol)!r}: kproxy serves HTTP and HTTPS")
        elif not 0 < ls.port < 65536:
            accepted = (False, "PortUnavailable", "port out of range")
        allowed = _map(raw.get("allowedRoutes"))
        frm = _map(allowed.get("namespaces"))
        ls.allowed_from = str(frm.get("from") or "Same")
        ls.selector = _map(frm.get("selector"))
        kinds = _list(allowed.get("kinds"))
        if kinds:
            ok = [
                k
                for k in map(_map, kinds)
                if (k.get("group", GROUP) or GROUP) == GROUP and k.get("kind") == "HTTPRoute"
            ]
            if len(ok) != len(kinds):
                resolved = (False, "InvalidRouteKinds", "kproxy serves HTTPRoute only")
            ls.supported_kinds = [{"group": GROUP, "kind": "HTTPRoute"}] if ok else []
        else:
            ls.supported_kinds = [{"group": GROUP, "kind": "HTTPRoute"}]
        if protocol == "HTTPS" and accepted[0]:
            tls = _map(raw.get("tls"))
            if (tls.get("mode") or "Terminate") != "Terminate":
                accepted = (False, "UnsupportedValue", "tls.mode Passthrough is not supported")
            else:
                ls.tls, problem = _listener_tls(gw.key, i, tls, secrets, grants)
                if problem:
                    resolved = (False, problem[0], problem[1])
        if accepted[0]:
            # One nginx: a port speaks one protocol, and the Ingress ports keep theirs.
            want_tls = protocol == "HTTPS"
            ing = {options.ingress_http_port: False, options.ingress_https_port: True}
            if ls.port in ing and ing[ls.port] != want_tls:
                conflicted = (
                    True,
                    "ProtocolConflict",
                    f"port {ls.port} serves Ingress {'HTTPS' if ing[ls.port] else 'HTTP'}",
                )
            prev = claimed_ports.get(ls.port)
            if prev is not None and prev[0] != protocol:
                conflicted = (True, "ProtocolConflict", f"port {ls.port} is {prev[0]} on {prev[1]}")
            elif (ls.port, ls.hostname) in seen:
                conflicted = (
                    True,
                    "HostnameConflict",
                    f"same port and hostname as listener {seen[(ls.port, ls.hostname)]}",
                )
            if not conflicted[0]:
                claimed_ports.setdefault(ls.port, (protocol, gw.key))
                seen[(ls.port, ls.hostname)] = name
        programmed = accepted[0] and not conflicted[0] and resolved[0]
        ls.conditions = {
            "Accepted": condition("Accepted", accepted[0], accepted[1], accepted[2], gen),
            "Conflicted": condition("Conflicted", conflicted[0], conflicted[1], conflicted[2], gen),
            "ResolvedRefs": condition("ResolvedRefs", resolved[0], resolved[1], resolved[2], gen),
            "Programmed": condition(
                "Programmed",
                programmed,
                "Programmed" if programmed else "Invalid",
                "" if programmed else "not served",
                gen,
            ),
        }
        gw.listeners.append(ls)


def _listener_tls(
    gw: ObjectKey,
    i: int,
    tls: Mapping[str, Any],
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
    grants: _Grants,
) -> tuple[ServerTLS | None, tuple[str, str] | None]:
    refs = _list(tls.get("certificateRefs"))
    if not refs:
        return None, ("InvalidCertificateRef", "an HTTPS listener needs certificateRefs")
    r = _map(refs[0])
    if (r.get("group") or "") != "" or (r.get("kind") or "Secret") != "Secret":
        return None, ("InvalidCertificateRef", "certificateRefs must name a core Secret")
    ns, name = str(r.get("namespace") or gw.namespace), str(r.get("name") or "")
    if not grants.allows("Gateway", gw.namespace, "", "Secret", ns, name):
        return None, ("RefNotPermitted", f"Secret {ns}/{_safe(name)} in another namespace needs a ReferenceGrant")
    owner = IngressRef(gw.namespace, gw.name, "Gateway")
    obj = secrets.get((ns, name))
    if obj is None:
        return ServerTLS(ns, name, owner, None, "not found"), (
            "InvalidCertificateRef",
            f"Secret {ns}/{_safe(name)} not found",
        )
    try:
        cert = tls_certificate(obj)
    except ValueError as e:
        return ServerTLS(ns, name, owner, None, str(e)), ("InvalidCertificateRef", f"Secret {ns}/{name}: {e}")
    return ServerTLS(ns, name, owner, replace(cert, secret_namespace=ns, secret_name=name)), None


def _attach(
    ref: IngressRef,
    age: Any,
    pr: Mapping[str, Any],
    gw: _Gateway,
    hosts: tuple[str, ...],
    matches: tuple[_Match, ...],
    problem: Unsupported | None,
    ns_labels: Mapping[str, Mapping[str, str]],
    out: list[_Attachment],
    reasons: list[Reason],
) -> list[Obj]:
    key = ObjectKey("HTTPRoute", ref.namespace, ref.name)
    section, port = pr.get("sectionName"), pr.get("port")
    cands = [ls for ls in gw.listeners if (section is None or ls.name == section) and (port is None or ls.port == port)]
    if not cands:
        return [condition("Accepted", False, "NoMatchingParent", "no listener with that sectionName/port")]

    def allowed(ls: _Listener) -> bool:
        if not ls.supported_kinds:
            return False
        if ls.allowed_from == "All":
            return True
        if ls.allowed_from == "Same":
            return ref.namespace == gw.key.namespace
        if ls.allowed_from == "Selector":
            return _selector_matches(ls.selector, ns_labels.get(ref.namespace, {}))
        return False

    cands = [ls for ls in cands if allowed(ls)]
    if not cands:
        return [condition("Accepted", False, "NotAllowedByListeners", "no listener allows this route")]
    with_hosts = [(ls, intersect(ls.hostname, hosts)) for ls in cands]
    with_hosts = [(ls, h) for ls, h in with_hosts if h]
    if not with_hosts:
        return [condition("Accepted", False, "NoMatchingListenerHostname", "no listener hostname intersects")]
    if problem is not None:
        return [condition("Accepted", False, "UnsupportedValue", f"{problem.field}: {problem.message}")]
    if gw.unsupported:
        return [condition("Accepted", False, "NotAllowedByListeners", "the Gateway is not accepted")]
    valid = [(ls, h) for ls, h in with_hosts if ls.valid]
    if not valid:
        return [condition("Accepted", False, "NotAllowedByListeners", "every matching listener is invalid")]
    for ls, hs in valid:
        ls.attached.add(key)
        for h in hs:
            out.append(_Attachment(key, age, ls, h, matches))
    return [condition("Accepted", True, "Accepted", "")]


def _gateway_status(gw: _Gateway, options: GatewayOptions) -> Obj:
    gen = _generation(gw.obj)
    valid = [ls for ls in gw.listeners if ls.valid]
    if gw.unsupported:
        accepted = condition("Accepted", False, "UnsupportedAddress", gw.unsupported, gen)
    elif not gw.listeners or not valid:
        accepted = condition("Accepted", False, "ListenersNotValid", "no valid listener", gen)
    elif len(valid) < len(gw.listeners):
        accepted = condition("Accepted", True, "ListenersNotValid", "some listeners are invalid", gen)
    else:
        accepted = condition("Accepted", True, "Accepted", "", gen)
    if accepted["status"] != "True":
        programmed = condition("Programmed", False, "Invalid", "not accepted", gen)
    elif not options.addresses:
        programmed = condition("Programmed", False, "AddressNotAssigned", "no edge node address yet", gen)
    else:
        programmed = condition("Programmed", True, "Programmed", "", gen)
    addresses = []
    for a in options.addresses:
        is_ip = bool(re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", a))
        addresses.append({"type": "IPAddress" if is_ip else "Hostname", "value": a})
    return {
        "addresses": addresses,
        "conditions": [accepted, programmed],
        "listeners": [
            {
                "name": ls.name,
                "supportedKinds": ls.supported_kinds,
                "attachedRoutes": len(ls.attached),
                "conditions": [ls.conditions[t] for t in ("Accepted", "Conflicted", "ResolvedRefs", "Programmed")],
            }
            for ls in gw.listeners
        ],
    }


# --- rules ---------------------------------------------------------------------------------


def _rules(
    ref: IngressRef,
    spec: Mapping[str, Any],
    services: Mapping[tuple[str, str], Service],
    grants: _Grants,
    reasons: list[Reason],
) -> tuple[tuple[_Match, ...], tuple[str, str]]:
    out: list[_Match] = []
    resolved = ("ResolvedRefs", "all references resolved")
    for ri, rule in enumerate(_list(spec.get("rules"))):
        rule = _map(rule)
        f = f"spec.rules[{ri}]"
        for unsupported in ("sessionPersistence", "retry"):
            if rule.get(unsupported) is not None:
                raise Unsupported(f"{f}.{unsupported}", "not supported by kproxy")
        action = GatewayAction(rule=ri)
        timeouts = _map(rule.get("timeouts"))
        if timeouts:
            eff = timeouts.get("backendRequest", timeouts.get("request"))
            if eff is not None:
                action = replace(action, timeout_ms=_duration_ms(eff, f"{f}.timeouts"))
        action = _filters(f, _list(rule.get("filters")), action)
        backends: list[WeightedBackend] = []
        for bi, b in enumerate(_list(rule.get("backendRefs"))):
            wb, why = _backend_ref(ref, f"{f}.backendRefs[{bi}]", _map(b), services, grants)
            backends.append(wb)
            if why is not None:
                reasons.append(Reason(str(ref), f"{f}.backendRefs[{bi}]", why[1] + "; its share answers 500"))
                if resolved[0] == "ResolvedRefs":
                    resolved = why
        action = replace(action, backends=tuple(backends))
        raw_matches = _list(rule.get("matches")) or [{}]
        for mi, m in enumerate(raw_matches):
            out.append(_match(f"{f}.matches[{mi}]", ri, mi, _map(m), action))
    return tuple(out), resolved


def _match(f: str, ri: int, mi: int, m: Mapping[str, Any], action: GatewayAction) -> _Match:
    p = _map(m.get("path")) if m.get("path") is not None else {"type": "PathPrefix", "value": "/"}
    ptype = p.get("type", "PathPrefix")
    if ptype not in ("Exact", "PathPrefix"):
        raise Unsupported(f"{f}.path.type", f"{_safe(ptype)!r}: kproxy supports Exact and PathPrefix")
    path = _path(p.get("value", "/"), f"{f}.path.value")
    if ptype == "PathPrefix":
        path = path.rstrip("/") or "/"  # "a trailing / is ignored"
    method = m.get("method")
    if method is not None and method not in _METHODS:
        raise Unsupported(f"{f}.method", f"{_safe(method)!r} is not an HTTP method")
    headers: dict[str, str] = {}
    for hi, h in enumerate(_list(m.get("headers"))):
        h = _map(h)
        if (h.get("type") or "Exact") != "Exact":
            raise Unsupported(f"{f}.headers[{hi}].type", "kproxy supports Exact header matches only")
        name = h.get("name")
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise Unsupported(
                f"{f}.headers[{hi}].name", f"{_safe(name)!r}: kproxy matches names of letters, digits and '-'"
            )
        headers.setdefault(name.lower(), _text(h.get("value"), f"{f}.headers[{hi}].value"))  # first wins
    query: dict[str, str] = {}
    for qi, q in enumerate(_list(m.get("queryParams"))):
        q = _map(q)
        if (q.get("type") or "Exact") != "Exact":
            raise Unsupported(f"{f}.queryParams[{qi}].type", "kproxy supports Exact query matches only")
        name = q.get("name")
        if not isinstance(name, str) or not _QUERY_NAME.fullmatch(name):
            raise Unsupported(f"{f}.queryParams[{qi}].name", f"{_safe(name)!r} is not a query parameter name")
        query.setdefault(name, _text(q.get("value"), f"{f}.queryParams[{qi}].value", 1024))
    conditions = Conditions(method=method, headers=tuple(sorted(headers.items())), query=tuple(sorted(query.items())))
    ptype_model = PathType.EXACT if ptype == "Exact" else PathType.PREFIX
    for edit, where in (
        (action.rewrite_path, "URLRewrite"),
        (action.redirect.path if action.redirect else None, "RequestRedirect"),
    ):
        if edit is not None and edit.kind == "ReplacePrefixMatch" and ptype_model is not PathType.PREFIX:
            raise Unsupported(f"{f}.path", f"{where} ReplacePrefixMatch needs a PathPrefix match")
    if action.rewrite_path is not None and action.rewrite_path.kind == "ReplacePrefixMatch":
        action = replace(action, rewrite_path=replace(action.rewrite_path, prefix=path))
    if (
        action.redirect is not None
        and action.redirect.path is not None
        and action.redirect.path.kind == "ReplacePrefixMatch"
    ):
        action = replace(action, redirect=replace(action.redirect, path=replace(action.redirect.path, prefix=path)))
    return _Match(ri, mi, ptype_model, path, conditions, replace(action, match=mi))


def _header_edits(f: str, raw: Mapping[str, Any]) -> HeaderEdits:
    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out: dict[str, tuple[str, str]] = {}
        for i, h in enumerate(_list(raw.get(key))):
            h = _map(h)
            name = h.get("name")
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name) or name.lower() in _HOP_BY_HOP:
                raise Unsupported(f"{f}.{key}[{i}].name", f"{_safe(name)!r} cannot be edited by kproxy")
            out.setdefault(name.lower(), (name, _text(h.get("value"), f"{f}.{key}[{i}].value")))
        return tuple(out[k] for k in sorted(out))

    remove = []
    for i, name in enumerate(_list(raw.get("remove"))):
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name) or name.lower() in _HOP_BY_HOP:
            raise Unsupported(f"{f}.remove[{i}]", f"{_safe(name)!r} cannot be edited by kproxy")
        remove.append(name)
    return HeaderEdits(set=pairs("set"), add=pairs("add"), remove=tuple(sorted(set(remove), key=str.lower)))


def _path_edit(f: str, raw: Mapping[str, Any]) -> PathEdit:
    kind = raw.get("type")
    if kind == "ReplaceFullPath":
        return PathEdit(kind, _path(raw.get("replaceFullPath"), f"{f}.replaceFullPath"))
    if kind == "ReplacePrefixMatch":
        return PathEdit(kind, _path(raw.get("replacePrefixMatch"), f"{f}.replacePrefixMatch"))
    raise Unsupported(f"{f}.type", f"{_safe(kind)!r} is not ReplaceFullPath or ReplacePrefixMatch")


def _filters(f: str, filters: list[Any], action: GatewayAction) -> GatewayAction:
    seen: set[str] = set()
    for i, raw in enumerate(filters):
        raw = _map(raw)
        kind = raw.get("type")
        ff = f"{f}.filters[{i}]"
        if kind in seen:
            raise Unsupported(ff, f"{kind} given twice")
        seen.add(str(kind))
        if kind == "RequestHeaderModifier":
            action = replace(
                action,
                request_headers=_header_edits(f"{ff}.requestHeaderModifier", _map(raw.get("requestHeaderModifier"))),
            )
        elif kind == "ResponseHeaderModifier":
            action = replace(
                action,
                response_headers=_header_edits(f"{ff}.responseHeaderModifier", _map(raw.get("responseHeaderModifier"))),
            )
        elif kind == "RequestRedirect":
            r = _map(raw.get("requestRedirect"))
            scheme = r.get("scheme")
            if scheme is not None and scheme not in ("http", "https"):
                raise Unsupported(f"{ff}.requestRedirect.scheme", "must be http or https")
            host = (
                _hostname(r.get("hostname"), f"{ff}.requestRedirect.hostname", False)
                if r.get("hostname") is not None
                else None
            )
            port = r.get("port")
            if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
                raise Unsupported(f"{ff}.requestRedirect.port", "not a port number")
            code = r.get("statusCode", 302)
            if code not in _REDIRECT_CODES:
                raise Unsupported(
                    f"{ff}.requestRedirect.statusCode", f"{_safe(code)} is not one of 301, 302, 303, 307, 308"
                )
            path = _path_edit(f"{ff}.requestRedirect.path", _map(r.get("path"))) if r.get("path") is not None else None
            # scheme and port are finished per listener (see _finish_redirect)
            action = replace(action, redirect=Redirect(scheme or "", host, port, path, int(code)))
        elif kind == "URLRewrite":
            r = _map(raw.get("urlRewrite"))
            host = (
                _hostname(r.get("hostname"), f"{ff}.urlRewrite.hostname", False)
                if r.get("hostname") is not None
                else None
            )
            path = _path_edit(f"{ff}.urlRewrite.path", _map(r.get("path"))) if r.get("path") is not None else None
            action = replace(action, rewrite_host=host, rewrite_path=path)
        else:
            raise Unsupported(f"{ff}.type", f"filter {_safe(kind)!r} is not supported by kproxy")
    if action.redirect is not None and (action.rewrite_host is not None or action.rewrite_path is not None):
        raise Unsupported(f"{f}.filters", "RequestRedirect and URLRewrite cannot be combined")
    return action


def _backend_ref(
    ref: IngressRef,
    f: str,
    b: Mapping[str, Any],
    services: Mapping[tuple[str, str], Service],
    grants: _Grants,
) -> tuple[WeightedBackend, tuple[str, str] | None]:
    weight = b.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
        raise Unsupported(f"{f}.weight", "must be 0..1000000")
    if _list(b.get("filters")):
        raise Unsupported(f"{f}.filters", "backendRef filters are not supported by kproxy")
    group, kind = b.get("group") or "", b.get("kind") or "Service"
    name, ns, port = b.get("name"), str(b.get("namespace") or ref.namespace), b.get("port")
    port_text = str(port) if isinstance(port, int) else ""
    bref = BackendRef(ns, name if isinstance(name, str) and _LABEL.fullmatch(name) else "", port_text)

    def bad(reason: str, msg: str) -> tuple[WeightedBackend, tuple[str, str]]:
        return WeightedBackend(Backend(bref, None, msg), weight), (reason, msg)

    if group != "" or kind != "Service":
        return bad("InvalidKind", f"{_safe(group)}/{_safe(kind)} is not a Service")
    if not bref.service:
        return bad("BackendNotFound", f"{_safe(name)!r} is not a Service name")
    if not grants.allows("HTTPRoute", ref.namespace, "", "Service", ns, bref.service):
        return bad("RefNotPermitted", f"Service {ns}/{bref.service} in another namespace needs a ReferenceGrant")
    svc = services.get((ns, bref.service))
    if svc is None:
        return bad("BackendNotFound", f"Service {ns}/{bref.service} not found (or not proxied by kproxy)")
    if svc.type is ServiceType.EXTERNAL_NAME:
        return bad("UnsupportedValue", f"Service {ns}/{bref.service} is ExternalName")
    if not port_text:
        return bad("UnsupportedValue", f"{f}.port is required for a Service")
    for sp in svc.ports:
        if sp.protocol is Protocol.TCP and sp.port == port:
            return WeightedBackend(Backend(bref, sp), weight), None
    return bad("BackendNotFound", f"Service {ns}/{bref.service} has no TCP port {port_text}")


# --- servers -------------------------------------------------------------------------------


def _finish_redirect(r: Redirect, ls: _Listener) -> Redirect:
    """Spec: no scheme → the listener's; no port → the scheme's well-known port when a scheme
    was given, else the listener's port; a well-known port is left out of Location."""
    listener_scheme = "https" if ls.protocol == "HTTPS" else "http"
    scheme = r.scheme or listener_scheme
    port: int | None = r.port if r.port is not None else ({"http": 80, "https": 443}[scheme] if r.scheme else ls.port)
    if (scheme, port) in (("http", 80), ("https", 443)):
        port = None
    return replace(r, scheme=scheme, port=port)


def _servers(attachments: list[_Attachment], gateways: list[_Gateway], reasons: list[Reason]) -> tuple[Server, ...]:
    listeners = [ls for gw in gateways for ls in gw.listeners if ls.valid]
    by_port: dict[int, list[_Listener]] = {}
    for ls in listeners:
        by_port.setdefault(ls.port, []).append(ls)
    servers: list[Server] = []
    for port in sorted(by_port):
        lss = by_port[port]
        https = lss[0].protocol == "HTTPS"
        hosts: set[str] = {""} | {ls.hostname for ls in lss if ls.hostname}
        hosts |= {a.hostname for a in attachments if a.listener.port == port and a.hostname}
        for host in sorted(hosts):
            owner = _owning_hostname(host, lss)
            owners = [ls for ls in lss if ls.hostname == owner]
            routes: list[Route] = []
            for a in attachments:
                if a.listener not in owners:
                    continue
                if not (a.hostname is None or (host and covers(a.hostname, host))):
                    continue
                precise = len(a.hostname) if a.hostname and not a.hostname.startswith("*") else 0
                for m in a.matches:
                    action = m.action
                    if action.redirect is not None:
                        action = replace(action, redirect=_finish_redirect(action.redirect, a.listener))
                    first = (
                        action.backends[0].backend
                        if action.backends
                        else Backend(BackendRef(a.route.namespace, "", ""), None, "no backendRefs")
                    )
                    routes.append(
                        Route(
                            host=host,
                            path=m.path,
                            path_type=m.path_type,
                            regex=False,
                            backend=first,
                            ingress=IngressRef(a.route.namespace, a.route.name, "HTTPRoute"),
                            field=f"spec.rules[{m.rule}].matches[{m.index}]",
                            conditions=m.conditions,
                            action=action,
                            host_rank=(-precise, -len(a.hostname or "")),
                            rank=(a.age, m.rule, m.index),
                        )
                    )
            routes = list({(r.ingress, r.field): r for r in sorted(routes, key=lambda r: r.gateway_key)}.values())
            tls = next((ls.tls for ls in owners if ls.tls is not None), None) if https else None
            server = Server(host=host, routes=tuple(routes), tls=tls, port=port, https=https)
            for loc, cands in server.gateway_locations():
                for r in cands[MAX_CANDIDATES:]:
                    reasons.append(
                        Reason(
                            str(r.ingress),
                            r.field,
                            f"more than {MAX_CANDIDATES} matches fit {loc.pattern}; not served there",
                        )
                    )
            servers.append(server)
    return tuple(servers)


def _owning_hostname(host: str, listeners: list[_Listener]) -> str | None:
    """The most specific listener hostname on a port covering `host` (spec listener selection);
    None: a listener without hostname (the only kind that owns the catch-all)."""
    if not host:
        return None
    names = {ls.hostname for ls in listeners}
    if host in names:
        return host
    probe = "x" + host[1:] if host.startswith("*.") else host  # a wildcard only under a wildcard
    wild = sorted((n for n in names if n and n.startswith("*.") and covers(n, probe)), key=len, reverse=True)
    return wild[0] if wild else None


# --- one table for both APIs ---------------------------------------------------------------


def combine(ingress: RoutingTable, gateway: GatewayResult, options: GatewayOptions = GatewayOptions()) -> RoutingTable:
    """The Ingress table plus the Gateway servers. Conflict rule: on the Ingress HTTP/HTTPS
    ports, a host an Ingress serves (rules, or for the catch-all a host-less rule or a default
    backend) stays the Ingress's; the Gateway server for it is left out with a reason on each
    HTTPRoute that had matches there. An unused Ingress catch-all yields its port to a Gateway
    catch-all (the renderer drops the Ingress one on that port)."""
    reasons = list(ingress.reasons) + list(gateway.reasons)
    ingress_ports = {p for p in (options.ingress_http_port, options.ingress_https_port) if p}
    used = {s.host for s in ingress.servers if s.port == 0 and (s.routes or s.fallback is not None)}
    servers = list(ingress.servers)
    for s in gateway.servers:
        if s.port in ingress_ports and s.host in used:
            for ref in sorted({r.ingress for r in s.routes}):
                reasons.append(
                    Reason(
                        str(ref),
                        "spec.hostnames",
                        f"host {s.host or '(any)'} on port {s.port} is served by an Ingress; the Ingress keeps it until removed",
                    )
                )
            continue
        servers.append(s)
    servers.sort(key=lambda s: (s.port, s.host))
    return RoutingTable(
        servers=tuple(servers),
        ours=ingress.ours,
        reasons=tuple(sorted(set(reasons), key=lambda r: (r.ref, r.field, r.message))),
    )


# --- status writes -------------------------------------------------------------------------


def _timed(wanted: list[Obj], current: list[Any], now: str) -> list[Obj]:
    """`wanted` conditions with ``lastTransitionTime``: kept from `current` while the condition's
    status is unchanged (Kubernetes condition convention), else `now`."""
    old = {c.get("type"): c for c in current if isinstance(c, Mapping)}
    out = []
    for c in wanted:
        prev = old.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
        out.append({**c, "lastTransitionTime": prev["lastTransitionTime"] if same and prev else now})
    return out


def _untimed(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _untimed(x) for k, x in v.items() if k != "lastTransitionTime"}
    if isinstance(v, list):
        return [_untimed(x) for x in v]
    return v


def status_update(kind: str, current: Any, wanted: Mapping[str, Any], controller: str, now: str) -> Obj | None:
    """The status to write for one object, or None when it already says what we want (so a
    status is written only on change). HTTPRoute: other controllers' ``parents`` entries are
    kept untouched; ours are replaced."""
    cur = current if isinstance(current, Mapping) else {}
    if kind == "HTTPRoute":
        theirs = [p for p in _list(cur.get("parents")) if _map(p).get("controllerName") != controller]
        ours_now = {
            repr(sorted(_map(p.get("parentRef")).items())): p
            for p in _list(cur.get("parents"))
            if _map(p).get("controllerName") == controller
        }
        parents = []
        for p in wanted["parents"]:
            prev = ours_now.get(repr(sorted(p["parentRef"].items())), {})
            parents.append({**p, "conditions": _timed(p["conditions"], _list(_map(prev).get("conditions")), now)})
        new: Obj = {**cur, "parents": theirs + parents}
    else:
        new = {**cur, **wanted, "conditions": _timed(wanted["conditions"], _list(cur.get("conditions")), now)}
        if "listeners" in wanted:
            old_ls = {_map(x).get("name"): _map(x) for x in _list(cur.get("listeners"))}
            new["listeners"] = [
                {**ls, "conditions": _timed(ls["conditions"], _list(old_ls.get(ls["name"], {}).get("conditions")), now)}
                for ls in wanted["listeners"]
            ]
    return None if _untimed(new) == _untimed(dict(cur)) else new
