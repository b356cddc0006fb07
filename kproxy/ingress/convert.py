"""Ingress, IngressClass, Service and Secret objects → a `RoutingTable` (pure).

Input: Ingresses, IngressClasses and Secrets as raw dicts shaped like ``kubectl get -o yaml``
prints them, Services already converted to `kproxy.model.Service`.

Guarantees:
- Pure and deterministic: no clock, no I/O; input order never changes the result.
- One bad Ingress never stops the others, and nothing is dropped silently: every rejection is a
  `Reason` naming the object and the field.
- Class selection (only Ingresses of our class are read, and only they are listed in `ours`):
  ``spec.ingressClassName`` naming an IngressClass whose ``spec.controller`` is ours, or the
  configured class name; else the legacy ``kubernetes.io/ingress.class`` annotation with the same
  test; else, for class-less Ingresses, the default IngressClass
  (``ingressclass.kubernetes.io/is-default-class: "true"``) when it is ours — if several classes
  claim to be the default, class-less Ingresses are ours only if all of them are ours, so two
  controllers never both serve one Ingress.
- Conflicts: Ingresses are processed oldest first (creationTimestamp, then namespace/name). The
  first to claim a host+path location, a host's TLS or a host's default backend keeps it; the
  later one gets a reason. Exact and Prefix on the same path are not a conflict (Exact wins the
  tie when matching).
- Failure modes: invalid host → that rule is dropped; invalid path → that path is dropped; a
  missing Service or port, an ExternalName Service or a Resource backend → the path stays and
  answers 503 (as ingress-nginx does); an unusable TLS Secret → the host keeps HTTPS and its
  redirects, with the default certificate or rejected handshakes (never a silent downgrade to
  plaintext); a security annotation that cannot be honoured → every path of the Ingress answers
  503 (see `annotations`).

Why one module of ~730 lines: Ingress semantics (classes, hosts, paths, precedence, TLS, default
backends) are one conversion whose rules refer to each other.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import re._constants as _sre_c  # type: ignore[import-not-found]  # the parser that sees nesting
import re._parser as _sre_p  # type: ignore[import-not-found]
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from kproxy.errors import InvalidObject
from kproxy.ingress.annotations import ParsedAnnotations, parse_annotations
from kproxy.ingress.model import (
    Backend,
    BackendRef,
    Canary,
    IngressRef,
    PathType,
    Reason,
    Route,
    RoutingTable,
    Server,
    ServerTLS,
    TLSCertificate,
    ingress_age_key,
)
from kproxy.log import get_logger
from kproxy.model import Protocol, Service, ServiceType

DEFAULT_CONTROLLER = "kproxy.io/ingress-controller"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
MAX_PATH_LEN = 1024
MAX_REGEX_LEN = 512
MAX_SECRET_LEN = 1 << 20  # the API server's limit for a whole Secret


@dataclass(frozen=True, slots=True)
class ClassOptions:
    """Which Ingresses are ours: the IngressClass controller value, and optionally a class name
    honoured directly (``ingressClassName`` or the legacy annotation) even without an
    IngressClass object."""

    controller: str = DEFAULT_CONTROLLER
    class_name: str | None = None
    watch_without_class: bool = False


@dataclass(frozen=True, slots=True)
class IngressClassInfo:
    name: str
    controller: str
    is_default: bool


# --- class selection -----------------------------------------------------------------------


def parse_ingress_classes(objs: Iterable[Mapping[str, Any]]) -> tuple[IngressClassInfo, ...]:
    out = []
    for obj in objs:
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        spec = obj.get("spec") if isinstance(obj, Mapping) else None
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
            continue
        ann = _map(meta.get("annotations"))
        controller = _map(spec).get("controller")
        out.append(
            IngressClassInfo(
                name=meta["name"],
                controller=controller if isinstance(controller, str) else "",
                is_default=ann.get(DEFAULT_CLASS_ANNOTATION) == "true",
            )
        )
    return tuple(sorted(out, key=lambda c: c.name))


def is_ours(
    ingress: Mapping[str, Any], classes: Iterable[IngressClassInfo], options: ClassOptions = ClassOptions()
) -> bool:
    classes = tuple(classes)
    mine = {c.name for c in classes if c.controller == options.controller}
    if options.class_name:
        mine.add(options.class_name)
    spec = _map(ingress.get("spec"))
    meta = _map(ingress.get("metadata"))
    ann = _map(meta.get("annotations"))
    by_field = spec.get("ingressClassName")
    if isinstance(by_field, str) and by_field:
        return by_field in mine
    by_ann = ann.get(LEGACY_CLASS_ANNOTATION)
    if isinstance(by_ann, str) and by_ann:
        return by_ann in mine
    defaults = [c for c in classes if c.is_default]
    if defaults:
        return all(c.controller == options.controller for c in defaults)
    return options.watch_without_class


# --- the table -----------------------------------------------------------------------------


def build_routes(
    ingresses: Iterable[Mapping[str, Any]],
    services: Iterable[Service],
    secrets: Iterable[Mapping[str, Any]] = (),
    ingress_classes: Iterable[Mapping[str, Any]] = (),
    options: ClassOptions = ClassOptions(),
) -> RoutingTable:
    """The routing table for every Ingress of our class; see the module docstring."""
    classes = parse_ingress_classes(ingress_classes)
    svc_index = {s.key: s for s in services}
    secret_index = _index_secrets(secrets)
    reasons: list[Reason] = []

    ours: list[tuple[Any, IngressRef, Mapping[str, Any]]] = []
    for obj in ingresses:
        # Other controllers' Ingresses are not ours to judge: class first, validation after.
        if not isinstance(obj, Mapping) or not is_ours(obj, classes, options):
            continue
        try:
            ref, created = _meta(obj)
        except InvalidObject as e:
            reasons.append(Reason(e.ref, e.field, e.reason))
            continue
        ours.append((ingress_age_key(created, ref), ref, obj))
    ours.sort(key=lambda t: t[0])

    parsed: list[_Parsed] = []
    for _, ref, obj in ours:
        try:
            p = _parse_ingress(ref, obj, svc_index, secret_index)
        except InvalidObject as e:
            reasons.append(Reason(e.ref, e.field, e.reason))
            continue
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            # Malformed beyond what the field checks expect: reject this Ingress only.
            reasons.append(Reason(str(ref), "spec", f"malformed object ({type(e).__name__}); ignored"))
            continue
        reasons.extend(p.reasons)
        parsed.append(p)

    merged = _merge(parsed, reasons)
    return RoutingTable(
        servers=merged,
        ours=tuple(sorted(ref for _, ref, _ in ours)),
        reasons=tuple(sorted(set(reasons), key=lambda r: (r.ref, r.field, r.message))),
    )


@dataclass(slots=True)
class _Parsed:
    ref: IngressRef
    ann: ParsedAnnotations
    routes: list[Route] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # rule hosts, "" for host-less rules
    default: Backend | None = None
    tls: list[tuple[str, ServerTLS]] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)


def _merge(parsed: list[_Parsed], reasons: list[Reason]) -> tuple[Server, ...]:
    claimed: dict[tuple[str, tuple[str, str]], Route] = {}
    order: dict[IngressRef, int] = {p.ref: i for i, p in enumerate(parsed)}
    fallback: dict[str, Route] = {}
    tls: dict[str, ServerTLS] = {}

    mains = [p for p in parsed if p.ann.canary is None]
    canaries = [p for p in parsed if p.ann.canary is not None]

    for p in mains:  # oldest first: the first claim wins
        for r in p.routes:
            key = (r.host, r.conflict_key)
            owner = claimed.get(key)
            if owner is None:
                claimed[key] = r
            elif owner.ingress == p.ref:
                p_msg = f"duplicate of {owner.field} in this Ingress; ignored"
                reasons.append(Reason(str(p.ref), r.field, p_msg))
            else:
                reasons.append(
                    Reason(
                        str(p.ref),
                        r.field,
                        f"host {_host_text(r.host)} path {r.path} ({r.path_type.value}) is already served by "
                        f"the older {owner.ingress}; ignored",
                    )
                )
        if p.default is not None:
            for h in sorted(set(p.hosts or [""])):
                if h in fallback:
                    reasons.append(
                        Reason(
                            str(p.ref),
                            "spec.defaultBackend",
                            f"host {_host_text(h)} already falls back to the defaultBackend of the older "
                            f"{fallback[h].ingress}; ignored there",
                        )
                    )
                    continue
                fallback[h] = Route(
                    host=h,
                    path="/",
                    path_type=PathType.PREFIX,
                    regex=False,
                    backend=p.default,
                    ingress=p.ref,
                    field="spec.defaultBackend",
                    # A rewrite has no capture source on the fallback location.
                    options=replace(p.ann.options, rewrite_target=None),
                )
        for host, t in p.tls:
            prev = tls.get(host)
            if prev is None:
                tls[host] = t
            elif (prev.secret_namespace, prev.secret_name) != (t.secret_namespace, t.secret_name):
                reasons.append(
                    Reason(
                        str(p.ref),
                        "spec.tls",
                        f"host {host} already uses Secret {prev.secret_namespace}/{prev.secret_name} "
                        f"from the older {prev.ingress}; ignored",
                    )
                )

    # A canary names the main path by host, type and text (regex-ness is the main's business).
    by_text = {(r.host, r.path_type, r.path): key for key, r in claimed.items()}
    for p in canaries:
        policy = p.ann.canary
        assert policy is not None
        for r in p.routes:
            key = by_text.get((r.host, r.path_type, r.path), (r.host, r.conflict_key))
            main = claimed.get(key)
            if main is None:
                reasons.append(
                    Reason(
                        str(p.ref),
                        r.field,
                        f"canary for host {_host_text(r.host)} path {r.path} ({r.path_type.value}) has no "
                        "main Ingress serving that path; ignored",
                    )
                )
            elif main.canary is not None:
                reasons.append(
                    Reason(
                        str(p.ref),
                        r.field,
                        f"host {_host_text(r.host)} path {r.path} already has the canary of the older "
                        f"{main.canary.ingress}; ignored",
                    )
                )
            elif not r.backend.ok:
                reasons.append(
                    Reason(
                        str(p.ref),
                        r.field,
                        "canary backend cannot serve; all traffic stays on the main backend",
                    )
                )
            else:
                claimed[key] = replace(main, canary=Canary(r.backend, policy, p.ref))
        if p.default is not None:
            reasons.append(Reason(str(p.ref), "spec.defaultBackend", "ignored on a canary Ingress"))
        if p.tls:
            reasons.append(Reason(str(p.ref), "spec.tls", "ignored on a canary Ingress"))

    by_host: dict[str, list[Route]] = {"": []}
    for (host, _), r in claimed.items():
        by_host.setdefault(host, []).append(r)
    for host in fallback:
        by_host.setdefault(host, [])
    for host, t in sorted(tls.items()):
        if host not in by_host:
            reasons.append(Reason(str(t.ingress), "spec.tls", f"host {host} has no rules; TLS ignored"))

    servers = []
    for host in sorted(by_host):
        routes = sorted(by_host[host], key=lambda r: (r.sort_key, order[r.ingress], r.field))
        servers.append(Server(host=host, routes=tuple(routes), fallback=fallback.get(host), tls=tls.get(host)))
    return tuple(servers)


def _host_text(h: str) -> str:
    return h or "(any)"


def log_reasons(reasons: Iterable[Reason], log: Any = None) -> None:
    """One structlog line per reason (event ``ingress_reason``), for the CLI and the controller."""
    log = log if log is not None else get_logger("kproxy.ingress")
    for r in reasons:
        log.warning("ingress_reason", object=r.ref, field=r.field, reason=r.message)


# --- one Ingress ---------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> tuple[IngressRef, datetime | None]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise InvalidObject("Ingress ?/?", "metadata", "missing")
    name = meta.get("name")
    ns = meta.get("namespace", "default")
    if not isinstance(name, str) or not _SUBDOMAIN.fullmatch(name):
        raise InvalidObject(f"Ingress {_safe(ns)}/{_safe(name)}", "metadata.name", "not a DNS subdomain name")
    if not isinstance(ns, str) or not _LABEL.fullmatch(ns):
        raise InvalidObject(f"Ingress {_safe(ns)}/{name}", "metadata.namespace", "not a DNS label")
    created = meta.get("creationTimestamp")
    when: datetime | None = None
    if isinstance(created, datetime):
        when = created
    elif isinstance(created, str):
        try:
            when = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            when = None
    if when is not None and when.tzinfo is None:
        # kubectl prints UTC; YAML loaders may hand back a naive datetime for it.
        when = when.replace(tzinfo=UTC)
    return IngressRef(ns, name), when


def _parse_ingress(
    ref: IngressRef,
    obj: Mapping[str, Any],
    services: Mapping[tuple[str, str], Service],
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
) -> _Parsed:
    meta = obj["metadata"]
    ann = meta.get("annotations") or {}
    if not isinstance(ann, Mapping):
        raise InvalidObject(str(ref), "metadata.annotations", "not a map")
    parsed_ann = parse_annotations(ref, ann, secrets)
    p = _Parsed(ref=ref, ann=parsed_ann, reasons=list(parsed_ann.reasons))
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise InvalidObject(str(ref), "spec", "not a map")
    options = parsed_ann.options

    if spec.get("defaultBackend") is not None:
        try:
            p.default = _backend(ref, "spec.defaultBackend", spec["defaultBackend"], services, p.reasons)
        except InvalidObject as e:
            p.reasons.append(Reason(e.ref, e.field, e.reason + "; ignored"))

    rules = spec.get("rules") or []
    if not isinstance(rules, list):
        raise InvalidObject(str(ref), "spec.rules", "not a list")
    for i, rule in enumerate(rules):
        f_rule = f"spec.rules[{i}]"
        if not isinstance(rule, Mapping):
            p.reasons.append(Reason(str(ref), f_rule, "not a map; ignored"))
            continue
        try:
            host = _host(ref, f"{f_rule}.host", rule.get("host"))
        except InvalidObject as e:
            p.reasons.append(Reason(e.ref, e.field, e.reason + "; rule ignored"))
            continue
        p.hosts.append(host)
        http = rule.get("http") or {}
        paths = http.get("paths") if isinstance(http, Mapping) else None
        if paths is None:
            continue
        if not isinstance(paths, list):
            p.reasons.append(Reason(str(ref), f"{f_rule}.http.paths", "not a list; ignored"))
            continue
        for j, item in enumerate(paths):
            f_path = f"{f_rule}.http.paths[{j}]"
            try:
                p.routes.append(_route(ref, f_path, host, item, options.regex, services, p.reasons, parsed_ann))
            except InvalidObject as e:
                p.reasons.append(Reason(e.ref, e.field, e.reason + "; path ignored"))

    tls = spec.get("tls") or []
    if not isinstance(tls, list):
        p.reasons.append(Reason(str(ref), "spec.tls", "not a list; ignored"))
        tls = []
    for i, entry in enumerate(tls):
        f_tls = f"spec.tls[{i}]"
        if not isinstance(entry, Mapping):
            p.reasons.append(Reason(str(ref), f_tls, "not a map; ignored"))
            continue
        hosts = entry.get("hosts") or []
        if not isinstance(hosts, list) or not hosts:
            p.reasons.append(Reason(str(ref), f"{f_tls}.hosts", "no hosts; this TLS entry is ignored"))
            continue
        server_tls = _server_tls(ref, f_tls, entry.get("secretName"), secrets, p.reasons)
        for k, h in enumerate(hosts):
            try:
                host = _host(ref, f"{f_tls}.hosts[{k}]", h)
            except InvalidObject as e:
                p.reasons.append(Reason(e.ref, e.field, e.reason + "; ignored"))
                continue
            if not host:
                p.reasons.append(Reason(str(ref), f"{f_tls}.hosts[{k}]", "empty host; ignored"))
                continue
            p.tls.append((host, server_tls))
    return p


def _route(
    ref: IngressRef,
    f: str,
    host: str,
    item: Any,
    regex: bool,
    services: Mapping[tuple[str, str], Service],
    reasons: list[Reason],
    ann: ParsedAnnotations,
) -> Route:
    if not isinstance(item, Mapping):
        raise InvalidObject(str(ref), f, "not a map")
    raw_type = item.get("pathType")
    try:
        path_type = PathType(raw_type if isinstance(raw_type, str) else "")
    except ValueError:
        raise InvalidObject(str(ref), f"{f}.pathType", "must be Exact, Prefix or ImplementationSpecific") from None
    raw_path = item.get("path")
    if raw_path is None and path_type is PathType.IMPLEMENTATION_SPECIFIC:
        raw_path = "/"
    is_regex = regex and path_type is PathType.IMPLEMENTATION_SPECIFIC
    if ann.canary is not None and path_type is PathType.IMPLEMENTATION_SPECIFIC:
        # A canary only names the main Ingress's path (whose annotations decide regex-ness, and
        # a canary's own are ignored), so accept either grammar; it is matched by text.
        try:
            _literal_path(ref, f"{f}.path", raw_path, regex)
        except InvalidObject:
            is_regex = True
    if is_regex:
        path = _regex_path(ref, f"{f}.path", raw_path)
    else:
        path = _literal_path(ref, f"{f}.path", raw_path, regex)
    if path_type is PathType.PREFIX:
        path = path.rstrip("/") or "/"  # "trailing slashes ignored" (Ingress API)
    backend = _backend(ref, f"{f}.backend", item.get("backend"), services, reasons)
    return Route(
        host=host,
        path=path,
        path_type=path_type,
        regex=is_regex,
        backend=backend,
        ingress=ref,
        field=f,
        options=ann.options,
    )


def _backend(
    ref: IngressRef, f: str, raw: Any, services: Mapping[tuple[str, str], Service], reasons: list[Reason]
) -> Backend:
    if not isinstance(raw, Mapping):
        raise InvalidObject(str(ref), f, "not a map")
    if raw.get("resource") is not None:
        res = raw["resource"]
        what = f"{_safe(res.get('kind'))}/{_safe(res.get('name'))}" if isinstance(res, Mapping) else "?"
        msg = f"Resource backends ({what}) are not supported by kproxy; answers 503"
        reasons.append(Reason(str(ref), f"{f}.resource", msg))
        return Backend(BackendRef(ref.namespace, "", ""), None, msg)
    svc = raw.get("service")
    if not isinstance(svc, Mapping):
        raise InvalidObject(str(ref), f"{f}.service", "missing")
    name = svc.get("name")
    if not isinstance(name, str) or not _SVC_NAME.fullmatch(name):
        raise InvalidObject(str(ref), f"{f}.service.name", "not a Service name (DNS-1035 label)")
    port = svc.get("port")
    if not isinstance(port, Mapping):
        raise InvalidObject(str(ref), f"{f}.service.port", "missing")
    number, port_name = port.get("number"), port.get("name")
    if (number is None) == (port_name is None):
        raise InvalidObject(str(ref), f"{f}.service.port", "exactly one of number and name")
    if number is not None:
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            raise InvalidObject(str(ref), f"{f}.service.port.number", "not a port number")
        port_text = str(number)
    else:
        if not isinstance(port_name, str) or not _PORT_NAME.fullmatch(port_name):
            raise InvalidObject(str(ref), f"{f}.service.port.name", "not a port name")
        port_text = port_name
    bref = BackendRef(ref.namespace, name, port_text)

    def unavailable(msg: str) -> Backend:
        reasons.append(Reason(str(ref), f"{f}.service", msg + "; answers 503"))
        return Backend(bref, None, msg)

    service = services.get((ref.namespace, name))
    if service is None:
        # kproxy.convert.convert_service also leaves out Services it does not proxy (headless,
        # ExternalName, another service-proxy-name), so say so.
        return unavailable(f"Service {ref.namespace}/{name} not found (or not proxied by kproxy)")
    if service.type is ServiceType.EXTERNAL_NAME:
        return unavailable(f"Service {ref.namespace}/{name} is ExternalName (not supported)")
    for sp in service.ports:
        if sp.protocol is not Protocol.TCP:
            continue
        if (number is not None and sp.port == number) or (port_name is not None and sp.name.port == port_name):
            return Backend(bref, sp)
    return unavailable(f"Service {ref.namespace}/{name} has no TCP port {port_text}")


def _server_tls(
    ref: IngressRef,
    f: str,
    secret_name: Any,
    secrets: Mapping[tuple[str, str], Mapping[str, Any]],
    reasons: list[Reason],
) -> ServerTLS:
    def degraded(msg: str) -> ServerTLS:
        reasons.append(
            Reason(
                str(ref),
                f"{f}.secretName",
                msg + "; HTTPS uses the default certificate (or rejects handshakes)",
            )
        )
        return ServerTLS(ref.namespace, name, ref, None, msg)

    name = secret_name if isinstance(secret_name, str) else ""
    if not name:
        return degraded("no secretName")
    if not _SUBDOMAIN.fullmatch(name):
        return degraded(f"{_safe(name)!r} is not a Secret name")
    obj = secrets.get((ref.namespace, name))
    if obj is None:
        return degraded(f"Secret {ref.namespace}/{name} not found")
    try:
        cert = tls_certificate(obj)
    except ValueError as e:
        return degraded(f"Secret {ref.namespace}/{name}: {e}")
    # File names derive from the validated reference, not from whatever the Secret says.
    cert = replace(cert, secret_namespace=ref.namespace, secret_name=name)
    return ServerTLS(ref.namespace, name, ref, cert)


# --- grammar -------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_SVC_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT_NAME = re.compile(r"(?=.{1,15}$)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
# Exact, Prefix and literal ImplementationSpecific paths: characters that need no quoting or
# escaping anywhere and mean themselves in nginx's decoded, normalized $uri.
_LITERAL_PATH = re.compile(r"/[A-Za-z0-9/_.~@:+,=-]*")
_REGEX_CHARS = re.compile(r"[A-Za-z0-9/_.~%:@!&=+,*?()|\[\]^\\<>$-]*")
_ESCAPABLE = frozenset("dDwWsSbB.\\/()[]|?*+-^$")


def _host(ref: IngressRef, f: str, raw: Any) -> str:
    """ "" for no host (the catch-all server); else a lowercase DNS name, optionally ``*.`` and
    then a name (the wildcard covers exactly one label). ``*`` alone and IPs are invalid."""
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str):
        raise InvalidObject(str(ref), f, "not a string")
    name = raw[2:] if raw.startswith("*.") else raw
    if not _SUBDOMAIN.fullmatch(name):
        raise InvalidObject(str(ref), f, f"{_safe(raw)!r} is not a DNS name or *.<DNS name>")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return raw
    raise InvalidObject(str(ref), f, "an IP address is not a valid host")


def _literal_path(ref: IngressRef, f: str, raw: Any, regex_ingress: bool) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidObject(str(ref), f, "missing")
    if len(raw) > MAX_PATH_LEN or not _LITERAL_PATH.fullmatch(raw):
        hint = "" if regex_ingress else " (regex paths need pathType ImplementationSpecific and use-regex)"
        raise InvalidObject(str(ref), f, f"{_safe(raw)!r} is not an absolute path of [A-Za-z0-9/_.~@:+,=-]{hint}")
    segments = raw.split("/")[1:]
    if "//" in raw or any(s in (".", "..") for s in segments):
        # nginx matches the normalized URI: such a location could never match.
        raise InvalidObject(str(ref), f, "path has empty, '.' or '..' segments")
    return raw


def _regex_path(ref: IngressRef, f: str, raw: Any) -> str:
    """A regex path (use-regex / rewrite-target): PCRE text that stays inside its quotes and
    inside the location: no quotes, braces, semicolons, whitespace, `#`; `$` only as an end
    anchor; every backslash escapes a regex metacharacter or class; no nested unbounded
    quantifiers (catastrophic backtracking)."""
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise InvalidObject(str(ref), f, "must start with /")
    if len(raw) > MAX_REGEX_LEN or not _REGEX_CHARS.fullmatch(raw):
        raise InvalidObject(str(ref), f, f"{_safe(raw)!r} has characters outside [A-Za-z0-9/_.~%:@!&=+,*?()|[]^\\<>$-]")
    if re.search(r"\$(?![)|]|\Z)", raw):
        # `$` as an end anchor (at the end, or before `)`/`|`) only: nothing that reads like
        # an nginx variable, even though regex positions are never expanded.
        raise InvalidObject(str(ref), f, "$ is only allowed as an end anchor (before ), | or the end)")
    i = 0
    while i < len(raw):
        if raw[i] == "\\":
            if i + 1 >= len(raw) or raw[i + 1] not in _ESCAPABLE:
                raise InvalidObject(str(ref), f, "a backslash must escape a regex metacharacter or class")
            i += 2
            continue
        i += 1
    try:
        tree = _sre_p.parse(raw)
    except re.error as e:
        raise InvalidObject(str(ref), f, f"not a valid regular expression: {e.msg}") from None
    if _nested_repeat(tree, False):
        raise InvalidObject(str(ref), f, "nested unbounded quantifiers (catastrophic backtracking)")
    return raw


def _nested_repeat(items: Any, inside: bool) -> bool:
    repeats = (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", None))
    for op, av in items:
        if op in repeats:
            _lo, hi, sub = av
            many = hi == _sre_c.MAXREPEAT or hi > 1
            if inside and many:
                return True
            if _nested_repeat(sub, inside or many):
                return True
        elif op is _sre_c.SUBPATTERN:
            if _nested_repeat(av[-1], inside):
                return True
        elif op is _sre_c.BRANCH:
            if any(_nested_repeat(b, inside) for b in av[1]):
                return True
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            if _nested_repeat(av[1], inside):
                return True
    return False


# --- Secrets -------------------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]{1,40})-----\r?\n(.*?)\r?\n?-----END \1-----", re.DOTALL)
_KEY_TYPES = frozenset({"PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"})


def tls_certificate(obj: Mapping[str, Any]) -> TLSCertificate:
    """A ``kubernetes.io/tls`` Secret → PEM text re-encoded from the decoded DER blocks, so
    nothing but well-formed PEM reaches the certificate files. Raises ValueError."""
    meta = obj.get("metadata") or {}
    if obj.get("type") != "kubernetes.io/tls":
        raise ValueError("type is not kubernetes.io/tls")
    data = obj.get("data")
    if not isinstance(data, Mapping) or "tls.crt" not in data or "tls.key" not in data:
        raise ValueError("data lacks tls.crt or tls.key")
    certs = _pem_blocks(data["tls.crt"], "tls.crt")
    keys = [b for b in _pem_blocks(data["tls.key"], "tls.key") if b[0] != "EC PARAMETERS"]
    if not certs or any(kind != "CERTIFICATE" for kind, _ in certs):
        raise ValueError("tls.crt must hold CERTIFICATE blocks only")
    if len(keys) != 1 or keys[0][0] not in _KEY_TYPES:
        raise ValueError("tls.key must hold exactly one unencrypted private key")
    return TLSCertificate(
        secret_namespace=str(meta.get("namespace", "")),
        secret_name=str(meta.get("name", "")),
        cert_pem="".join(_pem(kind, der) for kind, der in certs),
        key_pem=_pem(*keys[0]),
    )


def _pem_blocks(value: Any, key: str) -> list[tuple[str, bytes]]:
    if not isinstance(value, str) or len(value) > MAX_SECRET_LEN:
        raise ValueError(f"{key} is not base64 text")
    try:
        text = base64.b64decode(value, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{key} is not base64 of PEM text") from e
    out = []
    for m in _PEM.finditer(text):
        body = m.group(2)
        if ":" in body:  # "Proc-Type: 4,ENCRYPTED" and friends
            raise ValueError(f"{key} holds an encrypted or annotated PEM block")
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except binascii.Error as e:
            raise ValueError(f"{key} has a PEM block that is not base64") from e
        if not der or der[0] != 0x30:  # every certificate and key is a DER SEQUENCE
            raise ValueError(f"{key} has a PEM block that is not DER")
        out.append((m.group(1), der))
    if not out:
        raise ValueError(f"{key} holds no PEM block")
    return out


def _pem(kind: str, der: bytes) -> str:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n"


def _index_secrets(secrets: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for s in secrets:
        meta = s.get("metadata") if isinstance(s, Mapping) else None
        if isinstance(meta, Mapping) and isinstance(meta.get("name"), str):
            out[(str(meta.get("namespace", "default")), meta["name"])] = s
    return out


def _map(v: Any) -> Mapping[str, Any]:
    """`v` if it is a map, else an empty one: malformed nesting reads as absent."""
    return v if isinstance(v, Mapping) else {}


def _safe(v: Any) -> str:
    s = v if isinstance(v, str) else repr(v)
    s = s if s.isascii() and s.isprintable() else s.encode("ascii", "backslashreplace").decode()
    return s[:80] + ("..." if len(s) > 80 else "")
