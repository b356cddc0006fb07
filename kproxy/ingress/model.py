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
from dataclasses import dataclass, field
from datetime import UTC, datetime

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
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"Ingress {self.namespace}/{self.name}"


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
class Route:
    """One path of one rule of one Ingress, on one host ("" is the catch-all server)."""

    host: str
    path: str
    path_type: PathType
    regex: bool
    backend: Backend
    ingress: IngressRef
    field: str
    options: RouteOptions = RouteOptions()
    canary: Canary | None = None

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
    host: str
    routes: tuple[Route, ...] = ()
    fallback: Route | None = None  # an Ingress defaultBackend; None: the controller's 404
    tls: ServerTLS | None = None

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
            if s.host == host:
                return s
        return None

    def server_for(self, host_header: str) -> Server:
        """The server nginx selects for a Host header: exact name, else the wildcard covering
        exactly one more DNS label, else the catch-all."""
        host = host_header.lower().rstrip(".")
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        elif ":" in host:
            host = host.rsplit(":", 1)[0]
        by_host = {s.host: s for s in self.servers}
        if host and host in by_host:
            return by_host[host]
        if "." in host:
            wild = "*." + host.split(".", 1)[1]
            if wild in by_host:
                return by_host[wild]
        return by_host[""]

    def match(self, host_header: str, path: str) -> Match:
        server = self.server_for(host_header)
        loc, route = server.match(path)
        return Match(server, loc, route)


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
