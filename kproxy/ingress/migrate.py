"""Ingresses and their ingress-nginx annotations → Gateway API objects (`kproxy ingress convert`).

Input: the same raw objects `kproxy ingress render --state` reads (Ingress, IngressClass,
Service, Secret). Output: a GatewayClass, one Gateway per Ingress class, ReferenceGrants for the
certificates in other namespaces and HTTPRoutes (``gateway.networking.k8s.io/v1``), plus a
`Reason` for every annotation or feature that could not be carried over.

Guarantees:
- Pure and deterministic: no clock, no I/O; the same input gives the same objects in the same
  order, whatever the order of the input.
- The Ingress side is read by `kproxy.ingress.convert.build_routes`, the very reading the
  controller serves, so conflicts, canaries, TLS and validation are decided once; each served
  Ingress path becomes one HTTPRoute rule on the route of its Ingress and host.
- Nothing is dropped silently: every ``nginx.ingress.kubernetes.io/`` annotation is either
  carried over or named with the reason, and every difference in matching that Gateway API
  imposes (element-wise prefixes, case-sensitive paths, wildcard hosts covering several labels)
  is named on the object it affects.
- Fail closed: an Ingress protected by authentication or a source allow list (which Gateway API
  cannot express) gets no HTTPRoute at all, rather than one that serves without protection.
- What it prints is accepted by kproxy's own Gateway API reading (tests convert and render).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kproxy.ingress.annotations import PREFIX, security_relevant
from kproxy.ingress.convert import ClassOptions, build_routes, parse_ingress_classes
from kproxy.ingress.model import IngressRef, PathType, Reason, Route, Server
from kproxy.model import Protocol, Service, ServicePort, ServicePortName, ServiceType

GROUP = "gateway.networking.k8s.io"
V1 = f"{GROUP}/v1"
DEFAULT_CLASS_GATEWAY = "default"  # Gateway of the Ingresses that name no class at all
HTTP_LISTENER = "http"

Obj = dict[str, Any]
# What kproxy's Gateway API reading takes as a path (gateway._path): no //, . or .. segments.
_PATH = re.compile(r"/(?:[A-Za-z0-9_~@:+,=-][A-Za-z0-9_.~@:+,=-]*(?:/|$))*|/")


@dataclass(frozen=True, slots=True)
class MigrateOptions:
    gateway_class: str = "kproxy"
    controller: str = "kproxy.io/gateway-controller"
    gateway_namespace: str = "default"
    http_port: int = 80
    https_port: int = 443


@dataclass(slots=True)
class Migration:
    objects: list[Obj] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)


# Annotations carried over by the code below (the others are reported with a reason).
_CARRIED = frozenset(
    """rewrite-target use-regex ssl-redirect force-ssl-redirect permanent-redirect
    permanent-redirect-code temporal-redirect temporal-redirect-code app-root canary canary-weight
    canary-weight-total canary-by-header canary-by-header-value""".split()
)
_WHY = {
    "enable-cors": "Gateway API v1 (standard channel) has no CORS filter",
    "limit-rps": "Gateway API has no rate limiting",
    "limit-rpm": "Gateway API has no rate limiting",
    "limit-connections": "Gateway API has no connection limits",
    "limit-burst-multiplier": "Gateway API has no rate limiting",
    "proxy-body-size": "Gateway API has no request body size limit",
    "proxy-connect-timeout": "Gateway API has one timeout per request (rules[].timeouts); set it by hand",
    "proxy-send-timeout": "Gateway API has one timeout per request (rules[].timeouts); set it by hand",
    "proxy-read-timeout": "Gateway API has one timeout per request (rules[].timeouts); set it by hand",
    "backend-protocol": "HTTPS backends need a BackendTLSPolicy and gRPC a GRPCRoute, neither served by kproxy",
    "affinity": "session persistence is not in Gateway API v1's standard channel",
    "canary-by-cookie": "Gateway API matches cookies only as a whole Cookie header",
    "canary-by-header-pattern": "kproxy serves Exact header matches only",
    "from-to-www-redirect": "write a second hostname with a RequestRedirect rule by hand",
    "default-backend": "Gateway API has no per-route default backend for errors",
    "custom-http-errors": "Gateway API has no error pages",
    "upstream-vhost": "write a URLRewrite hostname filter by hand if the backend needs it",
    "server-alias": "add the names to the HTTPRoute's hostnames by hand",
}


def migrate(
    ingresses: Iterable[Mapping[str, Any]],
    services: Iterable[Service],
    secrets: Iterable[Mapping[str, Any]] = (),
    ingress_classes: Iterable[Mapping[str, Any]] = (),
    options: MigrateOptions = MigrateOptions(),
) -> Migration:
    """Gateway API objects equivalent to `ingresses` (see the module docstring)."""
    ings = [dict(i) for i in ingresses]
    services = _with_placeholders(ings, list(services))
    secrets = list(secrets)
    classes = list(ingress_classes)
    out = Migration()
    groups: dict[str, list[Obj]] = {}
    defaults = [c.name for c in parse_ingress_classes(classes) if c.is_default]
    for ing in ings:
        groups.setdefault(_class_of(ing, defaults, out.reasons), []).append(ing)
    gateways: list[Obj] = []
    grants: dict[str, set[str]] = {}
    routes: list[Obj] = []
    for cls in sorted(groups):
        gw_name = _dns_name(cls)
        table = build_routes(groups[cls], services, secrets, [], ClassOptions(class_name=cls, watch_without_class=True))
        by_ref = {_ref(i): i for i in groups[cls]}
        _Gateway(gw_name, table.servers, by_ref, options, out.reasons).emit(gateways, grants, routes)
        out.reasons.extend(r for r in table.reasons if _relevant(r))
        for ref, ing in sorted(by_ref.items()):
            out.reasons.extend(_annotation_reasons(ref, ing))
    out.objects.append(
        {
            "apiVersion": V1,
            "kind": "GatewayClass",
            "metadata": {"name": options.gateway_class},
            "spec": {"controllerName": options.controller},
        }
    )
    out.objects.extend(sorted(gateways, key=_key))
    for ns in sorted(grants):
        out.objects.append(
            {
                "apiVersion": f"{GROUP}/v1beta1",
                "kind": "ReferenceGrant",
                "metadata": {"name": f"gateways-from-{options.gateway_namespace}", "namespace": ns},
                "spec": {
                    "from": [{"group": GROUP, "kind": "Gateway", "namespace": options.gateway_namespace}],
                    "to": [{"group": "", "kind": "Secret", "name": n} for n in sorted(grants[ns])],
                },
            }
        )
    out.objects.extend(sorted(routes, key=_key))
    out.reasons = sorted(set(out.reasons), key=lambda r: (r.ref, r.field, r.message))
    return out


def _with_placeholders(ings: list[Obj], services: list[Service]) -> list[Service]:
    """The given Services, plus a stand-in for each Service an Ingress names by port number
    that is not among them: the conversion does not need the cluster, only the references."""
    known = {(s.namespace, s.name) for s in services}
    wanted: dict[tuple[str, str], set[int]] = {}
    for ing in ings:
        ns = _ref(ing).namespace
        spec = ing.get("spec") or {}
        backends = [spec.get("defaultBackend")] + [
            p.get("backend")
            for r in spec.get("rules") or []
            for p in ((r or {}).get("http") or {}).get("paths") or []
            if isinstance(p, Mapping)
        ]
        for b in backends:
            svc = (b or {}).get("service") if isinstance(b, Mapping) else None
            if not isinstance(svc, Mapping) or not isinstance(svc.get("name"), str):
                continue
            number = (svc.get("port") or {}).get("number")
            if (ns, svc["name"]) not in known and isinstance(number, int) and 0 < number < 65536:
                wanted.setdefault((ns, svc["name"]), set()).add(number)
    out = list(services)
    for (ns, name), ports in sorted(wanted.items()):
        sps = tuple(
            ServicePort(ServicePortName(ns, name, f"p{n}", Protocol.TCP), n, cluster_ips=("192.0.2.1",))
            for n in sorted(ports)
        )
        out.append(Service(ns, name, ServiceType.CLUSTER_IP, sps))
    return out


def _relevant(r: Reason) -> bool:
    """The Ingress reading's reasons that matter here: not the annotations (named by
    `_annotation_reasons`), not a TLS Secret absent from the input (the certificateRef is
    written all the same)."""
    if r.field.startswith("metadata.annotations"):
        return False
    return not (r.field.startswith("spec.tls") and "not found" in r.message)


def _key(o: Obj) -> tuple[str, str]:
    m = o["metadata"]
    return (m.get("namespace", ""), m["name"])


def _ref(ing: Mapping[str, Any]) -> IngressRef:
    m = ing.get("metadata") or {}
    return IngressRef(str(m.get("namespace") or "default"), str(m.get("name") or ""))


def _class_of(ing: Mapping[str, Any], defaults: list[str], reasons: list[Reason]) -> str:
    spec = ing.get("spec") or {}
    ann = (ing.get("metadata") or {}).get("annotations") or {}
    cls = spec.get("ingressClassName") or ann.get("kubernetes.io/ingress.class")
    if isinstance(cls, str) and cls:
        return cls
    if len(defaults) == 1:
        return defaults[0]
    reasons.append(
        Reason(
            str(_ref(ing)),
            "spec.ingressClassName",
            f"no class (and no single default IngressClass): served by Gateway {DEFAULT_CLASS_GATEWAY!r}",
        )
    )
    return DEFAULT_CLASS_GATEWAY


def _dns_name(text: str) -> str:
    """A DNS-subdomain name from arbitrary text (lowercase, `*` as ``wildcard``)."""
    s = re.sub(r"[^a-z0-9.-]+", "-", text.lower().replace("*", "wildcard")).strip("-.")
    return s[:253].rstrip("-.") or "unnamed"


def _annotation_reasons(ref: IngressRef, ing: Mapping[str, Any]) -> list[Reason]:
    ann = (ing.get("metadata") or {}).get("annotations") or {}
    out = []
    for key in sorted(k for k in ann if isinstance(k, str) and k.startswith(PREFIX)):
        name = key[len(PREFIX) :]
        if name in _CARRIED or (name == "backend-protocol" and str(ann[key]).upper() == "HTTP"):
            continue
        if name.endswith("snippet"):
            why = "raw nginx configuration has no Gateway API equivalent"
        elif security_relevant(name):
            why = "Gateway API cannot express it; the Ingress's paths are left out rather than served without it"
        else:
            why = _WHY.get(name, "no Gateway API equivalent")
        out.append(Reason(str(ref), f"metadata.annotations[{key}]", f"not carried over: {why}"))
    return out


# --- one Gateway ---------------------------------------------------------------------------


class _Gateway:
    """One Ingress class: its servers become listeners and HTTPRoutes."""

    def __init__(
        self,
        name: str,
        servers: tuple[Server, ...],
        ingresses: Mapping[IngressRef, Mapping[str, Any]],
        options: MigrateOptions,
        reasons: list[Reason],
    ) -> None:
        self.name = name
        self.servers = servers
        self.ingresses = ingresses
        self.o = options
        self.reasons = reasons
        self.tls_listeners: dict[str, str] = {}  # host → listener name

    def note(self, ref: IngressRef, field_: str, message: str) -> None:
        self.reasons.append(Reason(str(ref), field_, message))

    def emit(self, gateways: list[Obj], grants: dict[str, set[str]], routes: list[Obj]) -> None:
        o = self.o
        all_ns = {"namespaces": {"from": "All"}}
        listeners: list[Obj] = [
            {"name": HTTP_LISTENER, "protocol": "HTTP", "port": o.http_port, "allowedRoutes": all_ns}
        ]
        plain_hosts = []
        for s in self.servers:
            if s.tls is None:
                if s.host and (s.routes or s.fallback):
                    plain_hosts.append(s.host)
                continue
            t = s.tls
            if not s.host:
                self.note(t.ingress, "spec.tls", "TLS without hosts: no HTTPS listener written (which hosts?)")
                continue
            lname = _dns_name("https-" + s.host)
            self.tls_listeners[s.host] = lname
            cert: Obj = {"kind": "Secret", "name": t.secret_name}
            if t.secret_namespace != o.gateway_namespace:
                cert["namespace"] = t.secret_namespace
                grants.setdefault(t.secret_namespace, set()).add(t.secret_name)
            listeners.append(
                {
                    "name": lname,
                    "protocol": "HTTPS",
                    "port": o.https_port,
                    "hostname": s.host,
                    "tls": {"mode": "Terminate", "certificateRefs": [cert]},
                    "allowedRoutes": all_ns,
                }
            )
        gateways.append(
            {
                "apiVersion": V1,
                "kind": "Gateway",
                "metadata": {"name": self.name, "namespace": o.gateway_namespace},
                "spec": {"gatewayClassName": o.gateway_class, "listeners": listeners},
            }
        )
        if plain_hosts:
            self.reasons.append(
                Reason(
                    f"Gateway {o.gateway_namespace}/{self.name}",
                    "spec.listeners",
                    "hosts without TLS are served on the HTTP listener only (ingress-nginx also answered "
                    "them on its HTTPS port with the default certificate): " + ", ".join(plain_hosts),
                )
            )
        for s in self.servers:
            by_ing: dict[IngressRef, list[Route]] = {}
            for r in s.routes:
                by_ing.setdefault(r.ingress, []).append(r)
            if s.fallback is not None:
                covered = any(r.path == "/" and r.path_type is not PathType.EXACT for r in s.routes)
                if not covered:
                    by_ing.setdefault(s.fallback.ingress, []).append(s.fallback)
            for owner in sorted(by_ing):
                routes.extend(self.routes_for(s, owner, by_ing[owner]))

    # --- HTTPRoutes of one Ingress on one host

    def route_name(self, ref: IngressRef, host: str) -> str:
        ing = self.ingresses.get(ref) or {}
        hosts = {str((r or {}).get("host") or "") for r in ((ing.get("spec") or {}).get("rules") or [])}
        if not hosts:  # a defaultBackend alone serves the catch-all; with rules, their hosts
            hosts.add("")
        if len(hosts) <= 1:
            return ref.name
        return _dns_name(f"{ref.name}-{host or 'any-host'}")

    def routes_for(self, s: Server, ref: IngressRef, routes: list[Route]) -> list[Obj]:
        opts = routes[0].options
        ann = ((self.ingresses.get(ref) or {}).get("metadata") or {}).get("annotations") or {}
        guarded = sorted(
            k[len(PREFIX) :]
            for k in ann
            if isinstance(k, str)
            and k.startswith(PREFIX)
            and security_relevant(k[len(PREFIX) :])
            and not k.endswith("snippet")
        )
        if guarded or opts.auth is not None or opts.allow_cidrs is not None:
            self.note(
                ref,
                "metadata.annotations",
                f"{', '.join(guarded)}: no HTTPRoute written for host {s.host or '*'} "
                "(fail closed: it would serve without that protection)",
            )
            return []
        name = self.route_name(ref, s.host)
        ssl = opts.force_ssl_redirect or (opts.ssl_redirect if opts.ssl_redirect is not None else s.tls is not None)
        rules: list[Obj] = []
        owns_root = any(r.path == "/" and r.path_type is not PathType.EXACT for r in routes)
        if opts.app_root is not None and not owns_root:
            self.note(ref, f"metadata.annotations[{PREFIX}app-root]", "no path / here: nothing to redirect (as before)")
        elif opts.app_root is not None:
            rules.append(
                {
                    "matches": [{"path": {"type": "Exact", "value": "/"}}],
                    "filters": [_redirect(None, None, None, opts.app_root, 302)],
                }
            )
        redirect = self.redirect_filter(ref, ann, opts.permanent_redirect, opts.permanent_redirect_code)
        for r in routes:
            rules.extend(self.rules_for(r, redirect, bool(opts.app_root)))
        if not rules:
            return []
        parent: Obj = {"group": GROUP, "kind": "Gateway", "namespace": self.o.gateway_namespace, "name": self.name}
        https = self.tls_listeners.get(s.host)
        # Named listeners only: a route without sectionName would also attach to every HTTPS
        # listener its hostnames intersect, and there outrank nothing it should.
        sections = [HTTP_LISTENER] + ([https] if https and not ssl else [])
        base: Obj = {"parentRefs": [{**parent, "sectionName": n} for n in sections]}
        if s.host:
            base["hostnames"] = [s.host]
        if s.host.startswith("*."):
            self.note(
                ref,
                "spec.rules[].host",
                f"{s.host}: a Gateway API wildcard covers any number of labels, an Ingress wildcard exactly one",
            )
        if not s.host:
            self.note(
                ref,
                "spec.rules[].host",
                "a route without hostnames also serves the paths other hosts' routes do not match "
                "(ingress-nginx sent those to the host's default backend)",
            )
        out = []
        if ssl:
            redirect_rules = [
                {"matches": r["matches"], "filters": [_redirect("https", None, None, None, 301)]} for r in rules
            ]
            out.append(
                _route(
                    f"{name}-https-redirect"[:253],
                    ref.namespace,
                    {**base, "parentRefs": [{**parent, "sectionName": HTTP_LISTENER}]},
                    redirect_rules,
                )
            )
            self.note(ref, "metadata.annotations", "HTTP → HTTPS redirect written with status 301 (ingress-nginx: 308)")
            if https is None:
                self.note(
                    ref,
                    "spec.tls",
                    f"HTTPS is forced but host {s.host or '*'} has no certificate here: only the redirect is "
                    "written (add an HTTPS listener and attach the route to it)",
                )
                return out
            base = {**base, "parentRefs": [{**parent, "sectionName": https}]}
        out.append(_route(name, ref.namespace, base, rules))
        return out

    def redirect_filter(
        self, ref: IngressRef, ann: Mapping[str, Any], permanent: str | None, permanent_code: int
    ) -> Obj | None:
        url, code, key = permanent, permanent_code, "permanent-redirect"
        if url is None and isinstance(ann.get(PREFIX + "temporal-redirect"), str):
            url, key = ann[PREFIX + "temporal-redirect"], "temporal-redirect"
            raw = ann.get(PREFIX + "temporal-redirect-code", "302")
            code = int(raw) if isinstance(raw, str) and raw.isdigit() else 302
        if url is None:
            return None
        f = f"metadata.annotations[{PREFIX}{key}]"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or re.fullmatch(r"[0-9.]+", parts.hostname):
            self.note(ref, f, f"not carried over: {url!r} is not an http(s) URL with a DNS host name")
            return None
        if parts.query or parts.fragment:
            self.note(ref, f, "not carried over: a RequestRedirect cannot set a query string or fragment")
            return None
        if code not in (301, 302, 303, 307, 308):
            self.note(ref, f, f"status {code} is not a redirect Gateway API allows; 302 written")
            code = 302
        path = parts.path or "/"
        if not _PATH.fullmatch(path):
            self.note(ref, f, f"not carried over: path {path!r} is not a plain path Gateway API takes")
            return None
        return _redirect(parts.scheme, parts.hostname, parts.port, path, code)

    def rules_for(self, r: Route, redirect: Obj | None, app_root: bool) -> list[Obj]:
        match, rewrite = self.match_for(r)
        if match is None:
            return []
        if app_root and match["path"] == {"type": "Exact", "value": "/"}:
            self.note(r.ingress, r.field, "Exact / is taken by the app-root redirect (as in ingress-nginx)")
            return []
        if redirect is not None:
            return [{"matches": [match], "filters": [redirect]}]
        backends = self.backends_for(r)
        if backends is None:
            return []
        rule: Obj = {"matches": [match]}
        if rewrite is not None:
            rule["filters"] = [{"type": "URLRewrite", "urlRewrite": {"path": rewrite}}]
        out = []
        if r.canary is not None and r.canary.policy.header is not None:
            p = r.canary.policy
            canary = self.backend_ref(r, r.canary.backend.ref.service, r.canary.backend, r.canary.ingress)
            if canary is not None:
                value = p.header_value or "always"
                hmatch = {**match, "headers": [{"type": "Exact", "name": p.header, "value": value}]}
                out.append({**rule, "matches": [hmatch], "backendRefs": [canary]})
                if p.header_value is None and 0 < p.weight:
                    self.note(
                        r.canary.ingress,
                        f"metadata.annotations[{PREFIX}canary-by-header]",
                        f'"{p.header}: never" cannot be expressed; those requests follow the weights',
                    )
        out.append({**rule, "backendRefs": backends})
        return out

    def backend_ref(self, r: Route, service: str, backend: Any, owner: IngressRef) -> Obj | None:
        port = backend.ref.port
        if not port.isdigit():
            if backend.service_port is None:
                self.note(
                    owner,
                    r.field,
                    f"Service port {port!r} is a name and the Service is not in the input: path left out",
                )
                return None
            port = str(backend.service_port.port)
        ref: Obj = {"name": service, "port": int(port)}
        if backend.ref.namespace != r.ingress.namespace:
            self.note(owner, r.field, "canary backend in another namespace: not carried over")
            return None
        return ref

    def backends_for(self, r: Route) -> list[Obj] | None:
        main = self.backend_ref(r, r.backend.ref.service, r.backend, r.ingress)
        if main is None:
            return None
        c = r.canary
        if c is None or c.policy.weight == 0:
            return [main]
        canary = self.backend_ref(r, c.backend.ref.service, c.backend, c.ingress)
        if canary is None:
            return [main]
        total, w = c.policy.weight_total, min(c.policy.weight, c.policy.weight_total)
        self.note(
            c.ingress,
            f"metadata.annotations[{PREFIX}canary-weight]",
            f"carried over as backendRef weights {total - w}/{w} on the HTTPRoute of {r.ingress} (host "
            f"{r.host or '*'}, path {r.path}); this Ingress gets no HTTPRoute of its own",
        )
        return [{**main, "weight": total - w}, {**canary, "weight": w}]

    def match_for(self, r: Route) -> tuple[Obj | None, Obj | None]:
        """The HTTPRoute path match of an Ingress path, and the URLRewrite path it needs."""
        target = r.options.rewrite_target
        if r.path_type is PathType.EXACT:
            m = {"path": {"type": "Exact", "value": r.path}}
        elif r.path_type is PathType.PREFIX or not r.regex:
            m = {"path": {"type": "PathPrefix", "value": r.path}}
            if r.path_type is PathType.IMPLEMENTATION_SPECIFIC:
                self.note(
                    r.ingress,
                    r.field,
                    f"ImplementationSpecific {r.path} written as PathPrefix: it matches whole path "
                    "segments (ingress-nginx also matched longer names, e.g. /foobar for /foo)",
                )
        else:
            return self.regex_match(r)
        if target is None:
            return m, None
        if "$" in target:
            # Exact and Prefix locations capture nothing: $n are empty in ingress-nginx too.
            target = re.sub(r"\$[1-9]", "", target) or "/"
        if not _PATH.fullmatch(target):
            self.note(
                r.ingress, r.field, f"rewrite-target {target} is not a plain path Gateway API takes; path left out"
            )
            return None, None
        return m, {"type": "ReplaceFullPath", "replaceFullPath": target}

    def regex_match(self, r: Route) -> tuple[Obj | None, Obj | None]:
        target = r.options.rewrite_target
        lit = r"((?:/[A-Za-z0-9_~@:+,=-][A-Za-z0-9_.~@:+,=-]*)*)"
        forms = [
            (rf"{lit}\(/\|\$\)\(\.\*\)", "$2"),  # /foo(/|$)(.*) → /$2
            (rf"{lit}/\(\.\*\)", "$1"),  # /foo/(.*) → /$1
        ]
        where = f"metadata.annotations[{PREFIX}rewrite-target]"
        for pattern, capture in forms:
            m = re.fullmatch(pattern, r.path)
            if m is None:
                continue
            prefix = m.group(1) or "/"
            match = {"path": {"type": "PathPrefix", "value": prefix}}
            self.note(r.ingress, r.field, f"regex {r.path} written as PathPrefix {prefix} (case-sensitive)")
            if target is None:
                return match, None
            head, sep, tail = target.partition(capture)
            if sep and not tail and head.endswith("/") and _PATH.fullmatch(head):
                value = head.rstrip("/") or "/"
                if value == "/" and prefix == "/":
                    return match, None
                return match, {"type": "ReplacePrefixMatch", "replacePrefixMatch": value}
            if "$" not in target and _PATH.fullmatch(target):
                return match, {"type": "ReplaceFullPath", "replaceFullPath": target}
            self.note(
                r.ingress,
                where,
                f"not carried over for {r.path}: {target} is not a prefix replacement; path left out",
            )
            return None, None
        if re.fullmatch(lit, r.path) and target is None:
            self.note(r.ingress, r.field, f"regex {r.path} written as PathPrefix (case-sensitive, whole segments)")
            return {"path": {"type": "PathPrefix", "value": r.path}}, None
        self.note(
            r.ingress,
            r.field,
            f"regex path {r.path}{' with rewrite-target ' + target if target else ''} cannot be expressed "
            "(Gateway API has no regex paths in kproxy); path left out",
        )
        return None, None


def _redirect(scheme: str | None, host: str | None, port: int | None, path: str | None, code: int) -> Obj:
    rr: Obj = {}
    if scheme is not None:
        rr["scheme"] = scheme
    if host is not None:
        rr["hostname"] = host
    if port is not None:
        rr["port"] = port
    if path is not None:
        rr["path"] = {"type": "ReplaceFullPath", "replaceFullPath": path}
    rr["statusCode"] = code
    return {"type": "RequestRedirect", "requestRedirect": rr}


def _route(name: str, namespace: str, spec: Obj, rules: list[Obj]) -> Obj:
    return {
        "apiVersion": V1,
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**spec, "rules": rules},
    }
