"""Rendered configurations served by a real nginx on 127.0.0.1, against echo backends.

One nginx (endpoints upstream mode, every backend an echo server on loopback) carries every
scenario on its own host name; a second one checks the default ClusterIP mode with the Service's
ClusterIP set to 127.0.0.1.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_ingress_routes import SEED_PATH_ROWS, P, backend, ingress, path, rule, seed_row_ingresses, svc

from kproxy.ingress.convert import build_routes
from kproxy.ingress.model import RoutingTable
from kproxy.ingress.nginx import NginxOptions, UpstreamMode, render
from kproxy.model import Endpoint, Service

CLASS = {"metadata": {"name": "kproxy"}, "spec": {"controller": "kproxy.io/ingress-controller"}}
BACKENDS = ("p0", "p1", "p2", "rx", "s1", "s2")


def row_host(case_id: str, kind: str) -> str:
    return f"{case_id.split('-', 1)[0]}.{kind}.test"


@dataclass
class Env:
    nginx: Any
    table: RoutingTable
    tls: ssl.SSLContext
    client: Callable[..., Any]

    def get(self, host: str, path: str = "/", **kw: Any) -> Any:
        return self.client(self.nginx.http_port, host, path, **kw)

    def get_tls(self, host: str, path: str = "/", **kw: Any) -> Any:
        return self.client(self.nginx.https_port, host, path, tls=self.tls, **kw)


def scenario_ingresses() -> list[dict[str, Any]]:
    ings: list[dict[str, Any]] = []
    for case_id, paths, _requests, _want in SEED_PATH_ROWS:
        for kind, regex in (("paths", False), ("rx", True)):
            for ing in seed_row_ingresses(row_host(case_id, kind), paths, regex):
                ing["metadata"]["name"] = f"{ing['metadata']['name']}-{row_host(case_id, kind).replace('.', '-')}"
                ings.append(ing)
    old = "2020-01-01T00:00:00Z"
    ings += [
        ingress("wild", rule("*.wild.test", path("/", "p0")), rule("exact.wild.test", path("/", "p1"))),
        ingress(
            "tls-a",
            rule("a.tls.test", path("/", "s1")),
            tls=[{"hosts": ["a.tls.test"], "secretName": "tls-a"}],
        ),
        ingress(
            "tls-b",
            rule("b.tls.test", path("/", "s2")),
            tls=[{"hosts": ["b.tls.test"], "secretName": "tls-b"}],
            ann={P + "ssl-redirect": "false"},
        ),
        ingress(
            "rewrite",
            rule("rw.test", path("/api(/|$)(.*)", "s1", type="ImplementationSpecific")),
            ann={P + "rewrite-target": "/$2"},
        ),
        ingress(
            "cors",
            rule("cors.test", path("/", "s1")),
            ann={P + "enable-cors": "true", P + "cors-allow-origin": "https://app.example.com"},
        ),
        ingress(
            "ratelimit",
            rule("rl.test", path("/", "s1")),
            ann={P + "limit-rps": "1", P + "limit-burst-multiplier": "1"},
        ),
        ingress(
            "auth",
            rule("auth.test", path("/", "s1")),
            ann={P + "auth-type": "basic", P + "auth-secret": "users", P + "auth-realm": "kproxy test"},
        ),
        ingress("main", rule("canary.test", path("/", "s1")), rule("weight.test", path("/", "s1")), created=old),
        ingress(
            "canary",
            rule("canary.test", path("/", "s2")),
            ann={P + "canary": "true", P + "canary-by-header": "X-Canary"},
        ),
        ingress(
            "canary-weight",
            rule("weight.test", path("/", "s2")),
            ann={P + "canary": "true", P + "canary-weight": "100", P + "canary-by-header": "X-Canary"},
        ),
        ingress("allow", rule("allow.test", path("/", "s1")), ann={P + "whitelist-source-range": "127.0.0.1/32"}),
        ingress("deny", rule("deny.test", path("/", "s1")), ann={P + "whitelist-source-range": "10.0.0.0/8"}),
        ingress("closed", rule("closed.test", path("/", "s1")), ann={P + "whitelist-source-range": "10.0.0.0/33"}),
        ingress("missing", rule("missing.test", path("/", "ghost"))),
        ingress("approot", rule("approot.test", path("/", "s1")), ann={P + "app-root": "/app"}),
        ingress("body", rule("body.test", path("/", "s1")), ann={P + "proxy-body-size": "1k"}),
        ingress(
            "moved",
            rule("moved.test", path("/", "s1")),
            ann={P + "permanent-redirect": "https://example.com/new"},
        ),
        ingress("force", rule("force.test", path("/", "s1")), ann={P + "force-ssl-redirect": "true"}),
        ingress("https-backend", rule("tlsb.test", path("/", "tlsb")), ann={P + "backend-protocol": "HTTPS"}),
        ingress("defaults", rule("db.test", path("/x", "p1")), default_backend=backend("p2")),
    ]
    return ings


@pytest.fixture(scope="module")
def env(
    echo_backends: Callable[..., Any],
    nginx_factory: Callable[..., Any],
    cert_factory: Callable[[str], Any],
    htpasswd_secret: Callable[..., dict[str, Any]],
    client: Callable[..., Any],
) -> Env:
    cert_a, cert_b, cert_backend = (
        cert_factory("a.tls.test"),
        cert_factory("b.tls.test"),
        cert_factory("tlsb.test"),
    )
    backend_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    backend_tls.load_cert_chain(cert_backend.crt, cert_backend.key)
    running = {name: echo_backends(name) for name in BACKENDS}
    running["tlsb"] = echo_backends("tlsb", tls=backend_tls)
    services: list[Service] = [svc(name, ip=f"172.30.0.{10 + i}") for i, name in enumerate(sorted(running))]
    endpoints = {s.ports[0].name: [Endpoint("127.0.0.1", running[s.name].port)] for s in services}
    secrets = [cert_a.secret("tls-a"), cert_b.secret("tls-b"), htpasswd_secret("users", "alice", "s3cret")]
    table = build_routes(scenario_ingresses(), services, secrets, [CLASS])

    def rendered(http_port: int, https_port: int, prefix: Path, user: tuple[str, str] | None) -> Any:
        options = NginxOptions(
            http_port=http_port,
            https_port=https_port,
            listen_addresses=("127.0.0.1",),
            run_dir=str(prefix),
            cert_dir=f"{prefix}/certs",
            upstream_mode=UpstreamMode.ENDPOINTS,
            worker_processes=1,
            worker_connections=256,
            user=user,
        )
        return render(table, options, endpoints)

    nginx = nginx_factory(rendered)
    client_tls = ssl.create_default_context(cadata=cert_a.crt.read_text() + cert_b.crt.read_text())
    return Env(nginx, table, client_tls, client)


# --- routing ---------------------------------------------------------------------------------


def seed_http_cases() -> list[Any]:
    cases = []
    for case_id, _paths, requests, want in SEED_PATH_ROWS:
        for kind in ("paths", "rx"):
            for req in requests:
                cases.append(pytest.param(row_host(case_id, kind), req, want, id=f"{case_id}-{kind}[{req}]"))
    return cases


@pytest.mark.parametrize(("host", "request_path", "want"), seed_http_cases())
def test_seed_path_table_over_http(env: Env, host: str, request_path: str, want: int | None) -> None:
    r = env.get(host, request_path)
    assert r.backend == ("404" if want is None else f"p{want}")
    if want is not None:
        assert r.json["path"] == request_path  # no rewrite: the backend sees the request path
    # The pure model agrees with nginx on every row.
    assert env.table.match(host, request_path).target == ("404" if want is None else f"p{want}:80")


@pytest.mark.parametrize(
    ("host", "want"),
    [
        pytest.param("bar.wild.test", "p0", id="wildcard-row1-one-label-matches"),
        pytest.param("baz.bar.wild.test", "404", id="wildcard-row2-two-labels-do-not-match"),
        pytest.param("wild.test", "404", id="wildcard-row3-bare-suffix-does-not-match"),
        pytest.param("exact.wild.test", "p1", id="exact-beats-wildcard"),
        pytest.param("unknown.test", "404", id="unknown-host-controller-default-backend"),
    ],
)
def test_host_routing(env: Env, host: str, want: str) -> None:
    assert env.get(host).backend == want


def test_ingress_default_backend_and_forwarded_headers(env: Env) -> None:
    assert env.get("db.test", "/x").backend == "p1"
    r = env.get("db.test", "/elsewhere", headers={"X-Forwarded-For": "6.6.6.6"})
    assert r.backend == "p2"
    h = r.json["headers"]
    assert h["host"] == "db.test"
    assert h["x-forwarded-for"] == "127.0.0.1"  # the client's own list is not trusted
    assert h["x-real-ip"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert len(h["x-request-id"]) == 32
    assert "connection" not in h or h["connection"].lower() != "close"


def test_missing_service_answers_503(env: Env) -> None:
    assert env.get("missing.test").status == 503


# --- TLS -------------------------------------------------------------------------------------


def test_sni_picks_the_right_certificate(env: Env) -> None:
    a = env.get_tls("a.tls.test", "/hello")
    b = env.get_tls("b.tls.test", "/hello")
    assert (a.status, a.peer_cert_subject, a.backend) == (200, "a.tls.test", "s1")
    assert (b.status, b.peer_cert_subject, b.backend) == (200, "b.tls.test", "s2")
    assert a.json["headers"]["x-forwarded-proto"] == "https"


def test_unknown_sni_handshake_is_rejected(env: Env) -> None:
    with pytest.raises(ssl.SSLError):
        env.get_tls("unknown.test")


def test_http_redirects_to_https_with_308(env: Env) -> None:
    r = env.get("a.tls.test", "/foo?x=1")
    assert r.status == 308
    assert r.headers["location"] == f"https://a.tls.test:{env.nginx.https_port}/foo?x=1"
    assert env.get("b.tls.test").backend == "s2"  # ssl-redirect: "false"
    forced = env.get("force.test", "/p")
    assert forced.status == 308 and forced.headers["location"].startswith("https://force.test:")


def test_https_backend_protocol(env: Env) -> None:
    assert env.get("tlsb.test", "/secure").backend == "tlsb"


# --- annotations -----------------------------------------------------------------------------


def test_rewrite_target_with_captures(env: Env) -> None:
    r = env.get("rw.test", "/api/v1/items?q=1")
    assert (r.backend, r.json["path"]) == ("s1", "/v1/items?q=1")
    assert env.get("rw.test", "/api").json["path"] == "/"
    assert env.get("rw.test", "/API/x").json["path"] == "/x"  # ingress-nginx regexes ignore case


def test_cors_preflight_and_simple_request(env: Env) -> None:
    origin = "https://app.example.com"
    pre = env.get(
        "cors.test",
        "/data",
        method="OPTIONS",
        headers={"Origin": origin, "Access-Control-Request-Method": "PUT"},
    )
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == origin
    assert pre.headers["access-control-allow-methods"] == "GET, PUT, POST, DELETE, PATCH, OPTIONS"
    assert pre.headers["access-control-max-age"] == "1728000"
    assert pre.headers["access-control-allow-credentials"] == "true"
    simple = env.get("cors.test", "/data", headers={"Origin": origin})
    assert simple.backend == "s1" and simple.headers["access-control-allow-origin"] == origin
    other = env.get("cors.test", "/data", headers={"Origin": "https://evil.example.com"})
    assert other.backend == "s1" and "access-control-allow-origin" not in other.headers


def test_rate_limit_answers_503_over_the_limit(env: Env) -> None:
    statuses = [env.get("rl.test", f"/{i}").status for i in range(12)]  # bounded burst
    assert statuses[0] == 200
    assert 503 in statuses
    assert set(statuses) <= {200, 503}


def test_basic_auth(env: Env) -> None:
    def auth(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    anonymous = env.get("auth.test")
    assert anonymous.status == 401
    assert anonymous.headers["www-authenticate"] == 'Basic realm="kproxy test"'
    assert env.get("auth.test", headers=auth("alice", "wrong")).status == 401
    assert env.get("auth.test", headers=auth("alice", "s3cret")).backend == "s1"


def test_canary_by_header(env: Env) -> None:
    assert env.get("canary.test").backend == "s1"
    assert env.get("canary.test", headers={"X-Canary": "always"}).backend == "s2"
    assert env.get("canary.test", headers={"X-Canary": "never"}).backend == "s1"
    assert env.get("canary.test", headers={"X-Canary": "maybe"}).backend == "s1"  # weight 0


def test_canary_weight_and_header_override(env: Env) -> None:
    assert {env.get("weight.test", f"/{i}").backend for i in range(5)} == {"s2"}  # weight 100
    assert env.get("weight.test", headers={"X-Canary": "never"}).backend == "s1"


def test_allow_list(env: Env) -> None:
    assert env.get("allow.test").backend == "s1"
    assert env.get("deny.test").status == 403


def test_invalid_allow_list_fails_closed(env: Env) -> None:
    assert env.get("closed.test").status == 503


def test_app_root_permanent_redirect_and_body_size(env: Env) -> None:
    r = env.get("approot.test", "/")
    assert r.status == 302 and r.headers["location"].endswith("/app")
    assert env.get("approot.test", "/app").backend == "s1"
    moved = env.get("moved.test", "/anything")
    assert (moved.status, moved.headers["location"]) == (301, "https://example.com/new")
    assert env.get("body.test", method="POST", body=b"x" * 512).backend == "s1"
    assert env.get("body.test", method="POST", body=b"x" * 4096).status == 413


# --- ClusterIP upstream mode -------------------------------------------------------------------


def test_service_mode_proxies_to_the_cluster_ip(
    echo_backends: Callable[..., Any],
    nginx_factory: Callable[..., Any],
    client: Callable[..., Any],
) -> None:
    b = echo_backends("clusterip")
    service = svc("web", ports=(("http", b.port, svc("x").ports[0].protocol),), ip="127.0.0.1")
    table = build_routes([ingress("web", rule("web.test", path("/", "web", port="http")))], [service], [], [CLASS])

    def rendered(http_port: int, https_port: int, prefix: Path, user: tuple[str, str] | None) -> Any:
        return render(
            table,
            NginxOptions(
                http_port=http_port,
                https_port=https_port,
                listen_addresses=("127.0.0.1",),
                run_dir=str(prefix),
                cert_dir=f"{prefix}/certs",
                worker_processes=1,
                worker_connections=64,
                user=user,
            ),
        )

    nginx = nginx_factory(rendered)
    assert f"server 127.0.0.1:{b.port};" in (nginx.prefix / "nginx.conf").read_text()
    assert client(nginx.http_port, "web.test", "/x").backend == "clusterip"
