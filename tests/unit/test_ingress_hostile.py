"""Hostile Ingress objects cannot inject nginx configuration (IngressNightmare classes:
CVE-2025-1974 via annotations, CVE-2026-24512 via paths).

For every hostile object: the configuration rendered with it differs from the one rendered
without it only inside that object's own server/upstreams/zones (or not at all), it parses into
directives kproxy emits and nothing else, the marker text never appears outside a quoted
argument, the object gets a reason, and `nginx -t` accepts the result.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from test_ingress_routes import CLASS, P, backend, ingress, path, rule, svc

from kproxy.ingress.annotations import KNOWN_ANNOTATIONS
from kproxy.ingress.convert import build_routes
from kproxy.ingress.model import Backend, BackendRef, IngressRef, PathType, Route, RoutingTable, Server
from kproxy.ingress.nginx import NginxConfig, NginxOptions, UnsafeValue, render

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MARK = "INJECTED"
EVIL_HOST = "evil.example.com"
SHARED_HOST = "shop.example.com"
SERVICES = [svc("web"), svc("api", ip="172.30.0.11"), svc("web", ns="evil", ip="172.30.0.12")]

HOSTILE_VALUES = [
    f"x; }} server {{ listen 8081; location / {{ return 200 {MARK}; }} #",
    f'"{MARK}"',
    f"'; return 200 \"{MARK}\"; '",
    f"true\n{MARK}_directive on;",
    f"true;{MARK} on;",
    f"$host${MARK}",
    f"${{{MARK}}}",
    "\\",
    "x\\",
    f'\\"; {MARK};',
    f"# {MARK}",
    f"{{ {MARK} }}",
    "A" * 100_000 + f"; {MARK};",
    f"ünïcödé {MARK}",
    f"\u202e{MARK}",
    f"\x00{MARK}",
    f"10.0.0.0/8; allow all; {MARK}",
    f"/$1; return 200 {MARK}",
    f"https://a.example.com\n{MARK}",
    f"basic\n{MARK}",
    f"5\r\n{MARK}",
]

HOSTILE_PATHS = [
    "/foo;}",
    '/x" { return 200; } location "/y',
    "/\n",
    f"/foo\n{MARK} on;",
    f"/${{{MARK}}}",
    f"/$host{MARK}",
    "/a{2}",
    f"/#{MARK}",
    "/x\\",
    '/x\\"',
    "/x'y",
    "/x y",
    "/x\ty",
    "/" + "a" * 100_000,
    f"/ünïcode{MARK}",
    "/(a+)+$",
    "/(a*)*b",
    "/((ab)*)+",
    "/(?:a+)+",
    "/(a+)*b",
    "/(?<n>x)",
    f"/x$y{MARK}",
    f"relative{MARK}",
]

HOSTILE_HOSTS = [
    f"{EVIL_HOST};",
    f"{EVIL_HOST} {{ return 200; }}",
    "*",
    f'"{MARK}.com"',
    f"evil\n{MARK}.com",
    "a..b.com",
    "a" * 1000 + ".com",
    "évil.com",
    "$host",
    "~^.*$",
    f"{MARK}.com",  # uppercase: not a DNS name
    "*.*.example.com",
    "127.0.0.1",
]


# --- a small nginx tokenizer/parser (nginx's own quoting rules) ---------------------------------


@dataclass(frozen=True)
class Tok:
    kind: str  # "word", "quoted", "{", "}", ";"
    value: str


@dataclass(frozen=True)
class Directive:
    name: Tok
    args: tuple[Tok, ...]
    block: tuple[Directive, ...] | None

    def key(self) -> Any:
        return (
            self.name.value,
            tuple(a.value for a in self.args),
            None if self.block is None else tuple(d.key() for d in self.block),
        )


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            toks.append(Tok(c, c))
            i += 1
        elif c in "\"'":
            quote, i, buf = c, i + 1, []
            while True:
                if i >= n:
                    raise SyntaxError("unterminated quoted string")
                ch = text[i]
                if ch == "\\" and i + 1 < n and text[i + 1] in "\"'\\":
                    buf.append(text[i + 1])
                    i += 2
                elif ch == quote:
                    i += 1
                    break
                else:
                    buf.append(ch)
                    i += 1
            toks.append(Tok("quoted", "".join(buf)))
            if i < n and text[i] == ")":  # nginx accepts and drops ")" right after a quote (if)
                i += 1
            elif i < n and not (text[i].isspace() or text[i] in ";{"):
                raise SyntaxError(f"no separator after a quoted string at {i}")
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};\"'":
                j += 2 if text[j] == "\\" else 1
            toks.append(Tok("word", text[i:j]))
            i = j
    return toks


def parse(text: str) -> tuple[Directive, ...]:
    stack: list[list[Directive]] = [[]]
    heads: list[tuple[Tok, tuple[Tok, ...]]] = []
    args: list[Tok] = []
    for t in tokenize(text):
        if t.kind in ("word", "quoted"):
            args.append(t)
        elif t.kind == ";":
            assert args, "empty directive"
            stack[-1].append(Directive(args[0], tuple(args[1:]), None))
            args = []
        elif t.kind == "{":
            assert args, "block without a name"
            heads.append((args[0], tuple(args[1:])))
            stack.append([])
            args = []
        else:
            assert not args, "unterminated directive before }"
            body = stack.pop()
            name, head_args = heads.pop()
            stack[-1].append(Directive(name, head_args, tuple(body)))
    assert len(stack) == 1 and not args and not heads, "unbalanced braces"
    return tuple(stack[0])


# Every directive kproxy emits, by the block it may appear in.
ALLOWED = {
    "main": {"user", "worker_processes", "worker_shutdown_timeout", "pid", "error_log", "events", "http"},
    "events": {"worker_connections"},
    "http": {
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
        "access_log",
        "default_type",
        "server_tokens",
        "server_names_hash_bucket_size",
        "server_names_hash_max_size",
        "variables_hash_bucket_size",
        "variables_hash_max_size",
        "map_hash_bucket_size",
        "client_max_body_size",
        "proxy_connect_timeout",
        "proxy_send_timeout",
        "proxy_read_timeout",
        "proxy_http_version",
        "map",
        "proxy_set_header",
        "grpc_set_header",
        "limit_req_status",
        "limit_conn_status",
        "ssl_protocols",
        "ssl_session_cache",
        "limit_conn_zone",
        "limit_req_zone",
        "split_clients",
        "upstream",
        "server",
        "geo",
    },
    "upstream": {"server", "keepalive"},
    "server": {
        "server_name",
        "listen",
        "ssl_certificate",
        "ssl_certificate_key",
        "ssl_reject_handshake",
        "location",
    },
    "location": {
        "return",
        "if",
        "set",
        "rewrite",
        "allow",
        "deny",
        "auth_basic",
        "auth_basic_user_file",
        "limit_conn",
        "limit_req",
        "add_header",
        "client_max_body_size",
        "proxy_pass",
        "grpc_pass",
        "proxy_connect_timeout",
        "proxy_send_timeout",
        "proxy_read_timeout",
        "grpc_connect_timeout",
        "grpc_send_timeout",
        "grpc_read_timeout",
        "error_page",
        "proxy_set_header",
        "proxy_hide_header",
    },
    "if": {"return", "set", "add_header"},
}


def check_structure(directives: tuple[Directive, ...], context: str = "main") -> None:
    """Only directives kproxy emits, each where it belongs; the marker never unquoted."""
    for d in directives:
        assert d.name.kind == "word" or context in ("map", "split_clients", "geo"), d
        if context not in ("map", "split_clients", "geo"):
            assert d.name.value in ALLOWED[context], f"unexpected directive {d.name.value!r} in {context}"
        assert d.name.kind == "quoted" or MARK not in d.name.value  # a quoted map key is data
        for a in d.args:
            assert a.kind == "quoted" or MARK not in a.value, f"marker in an unquoted argument: {a}"
        if d.name.value == "location":
            assert len(d.args) in (1, 2) and (len(d.args) == 1 or d.args[0].value in ("=", "~", "~*")), d.args
            assert len(d.args) == 2 or d.args[0].kind == "quoted" or d.args[0].value.startswith("@kproxy_"), d.args
        if d.block is not None:
            special = ("map", "split_clients", "geo")
            check_structure(d.block, d.name.value if context not in special else context)


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefix() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kproxy-hostile-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def base_ingresses() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    users = {
        "metadata": {"name": "users", "namespace": "default"},
        "data": {"auth": base64.b64encode(b"alice:$apr1$abc$def\n").decode()},
    }
    ings = [
        ingress(
            "shop",
            rule(SHARED_HOST, path("/", "web"), path("/api", "api"), path("/x", "web", type="Exact")),
            ann={P + "enable-cors": "true", P + "limit-rps": "10"},
            created="2020-01-01T00:00:00Z",
        ),
        ingress(
            "admin",
            rule("admin.example.com", path("/", "web")),
            ann={P + "auth-type": "basic", P + "auth-secret": "users"},
            created="2020-01-01T00:00:00Z",
        ),
        ingress("catch", default_backend=backend("web"), created="2020-01-01T00:00:00Z"),
    ]
    return ings, [users]


def routes(extra: list[dict[str, Any]]) -> RoutingTable:
    ings, secrets = base_ingresses()
    return build_routes([*ings, *extra], SERVICES, secrets, [CLASS])


def options(prefix: Path | None = None) -> NginxOptions:
    where = str(prefix) if prefix is not None else "/var/lib/kproxy/ingress"
    return NginxOptions(
        run_dir=where,
        cert_dir=f"{where}/certs",
        listen_addresses=("127.0.0.1",),
        http_port=18080,
        https_port=18443,
    )


def nginx_t(cfg: NginxConfig, prefix: Path) -> None:
    for p, spec in cfg.files:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(spec.content)
    conf = prefix / "nginx.conf"
    conf.write_text(cfg.text)
    r = subprocess.run(
        [NGINX, "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def without_evil(tree: tuple[Directive, ...]) -> Any:
    """The tree minus what belongs to the hostile object (its host, its namespace's upstreams,
    zones and variables) and minus the hash sizes a long host may legitimately raise."""

    def evil(d: Directive) -> bool:
        text = " ".join([d.name.value, *(a.value for a in d.args)])
        if d.name.value == "server" and d.block is not None:
            names = [a.value for x in d.block if x.name.value == "server_name" for a in x.args]
            return any(EVIL_HOST in n or "evil" in n for n in names)
        if d.name.value in ("upstream", "limit_req_zone", "limit_conn_zone", "map", "split_clients"):
            return "evil_" in text
        return d.name.value.startswith("server_names_hash_")

    def strip(ds: tuple[Directive, ...]) -> Any:
        return tuple(
            (d.name.value, tuple(a.value for a in d.args), None if d.block is None else strip(d.block))
            for d in ds
            if not evil(d)
        )

    return strip(tree)


def assert_confined(hostile: dict[str, Any], prefix: Path | None = None, *, ours: bool = True) -> NginxConfig:
    base_cfg = render(routes([]), options(prefix))
    table = routes([hostile])
    cfg = render(table, options(prefix))
    tree = parse(cfg.text)
    check_structure(tree)
    assert without_evil(tree) == without_evil(parse(base_cfg.text))
    if ours:
        assert any(r.ref == "Ingress evil/hostile" for r in table.reasons), "hostile input accepted silently"
    else:
        assert IngressRef("evil", "hostile") not in table.ours
        assert not any(r.ref == "Ingress evil/hostile" for r in table.reasons)
    if prefix is not None:
        nginx_t(cfg, prefix)
    return cfg


def evil_ingress(**kw: Any) -> dict[str, Any]:
    kw.setdefault("created", "2019-01-01T00:00:00Z")  # older than everything: wins any conflict
    rules = kw.pop("rules", (rule(EVIL_HOST, path("/", "web")),))
    return ingress("hostile", *rules, ns="evil", **kw)


# --- the corpus ------------------------------------------------------------------------------

ANNOTATIONS = sorted(KNOWN_ANNOTATIONS) + ["configuration-snippet", "server-snippet", "auth-url", f"x;{MARK}"]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=[f"value{i:02d}" for i in range(len(HOSTILE_VALUES))])
@pytest.mark.parametrize("name", ANNOTATIONS)
def test_hostile_annotation_value_is_confined(name: str, value: str) -> None:
    assert_confined(evil_ingress(ann={P + name: value}))


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=[f"value{i:02d}" for i in range(len(HOSTILE_VALUES))])
def test_all_annotations_hostile_at_once_pass_nginx_t(value: str, prefix: Path) -> None:
    cfg = assert_confined(evil_ingress(ann={P + n: value for n in ANNOTATIONS}), prefix)
    assert MARK not in cfg.text


@pytest.mark.parametrize("regex", [False, True], ids=["plain", "use-regex"])
@pytest.mark.parametrize("path_type", [t.value for t in PathType])
@pytest.mark.parametrize("bad", HOSTILE_PATHS, ids=[f"path{i:02d}" for i in range(len(HOSTILE_PATHS))])
def test_hostile_path_is_rejected_and_confined(bad: str, path_type: str, regex: bool) -> None:
    ann = {P + "use-regex": "true", P + "rewrite-target": "/$1"} if regex else {}
    # Both on its own host and on a host shared with a victim Ingress.
    for host in (EVIL_HOST, SHARED_HOST):
        hostile = evil_ingress(rules=(rule(host, path(bad, "web", type=path_type)),), ann=ann)
        table = routes([hostile])
        assert any(r.ref == "Ingress evil/hostile" and "path" in r.field for r in table.reasons), bad
        cfg = assert_confined(hostile)
        assert MARK not in cfg.text


def test_hostile_paths_on_a_shared_host_pass_nginx_t(prefix: Path) -> None:
    rules = [rule(SHARED_HOST, *(path(p, "web", type=t.value) for p in HOSTILE_PATHS for t in PathType))]
    assert_confined(evil_ingress(rules=rules), prefix)
    assert_confined(evil_ingress(rules=rules, ann={P + "use-regex": "true"}), prefix)


@pytest.mark.parametrize("host", HOSTILE_HOSTS, ids=[f"host{i:02d}" for i in range(len(HOSTILE_HOSTS))])
def test_hostile_host_is_rejected(host: str, prefix: Path) -> None:
    hostile = evil_ingress(rules=(rule(host, path("/", "web")),), tls=[{"hosts": [host], "secretName": "x"}])
    cfg = assert_confined(hostile, prefix)
    assert MARK not in cfg.text
    assert len(parse(cfg.text)[-1].block or ()) == len(parse(render(routes([]), options(prefix)).text)[-1].block or ())


@pytest.mark.parametrize(
    "field",
    ["service-name", "port-name", "secret-name", "tls-secret", "class-annotation", "annotation-key"],
)
def test_hostile_names_elsewhere_are_rejected(field: str, prefix: Path) -> None:
    evil = f'x"; {MARK}; #'
    if field == "service-name":
        hostile = evil_ingress(
            rules=(
                rule(
                    EVIL_HOST,
                    {
                        "path": "/",
                        "pathType": "Prefix",
                        "backend": {"service": {"name": evil, "port": {"number": 80}}},
                    },
                ),
            )
        )
    elif field == "port-name":
        hostile = evil_ingress(rules=(rule(EVIL_HOST, path("/", "web", port=evil)),))
    elif field == "secret-name":
        hostile = evil_ingress(ann={P + "auth-type": "basic", P + "auth-secret": evil})
    elif field == "tls-secret":
        hostile = evil_ingress(tls=[{"hosts": [EVIL_HOST], "secretName": evil}])
    elif field == "class-annotation":
        hostile = evil_ingress(ann={P + "rewrite-target": "/", "kubernetes.io/ingress.class": evil}, cls=None)
    else:
        hostile = evil_ingress(ann={P + evil: "true", evil: "x"})
    cfg = assert_confined(hostile, prefix, ours=field != "class-annotation")
    assert MARK not in cfg.text


def test_hostile_secrets_never_reach_the_config_text(prefix: Path) -> None:
    pem_junk = (
        f"{MARK}\n-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n"
        f"ssl_certificate /etc/shadow; {MARK}\n"
    )
    tls = {
        "type": "kubernetes.io/tls",
        "metadata": {"name": "junk", "namespace": "evil"},
        "data": {
            "tls.crt": base64.b64encode(pem_junk.encode()).decode(),
            "tls.key": base64.b64encode(
                f"-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n{MARK}".encode()
            ).decode(),
        },
    }
    users = {
        "metadata": {"name": "users", "namespace": "evil"},
        "data": {"auth": base64.b64encode(f'alice:x\n"; {MARK};\n'.encode()).decode()},
    }
    hostile = evil_ingress(
        tls=[{"hosts": [EVIL_HOST], "secretName": "junk"}],
        ann={P + "auth-type": "basic", P + "auth-secret": "users"},
    )
    ings, secrets = base_ingresses()
    table = build_routes([*ings, hostile], SERVICES, [*secrets, tls, users], [CLASS])
    cfg = render(table, options(prefix))
    assert MARK not in cfg.text
    check_structure(parse(cfg.text))
    # The re-encoded PEM files hold PEM blocks only; the htpasswd with a bad line failed closed.
    files = cfg.file_map
    assert all(MARK.encode() not in spec.content for spec in files.values())
    assert not any(p.endswith(".htpasswd") and "evil" in p for p in files)
    assert table.match(EVIL_HOST, "/").target == "503"


# --- the renderer's own fence, without validation in front of it -------------------------------


def raw_table(
    path_text: str, path_type: PathType = PathType.EXACT, regex: bool = False, host: str = "raw.example.com"
) -> RoutingTable:
    """A table built directly, bypassing convert's grammar: only the renderer's quoting stands."""
    sp = svc("web").ports[0]
    route = Route(
        host=host,
        path=path_text,
        path_type=path_type,
        regex=regex,
        backend=Backend(BackendRef("default", "web", "80"), sp),
        ingress=IngressRef("default", "raw"),
        field="spec.rules[0].http.paths[0]",
    )
    return RoutingTable(servers=(Server(host=""), Server(host=host, routes=(route,))))


@pytest.mark.parametrize(
    "text",
    [f'/x" {{ return 200 {MARK}; }} location "/y', "/foo;}", f"/{{ {MARK} }}", "/x\\", '/x\\"; #', "/a'b"],
)
def test_renderer_quotes_what_validation_would_have_refused(text: str, prefix: Path) -> None:
    cfg = render(raw_table(text), options(prefix))
    tree = parse(cfg.text)
    check_structure(tree)
    server = [d for d in tree[-1].block or () if d.name.value == "server"][-1]
    locations = [d for d in server.block or () if d.name.value == "location"]
    assert [loc.args[-1].value for loc in locations][0] == text  # one token, exactly the text
    nginx_t(cfg, prefix)


@pytest.mark.parametrize("text", [f"/$host{MARK}", "/x\ny", "/\x00", "/é"])
def test_renderer_refuses_values_it_cannot_quote(text: str) -> None:
    with pytest.raises(UnsafeValue):
        render(raw_table(text))


def test_renderer_refuses_a_hostile_host_and_rewrite_it_did_not_validate() -> None:
    with pytest.raises(UnsafeValue):
        render(raw_table("/x", host="a.com\nserver_name b.com"))
    t = raw_table("/x", path_type=PathType.IMPLEMENTATION_SPECIFIC, regex=True)
    server = t.servers[1]
    route = replace(server.routes[0], options=replace(server.routes[0].options, rewrite_target=f"/$host{MARK}"))
    bad = RoutingTable(servers=(t.servers[0], replace(server, routes=(route,))))
    with pytest.raises(UnsafeValue):
        render(bad)
