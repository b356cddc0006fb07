"""Frozen routing values: what `ingress.convert` produces and `ingress.nginx` renders.

Guarantees:
- Every string held here has already been validated by `ingress.convert` / `ingress.annotations`
  against a strict grammar (hosts are DNS names, Exact/Prefix paths use a small character set,
  regex paths have no quotes, braces, semicolons, whitespace or `$` except a final anchor). The
  renderer still quotes every value, so validation and quoting are two independent fences.
- Routes of one server are ordered the way the Kubernetes Ingress rules pick them: longest path
  first, Exact before Prefix on a tie, then ImplementationSpecific; ties beyond that break on the
  path text and on Ingress age, so the order never depends on input order.
- `Server.locations()` is the single source of truth for how routes become nginx locations; the
  renderer emits exactly those and `RoutingTable.match()` resolves a request with nginx's own
  location rules over them, so a unit test of `match` is a test of the rendered matching.

Path semantics (the seed's table, `docs` of the Ingress API):
- Exact ``/foo``: only ``/foo`` (case sensitive; ``/foo/`` does not match).
- Prefix ``/foo`` (trailing slashes ignored, stored as ``/foo``): ``/foo`` and ``/foo/...``,
  never ``/foobar``. Prefix ``/`` matches everything.
- ImplementationSpecific: kproxy gives it plain nginx prefix semantics (``/foo`` also matches
  ``/foobar``), as ingress-nginx does without regex; on an Ingress that sets ``use-regex`` or
  ``rewrite-target`` it is a case-insensitive PCRE anchored at the start (``~* "^<path>"``).
- A host where any route is a regex is rendered with regex locations only (as ingress-nginx
  does, because nginx checks regex locations after prefix ones); Exact and Prefix routes there are
  translated to anchored regexes that keep their Kubernetes meaning, so one Ingress's
  ``use-regex`` does not change how another Ingress's Exact/Prefix paths match.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kproxy.model import ServicePort


class PathType(enum.StrEnum):
    EXACT = "Exact"
    PREFIX = "Prefix"
    IMPLEMENTATION_SPECIFIC = "ImplementationSpecific"

    @property
    def rank(self) -> int:
        """Tie-break order among equally long paths: Exact beats Prefix (Ingress API rule)."""
        return _TYPE_RANK[self]


_TYPE_RANK = {PathType.EXACT: 0, PathType.PREFIX: 1, PathType.IMPLEMENTATION_SPECIFIC: 2}


class BackendProtocol(enum.StrEnum):
    HTTP = "HTTP"
    HTTPS = "HTTPS"
    GRPC = "GRPC"
    GRPCS = "GRPCS"


@dataclass(frozen=True, slots=True, order=True)
class IngressRef:
    """The object a route came from: an Ingress, or (`kind` ``HTTPRoute``) a Gateway API route."""

    namespace: str
    name: str
    kind: str = "Ingress"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Reason:
    """Why part of an object was rejected, ignored or fails closed; one log line each.

    `ref` names the object (``Ingress ns/name``), `field` the offending field path, so the line
    points at what to fix. Reasons are values: the caller logs them (event ``ingress_reason``)
    and, in the controller, may turn them into Events.
    """

    ref: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.field}: {self.message}"


@dataclass(frozen=True, slots=True, order=True)
class BackendRef:
    """A Service backend as written in the Ingress (port by number or by name)."""

    namespace: str
    service: str
    port: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port}"


@dataclass(frozen=True, slots=True)
class Backend:
    """A backend resolved against the Service; `unavailable` non-empty means it answers 503."""

    ref: BackendRef
    service_port: ServicePort | None = None
    unavailable: str = ""

    @property
    def ok(self) -> bool:
        return self.service_port is not None and not self.unavailable


@dataclass(frozen=True, slots=True)
class Cors:
    allow_origins: tuple[str, ...] = ("*",)
    allow_methods: tuple[str, ...] = ("GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS")
    allow_headers: tuple[str, ...] = (
        "DNT",
        "Keep-Alive",
        "User-Agent",
        "X-Requested-With",
        "If-Modified-Since",
        "Cache-Control",
        "Content-Type",
        "Range",
        "Authorization",
    )
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = True
    max_age: int = 1728000


@dataclass(frozen=True, slots=True)
class RateLimit:
    rps: int = 0
    rpm: int = 0
    connections: int = 0
    burst_multiplier: int = 5


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """htpasswd content (already validated) and where it came from."""

    realm: str
    secret_namespace: str
    secret_name: str
    htpasswd: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """The annotations of one Ingress as they apply to each of its locations.

    `deny` non-empty means the Ingress fails closed: every location it owns answers 503,
    because a security-relevant annotation (auth, allow list, snippet) could not be honoured.
    """

    use_regex: bool = False
    rewrite_target: str | None = None
    ssl_redirect: bool | None = None  # None: true exactly when the host has TLS
    force_ssl_redirect: bool = False
    cors: Cors | None = None
    rate_limit: RateLimit | None = None
    auth: BasicAuth | None = None
    allow_cidrs: tuple[str, ...] | None = None
    backend_protocol: BackendProtocol = BackendProtocol.HTTP
    proxy_body_size: str | None = None
    proxy_connect_timeout: int | None = None
    proxy_send_timeout: int | None = None
    proxy_read_timeout: int | None = None
    app_root: str | None = None
    permanent_redirect: str | None = None
    permanent_redirect_code: int = 301
    deny: str = ""

    @property
    def regex(self) -> bool:
        """ImplementationSpecific paths of this Ingress are regexes (ingress-nginx rule)."""
        return self.use_regex or self.rewrite_target is not None


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    header: str | None = None
    header_value: str | None = None
    weight: int = 0
    weight_total: int = 100


@dataclass(frozen=True, slots=True)
class Canary:
    """An alternative backend for a main route, from a ``canary: "true"`` Ingress."""

    backend: Backend
    policy: CanaryPolicy
    ingress: IngressRef


@dataclass(frozen=True, slots=True)
class TLSCertificate:
    """PEM text re-encoded by convert from a ``kubernetes.io/tls`` Secret."""

    secret_namespace: str
    secret_name: str
    cert_pem: str = field(repr=False)
    key_pem: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Conditions:
    """What an HTTPRoute match asks of a request besides its path (all must hold): an exact
    method, exact header values (names lowercase, compared case-insensitively as HTTP does),
    exact query parameter values (names case-sensitive, as the Gateway API says)."""

    method: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return self.method is None and not self.headers and not self.query

    def holds(self, method: str, headers: Mapping[str, str], query: Sequence[tuple[str, str]]) -> bool:
        """The same test the rendered maps make (first header value, any query occurrence)."""
        if self.method is not None and method != self.method:
            return False
        low = {k.lower(): v for k, v in headers.items()}
        if any(low.get(k) != v for k, v in self.headers):
            return False
        return all((k, v) in query for k, v in self.query)


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """RequestHeaderModifier / ResponseHeaderModifier: names as written, values literal data."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathEdit:
    """``ReplaceFullPath`` (the whole path becomes `value`) or ``ReplacePrefixMatch`` (the
    matched prefix `prefix` is replaced by `value`, element-wise)."""

    kind: str
    value: str
    prefix: str = "/"

    def apply(self, path: str) -> str:
        if self.kind == "ReplaceFullPath":
            return self.value
        rest = path[len(self.prefix) :] if self.prefix != "/" else path
        if not rest:
            return self.value
        return (self.value.rstrip("/") + rest) or "/"


@dataclass(frozen=True, slots=True)
class Redirect:
    """RequestRedirect, with the port already derived as the spec says (None: no port in the
    Location header, because it is the scheme's well-known one)."""

    scheme: str
    hostname: str | None
    port: int | None
    path: PathEdit | None
    status: int


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    backend: Backend
    weight: int


@dataclass(frozen=True, slots=True)
class GatewayAction:
    """What an HTTPRoute rule does with a request it matched. `backends` empty (or every weight
    0, or the weighted pick landing on an invalid backend) answers 500, as the spec requires;
    a redirect answers without any backend."""

    backends: tuple[WeightedBackend, ...] = ()
    request_headers: HeaderEdits | None = None
    response_headers: HeaderEdits | None = None
    redirect: Redirect | None = None
    rewrite_host: str | None = None
    rewrite_path: PathEdit | None = None
    timeout_ms: int | None = None
    rule: int = 0
    match: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    """One path of one rule of one Ingress (or one match of one HTTPRoute rule, `action` set), on
    one host ("" is the catch-all server)."""

    host: str
    path: str
    path_type: PathType
    regex: bool
    backend: Backend
    ingress: IngressRef
    field: str
    options: RouteOptions = RouteOptions()
    canary: Canary | None = None
    conditions: Conditions = Conditions()
    action: GatewayAction | None = None
    host_rank: tuple[int, int] = (0, 0)  # -(matching precise hostname length), -(hostname length)
    rank: tuple[Any, ...] = ()  # HTTPRoute ties: route age, namespace/name, rule and match index

    @property
    def gateway_key(self) -> tuple[Any, ...]:
        """Gateway API precedence among matches that all fit a request (smaller first): the
        route with the longest matching precise, then any, hostname; then Exact path, longest
        prefix, method, most headers, most query params; then `rank` (route age,
        namespace/name, rule and match index)."""
        c = self.conditions
        exact = 0 if self.path_type is PathType.EXACT else 1
        method = 0 if c.method is not None else 1
        return (self.host_rank, exact, -len(self.path), method, -len(c.headers), -len(c.query), self.rank)

    def covers(self, loc: Location) -> bool:
        """This match fits every request nginx sends to `loc` (a Gateway location)."""
        if self.path_type is PathType.EXACT:
            return loc.modifier == "=" and loc.pattern == self.path
        return self.path == "/" or loc.pattern == self.path or loc.pattern.startswith(self.path + "/")

    @property
    def conflict_key(self) -> tuple[str, str]:
        """The nginx location this route owns, independent of the host's regex mode.

        Two routes with the same key on one host cannot both be served: the older Ingress keeps
        it. Prefix ``/foo`` and ImplementationSpecific ``/foo/`` both own prefix ``/foo/``.
        """
        if self.regex:
            return ("~", self.path)
        if self.path_type is PathType.EXACT:
            return ("=", self.path)
        if self.path_type is PathType.PREFIX:
            return ("^", _prefix_location(self.path))
        return ("^", self.path)

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (-len(self.path), self.path_type.rank, self.path)


@dataclass(frozen=True, slots=True)
class Location:
    """One nginx location: modifier ``=``, ``""`` (prefix), ``~`` or ``~*``, and its pattern."""

    modifier: str
    pattern: str


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS for one host. `cert` None: the Secret is missing or invalid (see `reason`); the host
    stays HTTPS-only-in-spirit (redirects still apply) and is served with the default
    certificate, or its handshakes are rejected when none is configured. Never a silent
    downgrade to plaintext."""

    secret_namespace: str
    secret_name: str
    ingress: IngressRef
    cert: TLSCertificate | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Server:
    """One nginx server block. `port` 0: an Ingress host, served on the HTTP and HTTPS ports of
    the options; else a Gateway listener's port (`https`: TLS is terminated there), whose routes
    are HTTPRoute matches (`Route.action` set) picked with the Gateway API precedence."""

    host: str
    routes: tuple[Route, ...] = ()
    fallback: Route | None = None  # an Ingress defaultBackend; None: the controller's 404
    tls: ServerTLS | None = None
    port: int = 0
    https: bool = False

    @property
    def gateway(self) -> bool:
        return self.port != 0

    def gateway_locations(self) -> tuple[tuple[Location, tuple[Route, ...]], ...]:
        """Gateway server: one location per distinct match path, each with every match that fits
        all of its requests, in precedence order (the first whose conditions hold serves).

        Exact ``p`` → ``= p``; PathPrefix ``p`` → ``p/`` and ``= p`` (element-wise prefix); a
        location ending in ``/`` also gets its exact twin without the slash, so nginx never
        answers with its own 301; ``/`` always exists (404 when nothing fits)."""
        locs: set[Location] = {Location("", "/")}
        for r in self.routes:
            if r.path_type is PathType.EXACT:
                locs.add(Location("=", r.path))
            elif r.path != "/":
                locs.add(Location("", r.path + "/"))
                locs.add(Location("=", r.path))
        for loc in list(locs):
            if loc.pattern.endswith("/") and loc.pattern != "/":
                locs.add(Location("=", loc.pattern[:-1]))
        ordered = sorted(self.routes, key=lambda r: r.gateway_key)
        out = []
        for loc in sorted(locs, key=lambda x: (x.pattern, x.modifier)):
            out.append((loc, tuple(r for r in ordered if r.covers(loc))))
        return tuple(out)

    def gateway_match(
        self, path: str, method: str = "GET", headers: Mapping[str, str] | None = None, query: str = ""
    ) -> Route | None:
        """The match nginx serves for a normalized path: its location, then the first
        candidate whose conditions hold; None is a 404."""
        locs = self.gateway_locations()
        chosen = next((c for loc, c in locs if loc.modifier == "=" and loc.pattern == path), None)
        if chosen is None:
            best = max(
                (loc for loc, _ in locs if loc.modifier == "" and path.startswith(loc.pattern)),
                key=lambda loc: len(loc.pattern),
            )
            chosen = dict(locs)[best]
        pairs = [tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p]
        for r in chosen:
            if r.conditions.holds(method, headers or {}, pairs):  # type: ignore[arg-type]
                return r
        return None

    @property
    def is_catch_all(self) -> bool:
        return self.host == ""

    @property
    def regex(self) -> bool:
        """Regex locations for the whole host once any route's Ingress sets ``use-regex`` or
        ``rewrite-target`` (ingress-nginx's rule, kept so its users see the same matching)."""
        return any(r.options.regex for r in self.routes)

    def locations(self) -> tuple[tuple[Location, Route | None], ...]:
        """Routes as nginx locations, in render order; a None route is the controller's 404.

        Non-regex host: Exact → ``= p``; Prefix ``/`` → ``/``; Prefix ``p`` → ``p/`` plus the
        exact twin ``= p`` unless an Exact route owns ``p`` (Exact wins the tie);
        ImplementationSpecific → ``p`` (nginx's own prefix, including its 301 from ``p`` without
        the slash to ``p`` when ``p`` ends in ``/``). Regex host: every route becomes a regex
        location in route order (nginx takes the first regex that matches). A plain ``/``
        location always exists, so nothing reaches nginx's static-file default.
        """
        out: list[tuple[Location, Route | None]] = []
        if self.regex:
            for r in self.routes:
                out.append((_regex_location(r), r))
            out.append((Location("", "/"), self.fallback))
            return tuple(out)
        exact = {r.path for r in self.routes if r.path_type is PathType.EXACT and not r.regex}
        have_root = False
        for r in self.routes:
            if r.path_type is PathType.EXACT:
                out.append((Location("=", r.path), r))
            elif r.path_type is PathType.PREFIX:
                loc = _prefix_location(r.path)
                have_root = have_root or loc == "/"
                out.append((Location("", loc), r))
                if loc != "/" and r.path not in exact:
                    out.append((Location("=", r.path), r))
            else:
                have_root = have_root or r.path == "/"
                out.append((Location("", r.path), r))
        if not have_root:
            out.append((Location("", "/"), self.fallback))
        # nginx answers "/foo" with a 301 to "/foo/" when a proxy_pass location is named "/foo/"
        # (even an exact one), but Exact "/foo/" must not match "/foo" (the seed's table): give
        # "/foo" an exact location that goes where it would go without "/foo/".
        exact_names = {x.pattern for x, _ in out if x.modifier == "="}
        for named, _route in list(out):
            bare = named.pattern[:-1]
            if named.modifier == "=" and named.pattern.endswith("/") and bare and bare not in exact_names:
                out.append((Location("=", bare), _longest_prefix(out, bare)))
                exact_names.add(bare)
        return tuple(out)

    def match(self, path: str) -> tuple[Location, Route | None]:
        """The location nginx picks for a normalized request path (its documented algorithm:
        exact match, else longest prefix, then regexes in order unless none match). Not
        modelled: nginx's 301 from ``/p`` to ``/p/`` for an ImplementationSpecific ``/p/``."""
        locs = self.locations()
        for loc, route in locs:
            if loc.modifier == "=" and loc.pattern == path:
                return loc, route
        best: tuple[Location, Route | None] | None = None
        for loc, route in locs:
            if loc.modifier == "" and path.startswith(loc.pattern):
                if best is None or len(loc.pattern) > len(best[0].pattern):
                    best = (loc, route)
        for loc, route in locs:
            if loc.modifier in ("~", "~*"):
                flags = re.IGNORECASE if loc.modifier == "~*" else 0
                if re.search(loc.pattern, path, flags):
                    return loc, route
        assert best is not None  # a "/" location always exists
        return best


@dataclass(frozen=True, slots=True)
class Match:
    """Where a request ends up: a server, and the route (None: the controller's 404)."""

    server: Server
    location: Location
    route: Route | None

    @property
    def target(self) -> str:
        """``svc:port`` of the serving backend, ``503`` if it cannot serve, ``404`` if none."""
        if self.route is None:
            return "404"
        if self.route.options.deny or not self.route.backend.ok:
            return "503"
        return f"{self.route.backend.ref.service}:{self.route.backend.ref.port}"


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Everything nginx serves, plus why anything was left out.

    `servers` is sorted by host with the catch-all ("") first. `ours` lists every Ingress of our
    class (accepted or not): those, and only those, get status. `reasons` is sorted.
    """

    servers: tuple[Server, ...]
    ours: tuple[IngressRef, ...] = ()
    reasons: tuple[Reason, ...] = ()

    def server(self, host: str) -> Server | None:
        for s in self.servers:
            if s.host == host and s.port == 0:
                return s
        return None

    def server_for(self, host_header: str) -> Server:
        """The Ingress server nginx selects for a Host header: exact name, else the wildcard
        covering exactly one more DNS label, else the catch-all."""
        host = _bare_host(host_header)
        by_host = {s.host: s for s in self.servers if s.port == 0}
        if host and host in by_host:
            return by_host[host]
        if "." in host:
            wild = "*." + host.split(".", 1)[1]
            if wild in by_host:
                return by_host[wild]
        return by_host[""]

    def gateway_server_for(self, port: int, host_header: str) -> Server | None:
        """The Gateway server nginx selects on a listener port: exact name, else the longest
        wildcard (``*.example.com`` covers any number of labels, as Gateway listeners do), else
        the port's catch-all; None when no listener uses the port."""
        host = _bare_host(host_header)
        by_host = {s.host: s for s in self.servers if s.port == port}
        if not by_host:
            return None
        if host in by_host:
            return by_host[host]
        labels = host.split(".")
        for i in range(1, len(labels)):
            wild = "*." + ".".join(labels[i:])
            if wild in by_host:
                return by_host[wild]
        return by_host.get("")

    def match(self, host_header: str, path: str) -> Match:
        server = self.server_for(host_header)
        loc, route = server.match(path)
        return Match(server, loc, route)


def _bare_host(host_header: str) -> str:
    host = host_header.lower().rstrip(".")
    if host.startswith("["):
        return host[: host.find("]") + 1]
    if ":" in host:
        return host.rsplit(":", 1)[0]
    return host


def ingress_age_key(created: datetime | None, ref: IngressRef) -> tuple[int, datetime, str, str]:
    """Older first; objects without a timestamp count as newest; then namespace/name."""
    if created is None:
        return (1, _EPOCH_MIN, ref.namespace, ref.name)
    return (0, created, ref.namespace, ref.name)


_EPOCH_MIN = datetime.min.replace(tzinfo=UTC)


def regex_escape(literal: str) -> str:
    """Escape a validated literal path for PCRE (only characters that are special there)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in literal)


_REGEX_SPECIAL = frozenset(".^$|?*+()[]{}\\")


def _longest_prefix(locs: list[tuple[Location, Route | None]], path: str) -> Route | None:
    best = max(
        (loc for loc, _ in locs if loc.modifier == "" and path.startswith(loc.pattern)),
        key=lambda loc: len(loc.pattern),
    )
    return next(route for loc, route in locs if loc is best)


def _prefix_location(path: str) -> str:
    return "/" if path == "/" else path + "/"


def _regex_location(r: Route) -> Location:
    if r.regex:
        return Location("~*", "^" + r.path)
    p = regex_escape(r.path)
    if r.path_type is PathType.EXACT:
        return Location("~", f"^{p}$")
    if r.path_type is PathType.PREFIX:
        return Location("~", "^/" if r.path == "/" else f"^{p}(?:/|$)")
    return Location("~", "^" + p)
