"""A `RoutingTable` → the complete nginx.conf text and the files it references (pure).

Guarantees:
- Deterministic: the same table, options and endpoints give byte-identical text and files;
  everything is emitted in sorted or route order, and no clock or random value is read.
- Injection-proof by construction, on top of the grammar checks in `convert`/`annotations`:
  every value that came from a user is emitted through `_q` (a double-quoted literal: backslash
  and quote escaped, control characters, non-ASCII and `$` refused, so it cannot end its token,
  its directive or its block, nor expand a variable), `_re` (the same for regexes, where nginx
  does not expand `$`), or `_script` (quoted, `$` allowed only for ``$1``..``$9`` and the
  variables this module itself uses). Names we build (upstreams, zones, variables) are checked
  against ``[A-Za-z0-9_]`` before use. A value that would break these rules raises
  `UnsafeValue`: that is a validation bug, and failing loudly beats emitting it.
- Every server has a plain ``location /``: no request ever reaches nginx's static file handler.
- Upstreams: ``service`` mode (default) uses the Service's ClusterIP:port as the only server of
  the upstream, so endpoint churn never changes the text (kproxy balances at L4); ``endpoints``
  mode lists ready endpoints (serving-terminating ones when none is ready) and must be
  re-rendered, and nginx reloaded, when they change. A backend with nothing to send to renders
  ``return 503`` and a reason.
- Files: TLS certificate/key and htpasswd paths under `cert_dir` are derived from the Secret's
  namespace, name and a hash of the content, so a changed Secret gets a new file and the
  configuration still running keeps reading the old one until it is replaced. Modes: keys 0600,
  certificates 0644, htpasswd 0640 (nginx workers read it per request; the writer must give the
  worker group read access).

Why one module of ~600 lines: one deterministic renderer; every directive kproxy emits and the
escaping that keeps user data out of nginx syntax live together so they can be audited together.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kproxy.errors import ConfigError, KproxyError
from kproxy.ingress.model import (
    Backend,
    BackendProtocol,
    Canary,
    HeaderEdits,
    Location,
    PathEdit,
    Reason,
    Route,
    RoutingTable,
    Server,
    regex_escape,
)
from kproxy.model import Endpoint, ServicePortName

HTTP_REDIRECT_CODE = 308  # ingress-nginx's http-redirect-code default


class UpstreamMode(enum.StrEnum):
    SERVICE = "service"
    ENDPOINTS = "endpoints"


class UnsafeValue(KproxyError):
    """A value that is not safe to place in the configuration reached the renderer (a bug)."""


_SAFE_PATH = re.compile(r"/[A-Za-z0-9/_.@:+,=-]*")


@dataclass(frozen=True, slots=True)
class NginxOptions:
    http_port: int = 80
    https_port: int | None = 443
    listen_addresses: tuple[str, ...] = ("0.0.0.0",)
    cert_dir: str = "/var/lib/kproxy/ingress/certs"
    run_dir: str = "/var/lib/kproxy/ingress"  # pid file and temp directories
    upstream_mode: UpstreamMode = UpstreamMode.SERVICE
    default_certificate: tuple[str, str] | None = None  # (cert, key) paths for unknown SNI names
    error_log: str = "stderr"
    error_log_level: str = "notice"
    access_log: str | None = None  # None: off
    worker_processes: int = 0  # 0: auto
    worker_connections: int = 4096
    worker_shutdown_timeout: int = 240
    user: tuple[str, str] | None = None  # (user, group) for workers when nginx starts as root
    http2: bool = True
    upstream_keepalive: int = 32
    limit_zone_size: str = "5m"
    # Gateway listener port → the port nginx listens on (identity when absent), so a Gateway's
    # port 80 can be served on another port (tests, hostPort remapping).
    gateway_ports: tuple[tuple[int, int], ...] = ()

    def listen_port(self, listener_port: int) -> int:
        return dict(self.gateway_ports).get(listener_port, listener_port)

    def __post_init__(self) -> None:
        for port in (self.http_port, self.https_port):
            if port is not None and not 0 < port < 65536:
                raise ConfigError(f"port {port} out of range")
        for name, path in (("cert_dir", self.cert_dir), ("run_dir", self.run_dir)):
            if not _SAFE_PATH.fullmatch(path):
                raise ConfigError(f"{name} {path!r} must be an absolute path of [A-Za-z0-9/_.@:+,=-]")
        for path in (self.default_certificate or ()) + ((self.access_log,) if self.access_log else ()):
            if not _SAFE_PATH.fullmatch(path):
                raise ConfigError(f"{path!r} must be an absolute path of [A-Za-z0-9/_.@:+,=-]")
        if self.error_log != "stderr" and not _SAFE_PATH.fullmatch(self.error_log):
            raise ConfigError(f"error_log {self.error_log!r} must be stderr or an absolute path")
        if self.error_log_level not in ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"):
            raise ConfigError(f"error log level {self.error_log_level!r} unknown")
        if not self.listen_addresses:
            raise ConfigError("no listen address")
        for a in self.listen_addresses:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ConfigError(f"listen address {a!r} is not an IP address") from None
        for u in self.user or ():
            if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", u):
                raise ConfigError(f"user/group {u!r} is not a plain name")
        if not re.fullmatch(r"[0-9]{1,4}[km]", self.limit_zone_size):
            raise ConfigError(f"limit zone size {self.limit_zone_size!r} is not like 5m")


@dataclass(frozen=True, slots=True)
class FileSpec:
    content: bytes = field(repr=False)
    mode: int


@dataclass(frozen=True, slots=True)
class NginxConfig:
    """The rendered configuration: text, the files it references, and why anything answers 503."""

    text: str
    files: tuple[tuple[str, FileSpec], ...] = ()
    reasons: tuple[Reason, ...] = ()

    def __str__(self) -> str:
        return self.text

    @property
    def file_map(self) -> dict[str, FileSpec]:
        return dict(self.files)


def render(
    table: RoutingTable,
    options: NginxOptions = NginxOptions(),
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]] | None = None,
) -> NginxConfig:
    """The whole nginx.conf for `table`; `endpoints` is read only in ``endpoints`` mode."""
    return _Renderer(table, options, endpoints or {}).run()


# --- quoting -------------------------------------------------------------------------------

_SCRIPT_VARS = (
    "host",
    "request_uri",
    "http_origin",
    "kproxy_upstream",
    "kproxy_path",
    "is_args",
    "args",
)
_SCRIPT_DOLLAR = re.compile(
    r"\$(?:[1-9]|(?:" + "|".join(_SCRIPT_VARS) + r"|kproxy_split_[0-9a-f]{16})(?![A-Za-z0-9_]))"
)
_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")


def _check_text(s: str) -> None:
    if not (s.isascii() and s.isprintable()):
        raise UnsafeValue(f"non-printable or non-ASCII value {s[:60]!r}")


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _q(s: str) -> str:
    """A literal: quoted, and refusing `$` (it would expand a variable where nginx allows them)."""
    _check_text(s)
    if "$" in s:
        raise UnsafeValue(f"$ in a literal value {s[:60]!r}")
    return _quote(s)


def _re(s: str) -> str:
    """A regular expression in a position nginx never expands variables in (location, rewrite
    pattern, server_name, map key)."""
    _check_text(s)
    return _quote(s)


def _script(s: str) -> str:
    """A value nginx expands: `$` only as ``$1``..``$9`` or one of the variables we set."""
    _check_text(s)
    if s.count("$") != len(_SCRIPT_DOLLAR.findall(s)):
        raise UnsafeValue(f"unexpected $ in {s[:60]!r}")
    return _quote(s)


def _value(s: str) -> str:
    """Literal data in a position nginx expands (header values, redirect targets): quoted, and
    each `$` written as ``${kproxy_dollar}``, a variable that holds a plain dollar sign."""
    _check_text(s)
    return _quote(s.replace("$", "${kproxy_dollar}"))


def _pcre_literal(s: str) -> str:
    """`s` as a PCRE that matches exactly it: every non-alphanumeric character escaped."""
    return "".join(c if c.isalnum() else "\\" + c for c in s)


_SIZE = re.compile(r"[0-9]{1,9}[kmg]?")


def _token(s: str, grammar: re.Pattern[str]) -> str:
    """An unquoted token (a size): it must match its grammar here too."""
    if not grammar.fullmatch(s):
        raise UnsafeValue(f"bad token {s[:60]!r}")
    return s


def _name(s: str) -> str:
    if not _NAME.fullmatch(s):
        raise UnsafeValue(f"bad generated name {s[:60]!r}")
    return s


def _ident(*parts: str) -> str:
    """A readable, unique nginx name from validated DNS-ish parts (``-``/``.`` are not allowed in
    variable names; the hash keeps ``a-b``/``a.b`` apart)."""
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9]", "_", "_".join(parts))[:60]
    return _name(f"{readable}_{digest}")


def _addr(ip: str, port: int) -> str:
    ip = str(ipaddress.ip_address(ip))  # re-validated: it is about to become a token
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def line(self, *tokens: str) -> None:
        self.lines.append("    " * self.depth + " ".join(tokens) + ";")

    def open(self, *tokens: str) -> None:
        self.lines.append("    " * self.depth + " ".join(tokens) + " {")
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        self.lines.append("    " * self.depth + "}")

    def blank(self) -> None:
        self.lines.append("")

    def text(self) -> str:
        assert self.depth == 0
        return "\n".join(self.lines) + "\n"


# --- rendering -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Upstream:
    name: str
    servers: tuple[str, ...]
    unavailable: str = ""


class _Renderer:
    def __init__(
        self,
        table: RoutingTable,
        options: NginxOptions,
        endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    ) -> None:
        self.table = table
        self.o = options
        self.endpoints = endpoints
        self.upstreams: dict[str, _Upstream] = {}
        self.files: dict[str, FileSpec] = {}
        self.reasons: set[Reason] = set()
        self.http_blocks: dict[str, list[str]] = {}  # sorted name → pre-rendered http-level lines
        self.gateway_defaults: set[int] = set()
        self.dollar = False

    # --- entry

    def run(self) -> NginxConfig:
        servers = _Writer()
        servers.depth = 1
        # A Gateway catch-all takes its port's default server from the (then unused) Ingress one.
        self.gateway_defaults = {self.o.listen_port(s.port) for s in self.table.servers if s.gateway and s.is_catch_all}
        for s in self.table.servers:
            if s.gateway:
                self.gateway_server(servers, s)
            else:
                self.server(servers, s)
        w = _Writer()
        self.main(w)
        w.open("http")
        self.http_settings(w)
        for name in sorted(self.http_blocks):
            w.blank()
            w.lines.extend(self.http_blocks[name])
        for name in sorted(self.upstreams):
            up = self.upstreams[name]
            if up.unavailable:
                continue
            w.blank()
            w.open("upstream", _name(up.name))
            for addr in up.servers:
                w.line("server", addr)
            w.line("keepalive", str(int(self.o.upstream_keepalive)))
            w.close()
        w.lines.extend(servers.lines)
        w.close()
        return NginxConfig(
            text=w.text(),
            files=tuple(sorted(self.files.items())),
            reasons=tuple(sorted(self.reasons, key=lambda r: (r.ref, r.field, r.message))),
        )

    def main(self, w: _Writer) -> None:
        o = self.o
        w.lines.append("# Generated by kproxy ingress; do not edit.")
        if o.user:
            w.line("user", _q(o.user[0]), _q(o.user[1]))
        w.line("worker_processes", str(int(o.worker_processes)) if o.worker_processes else "auto")
        w.line("worker_shutdown_timeout", f"{int(o.worker_shutdown_timeout)}s")
        w.line("pid", _q(f"{o.run_dir}/nginx.pid"))
        w.line("error_log", _q(o.error_log), o.error_log_level)
        w.open("events")
        w.line("worker_connections", str(int(o.worker_connections)))
        w.close()

    def http_settings(self, w: _Writer) -> None:
        o = self.o
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            w.line(f"{kind}_temp_path", _q(f"{o.run_dir}/{kind}_temp"))
        w.line("access_log", _q(o.access_log) if o.access_log else "off")
        w.line("default_type", "application/octet-stream")
        w.line("server_tokens", "off")
        names = [len(self._server_name(s)) for s in self.table.servers]
        w.line("server_names_hash_bucket_size", str(_pow2_at_least(max(names, default=0) + 16, 64)))
        w.line("server_names_hash_max_size", str(_pow2_at_least(4 * len(names), 1024)))
        w.line("variables_hash_bucket_size", "128")
        w.line("variables_hash_max_size", "4096")
        w.line("map_hash_bucket_size", "128")
        w.line("client_max_body_size", "1m")
        w.line("proxy_connect_timeout", "5s")
        w.line("proxy_send_timeout", "60s")
        w.line("proxy_read_timeout", "60s")
        w.line("proxy_http_version", "1.1")
        # Upstream keepalive needs an empty Connection header; the map gives exactly "" for every
        # request that is not a protocol upgrade, and "upgrade" for websockets.
        w.open("map", "$http_upgrade", "$kproxy_connection")
        w.line("default", '"upgrade"')
        w.line('""', '""')
        w.close()
        for name, value in _BASE_HEADERS:
            w.line("proxy_set_header", name, value)
        for name, value in _BASE_HEADERS[:7]:
            w.line("grpc_set_header", name, value)
        if self.dollar:
            w.open("geo", "$kproxy_dollar")
            w.line("default", '"$"')
            w.close()
        w.line("limit_req_status", "503")
        w.line("limit_conn_status", "503")
        if o.https_port is not None:
            w.line("ssl_protocols", "TLSv1.2", "TLSv1.3")
            w.line("ssl_session_cache", "shared:kproxy_ssl:10m")

    # --- servers

    def _server_name(self, s: Server) -> str:
        if s.is_catch_all:
            return "_"
        if s.host.startswith("*."):
            # nginx's own "*.foo.com" also matches a.b.foo.com; the Ingress wildcard covers
            # exactly one label, as ingress-nginx's buildServerName does.
            return "~^[^.]+" + re.escape("." + s.host[2:]).replace("\\-", "-") + "$"
        return s.host

    def server(self, w: _Writer, s: Server) -> None:
        o = self.o
        http = not (s.is_catch_all and o.http_port in self.gateway_defaults)
        tls = o.https_port is not None and (s.is_catch_all or s.tls is not None)
        tls = tls and not (s.is_catch_all and o.https_port in self.gateway_defaults)
        if not http and not tls:
            return  # both ports' default servers are Gateway catch-alls
        w.blank()
        w.open("server")
        name = self._server_name(s)
        w.line("server_name", _re(name) if name.startswith("~") else _q(name))
        default = " default_server" if s.is_catch_all else ""
        if http:
            for a in sorted(o.listen_addresses):
                w.line("listen", _addr(a, o.http_port) + default)
        if tls:
            assert o.https_port is not None
            flags = " ssl" + (" http2" if o.http2 else "") + default
            for a in sorted(o.listen_addresses):
                w.line("listen", _addr(a, o.https_port) + flags)
            self.certificate(w, s)
        for loc, route in s.locations():
            self.location(w, s, loc, route)
        w.close()

    def certificate(self, w: _Writer, s: Server) -> None:
        o = self.o
        cert = s.tls.cert if s.tls is not None else None
        if cert is not None:
            digest = hashlib.sha256((cert.cert_pem + cert.key_pem).encode()).hexdigest()[:12]
            base = f"{o.cert_dir}/tls_{cert.secret_namespace}_{cert.secret_name}_{digest}"
            self.files[base + ".crt"] = FileSpec(cert.cert_pem.encode(), 0o644)
            self.files[base + ".key"] = FileSpec(cert.key_pem.encode(), 0o600)
            w.line("ssl_certificate", _q(base + ".crt"))
            w.line("ssl_certificate_key", _q(base + ".key"))
        elif o.default_certificate is not None:
            w.line("ssl_certificate", _q(o.default_certificate[0]))
            w.line("ssl_certificate_key", _q(o.default_certificate[1]))
        else:
            # No certificate to offer: refuse the handshake rather than serve a wrong one.
            w.line("ssl_reject_handshake", "on")

    # --- Gateway servers

    def gateway_server(self, w: _Writer, s: Server) -> None:
        """A Gateway listener host: each location tries its candidate matches in precedence
        order (``if`` on a map variable that is "1" when all conditions hold, ``return`` of a
        private code), and ``error_page`` sends the request, method and body intact, to the
        match's named location, which applies the filters and proxies. No candidate: 404."""
        o = self.o
        w.blank()
        w.open("server")
        w.line("server_name", _q("_" if s.is_catch_all else s.host))
        flags = (" ssl" + (" http2" if o.http2 else "")) if s.https else ""
        default = " default_server" if s.is_catch_all else ""
        for a in sorted(o.listen_addresses):
            w.line("listen", _addr(a, o.listen_port(s.port)) + flags + default)
        if s.https:
            self.certificate(w, s)
        named: dict[str, Route] = {}
        for loc, cands in s.gateway_locations():
            if loc.modifier == "=":
                w.open("location", "=", _q(loc.pattern))
            else:
                w.open("location", _q(loc.pattern))
            tail = "404"
            for i, r in enumerate(cands[:_MAX_CANDIDATES]):
                code = str(_FIRST_CODE + i)
                name = self.named(r)
                named[name] = r
                w.line("error_page", code, "=", "@" + name)
                if r.conditions.empty:
                    tail = code
                    break
                w.open("if", f"(${self.conditions_var(r)})")
                w.line("return", code)
                w.close()
            w.line("return", tail)
            w.close()
        for name in sorted(named):
            w.open("location", "@" + name)
            try:
                self.gateway_action(w, s, named[name])
            finally:
                w.close()
        w.close()

    @staticmethod
    def named(r: Route) -> str:
        a = r.action
        assert a is not None
        return _ident("kproxy", r.ingress.namespace, r.ingress.name, str(a.rule), str(a.match))

    def _map_block(self, prefix: str, source: str, key: str, value: str = '"1"', default: str = '"0"') -> str:
        digest = hashlib.sha256(f"{source} {key} {value}".encode()).hexdigest()[:16]
        var = _name(f"{prefix}_{digest}")
        self.http_blocks[f"map {var}"] = [
            f"    map {source} ${var} {{",
            f"        default {default};",
            f"        {key} {value};",
            "    }",
        ]
        return var

    def conditions_var(self, r: Route) -> str:
        """A variable that is "1" exactly when every condition of `r` holds."""
        c = r.conditions
        parts = []
        if c.method is not None:
            parts.append(self._map_block("kproxy_m", "$request_method", _re("~^" + _pcre_literal(c.method) + "$")))
        for hname, value in c.headers:
            var = "$http_" + _name(hname.lower().replace("-", "_"))
            parts.append(self._map_block("kproxy_h", var, _re("~^" + _pcre_literal(value) + "$")))
        for qname, value in c.query:
            rx = "~(?:^|&)" + _pcre_literal(qname) + "=" + _pcre_literal(value) + "(?:&|$)"
            parts.append(self._map_block("kproxy_q", "$args", _re(rx)))
        source = '"' + "".join(f"${p}" for p in parts) + '"'
        return self._map_block("kproxy_c", source, '"' + "1" * len(parts) + '"', '"1"', '""')

    def gateway_action(self, w: _Writer, s: Server, r: Route) -> None:
        a = r.action
        assert a is not None
        if a.redirect is not None:
            rd = a.redirect
            target = f"{rd.scheme}://"
            host = "$host" if rd.hostname is None else rd.hostname
            port = f":{int(rd.port)}" if rd.port is not None else ""
            if rd.path is None:
                path = "$request_uri"
            else:
                self.path_edit(w, rd.path)
                path = "$kproxy_path$is_args$args"
            # Only validated hostnames and the variables above are in the target; the path
            # computed from user data went through `path_edit`'s quoting.
            w.line("return", str(int(rd.status)), _script(target + host + port + path))
            return
        shares = self.shares(r)
        if shares is None:
            w.line("return", "500")  # spec: a rule with no usable backend answers 500
            return
        target = shares
        if target.startswith("$"):
            w.open("if", f'({target} = "")')
            w.line("return", "500")  # the weighted pick landed on an invalid backend
            w.close()
        if a.rewrite_path is not None:
            self.path_edit(w, a.rewrite_path)
            w.line("rewrite", _re("^"), "$kproxy_path", "break")
        if a.request_headers is not None or a.rewrite_host is not None:
            self.request_headers(w, r, a.request_headers or HeaderEdits(), a.rewrite_host)
        if a.response_headers is not None:
            h = a.response_headers
            for name in [n for n, _ in h.set] + list(h.remove):
                w.line("proxy_hide_header", _q(name))
            for name, value in list(h.set) + list(h.add):
                self.dollar = self.dollar or "$" in value
                w.line("add_header", _q(name), _value(value), "always")
        if a.timeout_ms is not None:
            ms = a.timeout_ms or 86_400_000  # 0: no timeout (one day, nginx needs a value)
            w.line("proxy_connect_timeout", f"{min(int(ms), 75_000)}ms")
            w.line("proxy_send_timeout", f"{int(ms)}ms")
            w.line("proxy_read_timeout", f"{int(ms)}ms")
        w.line("proxy_pass", _script("http://" + target))

    def path_edit(self, w: _Writer, edit: PathEdit) -> None:
        """Set ``$kproxy_path`` to the edited path (`PathEdit.apply`, in nginx)."""
        if edit.kind == "ReplaceFullPath":
            w.line("set", "$kproxy_path", _q(edit.value))
            return
        w.line("set", "$kproxy_path", _q(edit.value))
        head = edit.value.rstrip("/")
        rx = "^(/.*)$" if edit.prefix == "/" else "^" + regex_escape(edit.prefix) + "(/.*)$"
        w.open("if", f"($uri ~ {_re(rx)})")
        w.line("set", "$kproxy_path", _script(head + "$1"))
        w.close()

    def request_headers(self, w: _Writer, r: Route, edits: HeaderEdits, host: str | None) -> None:
        """proxy_set_header in a location replaces the whole inherited list: emit ours again
        with the edits applied (set replaces, add appends with ",", remove sends nothing)."""
        out: dict[str, tuple[str, str]] = {n.lower(): (n, v) for n, v in _BASE_HEADERS}
        if host is not None:
            out["host"] = ("Host", _q(host))
        for name, value in edits.set:
            self.dollar = self.dollar or "$" in value
            out[name.lower()] = (name, _value(value))
        for name, value in edits.add:
            self.dollar = self.dollar or "$" in value
            var = "$http_" + _name(name.lower().replace("-", "_"))
            digest = hashlib.sha256(f"{name} {value}".encode()).hexdigest()[:16]
            mv = _name(f"kproxy_add_{digest}")
            joined = _value(value)
            self.http_blocks[f"map {mv}"] = [
                f"    map {var} ${mv} {{",
                f"        default {joined[0]}{var},{joined[1:]};",
                f'        "" {joined};',
                "    }",
            ]
            out[name.lower()] = (name, f"${mv}")
        for name in edits.remove:
            out[name.lower()] = (name, '""')
        for name, value in out.values():
            w.line("proxy_set_header", _q(name), value)

    def shares(self, r: Route) -> str | None:
        """The proxy target: an upstream name, or a split_clients variable whose value is an
        upstream name or "" (an invalid backend's share); None: nothing valid to send to."""
        a = r.action
        assert a is not None
        picks: list[tuple[str, int]] = []
        for wb in a.backends:
            if wb.weight <= 0:
                continue
            up = self.upstream(r, wb.backend) if wb.backend.ok else None
            picks.append((up.name if up is not None else "", wb.weight))
        total = sum(w for _, w in picks)
        if not picks or total == 0 or all(not n for n, _ in picks):
            return None
        if len(picks) == 1:
            return _name(picks[0][0])
        digest = hashlib.sha256(f"{r.host} {r.ingress} {r.field}".encode()).hexdigest()[:16]
        var = _name(f"kproxy_split_{digest}")
        lines = [f'    split_clients "$request_id" ${var} {{']
        for name, weight in picks[:-1]:
            pct = (weight * 10000 // total) / 100
            if pct > 0:
                lines.append(f"        {pct:.2f}% {_q(name)};")
        lines.append(f"        * {_q(picks[-1][0])};")
        lines.append("    }")
        self.http_blocks[f"split {var}"] = lines
        return f"${var}"

    def location(self, w: _Writer, s: Server, loc: Location, route: Route | None) -> None:
        if loc.modifier in ("~", "~*"):
            w.open("location", loc.modifier, _re(loc.pattern))
        elif loc.modifier == "=":
            w.open("location", "=", _q(loc.pattern))
        else:
            w.open("location", _q(loc.pattern))
        try:
            self.location_body(w, s, loc, route)
        finally:
            w.close()

    def location_body(self, w: _Writer, s: Server, loc: Location, route: Route | None) -> None:
        if route is None:
            w.line("return", "404")  # the controller's default backend
            return
        opts = route.options
        if opts.deny:
            w.line("return", "503")
            return
        main = self.upstream(route, route.backend)
        if main is None:
            w.line("return", "503")
            return
        o = self.o
        redirect = opts.force_ssl_redirect or (
            opts.ssl_redirect if opts.ssl_redirect is not None else s.tls is not None
        )
        if redirect and o.https_port is not None:
            suffix = "" if o.https_port == 443 else f":{o.https_port}"
            w.open("if", '($scheme = "http")')
            w.line("return", str(HTTP_REDIRECT_CODE), _script(f"https://$host{suffix}$request_uri"))
            w.close()
        if opts.permanent_redirect is not None:
            w.line("return", str(int(opts.permanent_redirect_code)), _q(opts.permanent_redirect))
            return
        if opts.app_root is not None:
            w.open("if", '($uri = "/")')
            w.line("return", "302", _q(opts.app_root))
            w.close()
        if opts.cors is not None:
            self.cors(w, route)
        target = _name(main.name)
        if route.canary is not None:
            target = self.canary(w, route, route.canary, main)
        if opts.rewrite_target is not None and loc.modifier in ("~", "~*"):
            pattern = ("(?i)" if loc.modifier == "~*" else "") + loc.pattern
            w.line("rewrite", _re(pattern), _script(opts.rewrite_target), "break")
        if opts.allow_cidrs is not None:
            for cidr in opts.allow_cidrs:
                w.line("allow", str(ipaddress.ip_network(cidr)))
            w.line("deny", "all")
        if opts.auth is not None:
            a = opts.auth
            digest = hashlib.sha256(a.htpasswd.encode()).hexdigest()[:12]
            path = f"{o.cert_dir}/auth_{a.secret_namespace}_{a.secret_name}_{digest}.htpasswd"
            self.files[path] = FileSpec(a.htpasswd.encode(), 0o640)
            w.line("auth_basic", _q(a.realm))
            w.line("auth_basic_user_file", _q(path))
        if opts.rate_limit is not None:
            self.rate_limit(w, route)
        grpc = opts.backend_protocol in (BackendProtocol.GRPC, BackendProtocol.GRPCS)
        prefix = "grpc" if grpc else "proxy"
        if opts.proxy_body_size is not None:
            w.line("client_max_body_size", _token(opts.proxy_body_size, _SIZE))
        for what, value in (
            ("connect", opts.proxy_connect_timeout),
            ("send", opts.proxy_send_timeout),
            ("read", opts.proxy_read_timeout),
        ):
            if value is not None:
                w.line(f"{prefix}_{what}_timeout", f"{int(value)}s")
        scheme = {
            BackendProtocol.HTTP: "http",
            BackendProtocol.HTTPS: "https",
            BackendProtocol.GRPC: "grpc",
            BackendProtocol.GRPCS: "grpcs",
        }[opts.backend_protocol]
        w.line(f"{prefix}_pass", _script(f"{scheme}://{target}"))

    # --- features

    def cors(self, w: _Writer, route: Route) -> None:
        c = route.options.cors
        assert c is not None
        if c.allow_origins == ("*",):
            origin = _q("*")
        else:
            var = "kproxy_cors_" + _ident(route.ingress.namespace, route.ingress.name)
            block = [f"    map $http_origin ${_name(var)} {{", '        default "";']
            for o in c.allow_origins:
                scheme, rest = o.split("://", 1)
                wildcard = rest.startswith("*.")
                body = re.escape(rest[2:] if wildcard else rest)
                rx = "~*^" + re.escape(scheme) + "://" + ("[a-z0-9-]+\\." if wildcard else "") + body + "$"
                block.append(f"        {_re(rx)} $http_origin;")
            block.append("    }")
            self.http_blocks["cors " + var] = block
            origin = f"${_name(var)}"
        headers: list[tuple[str, str]] = [("Access-Control-Allow-Origin", origin)]
        if c.allow_credentials:
            headers.append(("Access-Control-Allow-Credentials", _q("true")))
        preflight = headers + [
            ("Access-Control-Allow-Methods", _q(", ".join(c.allow_methods))),
            ("Access-Control-Allow-Headers", _q(", ".join(c.allow_headers))),
            ("Access-Control-Max-Age", _q(str(c.max_age))),
        ]
        # Preflight answered here (204), before auth and allow lists run: browsers send no
        # credentials on preflight, and the answer carries no content (ingress-nginx does this).
        w.open("if", '($request_method = "OPTIONS")')
        for name, value in preflight:
            w.line("add_header", _q(name), value, "always")
        w.line("return", "204")
        w.close()
        if c.expose_headers:
            headers.append(("Access-Control-Expose-Headers", _q(", ".join(c.expose_headers))))
        for name, value in headers:
            w.line("add_header", _q(name), value, "always")

    def canary(self, w: _Writer, route: Route, canary: Canary, main: _Upstream) -> str:
        """Pick the upstream per request: weight first, then the header overrides (ingress-nginx
        precedence header → weight). Returns the proxy_pass target."""
        alt = self.upstream(route, canary.backend)
        if alt is None:
            return _name(main.name)
        p = canary.policy
        pct = 100.0 * p.weight / p.weight_total if p.weight_total else 0.0
        if 0 < pct < 100:
            # Readable part: the canary Ingress; the hash also covers host, path and type.
            digest = hashlib.sha256(f"{route.host} {route.path_type.value} {route.path}".encode()).hexdigest()[:8]
            var = f"kproxy_canary_{_ident(canary.ingress.namespace, canary.ingress.name)}_{digest}"
            share = f"{max(pct, 0.01):.2f}".rstrip("0").rstrip(".")
            self.http_blocks["canary " + var] = [
                f'    split_clients "$request_id" ${_name(var)} {{',
                f"        {share}% {_q(alt.name)};",
                f"        * {_q(main.name)};",
                "    }",
            ]
            w.line("set", "$kproxy_upstream", f"${_name(var)}")
        else:
            w.line("set", "$kproxy_upstream", _q(alt.name if pct >= 100 else main.name))
        if p.header is not None:
            var = "$http_" + _name(p.header.lower().replace("-", "_"))
            if p.header_value is not None:
                w.open("if", f"({var} = {_q(p.header_value)})")
                w.line("set", "$kproxy_upstream", _q(alt.name))
                w.close()
            else:
                for value, up in (("never", main), ("always", alt)):
                    w.open("if", f'({var} = "{value}")')
                    w.line("set", "$kproxy_upstream", _q(up.name))
                    w.close()
        return "$kproxy_upstream"

    def rate_limit(self, w: _Writer, route: Route) -> None:
        rl = route.options.rate_limit
        assert rl is not None
        base = _ident(route.ingress.namespace, route.ingress.name)
        size = self.o.limit_zone_size
        if rl.connections:
            zone = _name(f"kproxy_conn_{base}")
            self.http_blocks["limit " + zone] = [f"    limit_conn_zone $binary_remote_addr zone={zone}:{size};"]
            w.line("limit_conn", zone, str(int(rl.connections)))
        for unit, rate in (("m", rl.rpm), ("s", rl.rps)):
            if rate:
                rate = int(rate)
                zone = _name(f"kproxy_rp{unit}_{base}")
                self.http_blocks["limit " + zone] = [
                    f"    limit_req_zone $binary_remote_addr zone={zone}:{size} rate={rate}r/{unit};"
                ]
                w.line("limit_req", f"zone={zone}", f"burst={rate * int(rl.burst_multiplier)}", "nodelay")

    def upstream(self, route: Route, backend: Backend) -> _Upstream | None:
        """The upstream for a backend, or None (with a reason) when it has nowhere to send."""
        sp = backend.service_port
        if sp is None or backend.unavailable:
            return None
        name = _ident(sp.name.namespace, sp.name.name, str(sp.port))
        up = self.upstreams.get(name)
        if up is None:
            if self.o.upstream_mode is UpstreamMode.SERVICE:
                if sp.cluster_ips:
                    up = _Upstream(name, (_addr(sp.cluster_ips[0], sp.port),))
                else:
                    up = _Upstream(
                        name,
                        (),
                        f"Service {backend.ref.namespace}/{backend.ref.service} has no "
                        "ClusterIP (headless); use the endpoints upstream mode",
                    )
            else:
                eps = list(self.endpoints.get(sp.name, ()))
                chosen = [e for e in eps if e.ready] or [e for e in eps if e.serving and e.terminating]
                addrs = tuple(sorted({_addr(e.ip, e.port) for e in chosen}))
                up = _Upstream(name, addrs, "" if addrs else f"{backend.ref} has no ready endpoints")
            self.upstreams[name] = up
        if up.unavailable:
            self.reasons.add(Reason(str(route.ingress), route.field, up.unavailable + "; answers 503"))
            return None
        return up


_FIRST_CODE = 520  # private status codes for the error_page dispatch (520..589)
_MAX_CANDIDATES = 70
# What every proxied request carries. X-Forwarded-For is the peer address only: kproxy is the
# edge, a client-sent list is not to be trusted (ingress-nginx's default without
# use-forwarded-headers). The first seven also go to gRPC backends.
_BASE_HEADERS = (
    ("Host", "$host"),
    ("X-Real-IP", "$remote_addr"),
    ("X-Forwarded-For", "$remote_addr"),
    ("X-Forwarded-Proto", "$scheme"),
    ("X-Forwarded-Host", "$host"),
    ("X-Forwarded-Port", "$server_port"),
    ("X-Request-ID", "$request_id"),
    ("Upgrade", "$http_upgrade"),
    ("Connection", "$kproxy_connection"),
    ("Proxy", '""'),  # httpoxy
)


def _pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size
