"""HTTPRoutes rendered by kproxy and served by a real nginx on 127.0.0.1, against echo backends.

The route tables of tests/unit/test_gateway_routes.py (modelled on the Gateway API conformance
tests) are replayed here over HTTP: each row must reach the backend the pure matcher named. The
filters, weights (measured over many requests), redirects, rewrites and the 500 of invalid
backends are checked as a client sees them. Gateway port 80 is served on nginx's HTTP port and
443 on its HTTPS port (`NginxOptions.gateway_ports`).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_gateway_routes import (
    GC,
    HOSTNAME_INTERSECTION_GATEWAY,
    NS,
    across_routes,
    be,
    exact,
    gateway,
    listener,
    listener_hostname_gateway,
    precedence_route,
    prefix,
    route,
    rule,
)
from test_ingress_routes import svc

from kproxy.ingress.gateway import GatewayOptions, build_gateway, combine
from kproxy.ingress.model import RoutingTable
from kproxy.ingress.nginx import NginxOptions, UpstreamMode, render
from kproxy.model import Endpoint

BACKENDS = ("v1", "v2", "v3")


@dataclass
class Env:
    nginx: Any
    tables: dict[str, RoutingTable]
    client: Callable[..., Any]

    def get(self, host: str, path: str = "/", **kw: Any) -> Any:
        return self.client(self.nginx.http_port, host, path, **kw)


def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every scenario on its own port-80 hostnames of one Gateway per scenario group."""
    gws = [
        gateway("main", listener("http", allowedRoutes={"namespaces": {"from": "All"}}, hostname="*.main.test")),
        listener_hostname_gateway(),
        copy.deepcopy(HOSTNAME_INTERSECTION_GATEWAY),  # the unit table's constant: renamed here
    ]
    gws[1]["metadata"]["name"] = "lhm"
    gws[2]["metadata"]["name"] = "hi"

    def on(gw: str, r: dict[str, Any], hostnames: list[str] | None = None) -> dict[str, Any]:
        for p in r["spec"]["parentRefs"]:
            p["name"] = gw
        if hostnames is not None:
            r["spec"]["hostnames"] = hostnames
        return r

    routes: list[dict[str, Any]] = []
    # listener hostname matching (sectionName per route), as in the unit table
    routes += [
        on("lhm", route("l1", rule(be("v1")), parents=[{"name": "x", "sectionName": "listener-1"}])),
        on("lhm", route("l2", rule(be("v2")), parents=[{"name": "x", "sectionName": "listener-2"}])),
        on(
            "lhm",
            route(
                "l3",
                rule(be("v3")),
                parents=[{"name": "x", "sectionName": "listener-3"}, {"name": "x", "sectionName": "listener-4"}],
            ),
        ),
    ]
    for r in across_routes():
        hosts = [
            h.replace("example.com", "across.main.test").replace("example.net", "net.main.test")
            for h in r["spec"]["hostnames"]
        ]
        routes.append(on("main", r, hosts))
    routes.append(on("main", precedence_route(), ["prec.main.test"]))
    hi = {
        "specific": (["non.matching.com", "*.nonmatchingwildcard.io", "very.specific.com"], "/s1"),
        "wildcard": (["non.matching.com", "bar.wildcard.io", "foo.bar.wildcard.io"], "/s2"),
        "bigger": (["*.specific.com"], "/s3"),
        "another": (["*.anotherwildcard.io"], "/s4"),
    }
    for name, (hosts, p) in hi.items():
        routes.append(on("hi", route(name, rule(be("v1"), matches=[prefix(p)]), hostnames=hosts)))
    # features
    routes += [
        on(
            "main",
            route("weights", rule(be("v1", weight=70), be("v2", weight=30), be("v3", weight=0))),
            ["weights.main.test"],
        ),
        on("main", route("half-bad", rule(be("v1", weight=50), be("nope", weight=50))), ["halfbad.main.test"]),
        on("main", route("bad", rule(be("nope"))), ["bad.main.test"]),
        on("main", route("zero", rule(be("v1", weight=0))), ["zero.main.test"]),
        on(
            "main",
            route(
                "headers",
                rule(
                    be("v1"),
                    filters=[
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "X-Header-Set", "value": "set-overwrites-values"}],
                                "add": [
                                    {"name": "X-Header-Add", "value": "header-val-1"},
                                    {"name": "X-Header-Add-Append", "value": "header-val-2"},
                                ],
                                "remove": ["X-Header-Remove"],
                            },
                        },
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {
                                "set": [{"name": "X-Resp-Set", "value": "a $b"}],
                                "add": [{"name": "X-Resp-Add", "value": "c"}],
                                "remove": ["Content-Type"],
                            },
                        },
                    ],
                ),
            ),
            ["headers.main.test"],
        ),
        on(
            "main",
            route(
                "rewrite",
                rule(
                    be("v1"),
                    matches=[prefix("/prefix/one")],
                    filters=[
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"}},
                        }
                    ],
                ),
                rule(
                    be("v1"),
                    matches=[prefix("/strip-prefix")],
                    filters=[
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
                        }
                    ],
                ),
                rule(
                    be("v1"),
                    matches=[prefix("/full")],
                    filters=[
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "hostname": "rewritten.example",
                                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/one"},
                            },
                        }
                    ],
                ),
            ),
            ["rewrite.main.test"],
        ),
        on(
            "main",
            route(
                "redirect",
                rule(
                    matches=[prefix("/host")],
                    filters=[{"type": "RequestRedirect", "requestRedirect": {"hostname": "example.org"}}],
                ),
                rule(
                    matches=[prefix("/scheme")],
                    filters=[{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}],
                ),
                rule(
                    matches=[prefix("/path")],
                    filters=[
                        {
                            "type": "RequestRedirect",
                            "requestRedirect": {
                                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
                                "port": 8443,
                            },
                        }
                    ],
                ),
                rule(
                    matches=[exact("/full")],
                    filters=[
                        {
                            "type": "RequestRedirect",
                            "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"}},
                        }
                    ],
                ),
            ),
            ["redirect.main.test"],
        ),
        on(
            "main",
            route("post", rule(be("v2"), matches=[prefix("/", method="POST")]), rule(be("v1"))),
            ["method.main.test"],
        ),
    ]
    return gws, routes


def build() -> RoutingTable:
    gws, routes = scenario()
    services = [svc(n, ns=NS, ip=f"172.30.0.{10 + i}") for i, n in enumerate(BACKENDS)]
    res = build_gateway([GC], gws, routes, services, options=GatewayOptions(addresses=("127.0.0.1",)))
    return combine(RoutingTable(servers=()), res)


@pytest.fixture(scope="module")
def env(echo_backends: Callable[..., Any], nginx_factory: Callable[..., Any], client: Callable[..., Any]) -> Env:
    running = {name: echo_backends(name) for name in BACKENDS}
    table = build()
    endpoints = {svc(n, ns=NS).ports[0].name: [Endpoint("127.0.0.1", running[n].port)] for n in BACKENDS}

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
            gateway_ports=((80, http_port), (443, https_port)),
        )
        return render(table, options, endpoints)

    nginx = nginx_factory(rendered)
    return Env(nginx, {"t": table}, client)


def pure(env: Env, host: str, path: str, **kw: Any) -> str:
    from test_gateway_routes import target

    server = env.tables["t"].gateway_server_for(80, host)
    return "404" if server is None else target(server.gateway_match(path, **kw))


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("bar.com", "v1"),
        ("foo.bar.com", "v2"),
        ("baz.bar.com", "v3"),
        ("multiple.prefixes.bar.com", "v3"),
        ("multiple.prefixes.foo.com", "v3"),
        ("foo.com", "404"),
        ("no.matching.host", "404"),
    ],
)
def test_listener_hostname_matching(env: Env, host: str, want: str) -> None:
    assert env.get(host).backend == want
    assert pure(env, host, "/") == want


@pytest.mark.parametrize(
    ("host", "path", "want"),
    [
        ("very.specific.com", "/s1", "v1"),
        ("foo.nonmatchingwildcard.io", "/s1", "404"),
        ("bar.wildcard.io", "/s2", "v1"),
        ("foo.bar.wildcard.io", "/s2", "v1"),
        ("foo.wildcard.io", "/s2", "404"),
        ("very.specific.com", "/s3", "v1"),
        ("foo.anotherwildcard.io", "/s4", "v1"),
        ("anotherwildcard.io", "/s4", "404"),
    ],
)
def test_hostname_intersection(env: Env, host: str, path: str, want: str) -> None:
    assert env.get(host, path).backend == want


@pytest.mark.parametrize(
    ("host", "path", "headers", "want"),
    [
        ("across.main.test", "/", {}, "v1"),
        ("net.main.test", "/", {}, "v1"),
        ("across.main.test", "/example", {"version": "one"}, "v2"),
        ("across.main.test", "/example", {}, "v1"),
        ("across.main.test", "/v2", {}, "v2"),
        ("across.main.test", "/v2/example", {}, "v3"),
        ("across.main.test", "/", {"version": "two"}, "v3"),
        ("net.main.test", "/", {"version": "two"}, "v1"),
    ],
)
def test_matching_across_routes(env: Env, host: str, path: str, headers: dict[str, str], want: str) -> None:
    assert env.get(host, path, headers=headers).backend == want
    assert pure(env, host, path, headers=headers) == want


@pytest.mark.parametrize(
    ("path", "method", "headers", "want"),
    [
        ("/", "GET", {}, "v1"),
        ("/x", "GET", {"Version": "one"}, "v2"),
        ("/x", "GET", {"version": "ONE"}, "v1"),
        ("/x", "GET", {"version": "one", "color": "blue"}, "v3"),
        ("/x", "POST", {"version": "one", "color": "blue"}, "v1"),
        ("/q?animal=whale", "GET", {}, "v2"),
        ("/q?Animal=whale", "GET", {}, "v1"),
        ("/q?x=1&animal=whale", "GET", {"version": "one"}, "v3"),
        ("/q?animal=whalebone", "GET", {}, "v1"),
        ("/a/b", "GET", {}, "v3"),
        ("/a/b/c", "GET", {}, "v2"),
        ("/a/bc", "GET", {}, "v1"),
    ],
)
def test_header_query_method_precedence(env: Env, path: str, method: str, headers: dict[str, str], want: str) -> None:
    r = env.get("prec.main.test", path, method=method, headers=headers, body=b"x" if method == "POST" else None)
    assert r.backend == want
    p, _, q = path.partition("?")
    assert pure(env, "prec.main.test", p, method=method, headers=headers, query=q) == want


def test_post_body_survives_the_dispatch(env: Env) -> None:
    r = env.get("method.main.test", "/upload", method="POST", body=b"y" * 5000)
    assert (r.backend, r.json["method"], r.json["body_length"]) == ("v2", "POST", 5000)
    assert env.get("method.main.test", "/upload").backend == "v1"


def test_weights_measured(env: Env) -> None:
    counts = Counter(env.get("weights.main.test", f"/{i}").backend for i in range(600))
    assert set(counts) == {"v1", "v2"}, counts  # weight 0 never
    assert 0.6 < counts["v1"] / 600 < 0.8, counts


def test_invalid_backend_share_answers_500(env: Env) -> None:
    counts = Counter(env.get("halfbad.main.test", f"/{i}").backend for i in range(200))
    assert set(counts) == {"v1", "500"}, counts
    assert 0.35 < counts["500"] / 200 < 0.65, counts
    assert env.get("bad.main.test").status == 500
    assert env.get("zero.main.test").status == 500


def test_request_and_response_header_modifiers(env: Env) -> None:
    r = env.get(
        "headers.main.test",
        headers={"X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Set": "set-val"},
    )
    h = r.json["headers"]
    assert h["x-header-add"] == "header-val-1"
    assert h["x-header-add-append"] == "append-val-1,header-val-2"
    assert h["x-header-set"] == "set-overwrites-values"
    assert "x-header-remove" not in h
    assert h["host"] == "headers.main.test"
    assert r.headers["x-resp-set"] == "a $b"
    assert r.headers["x-resp-add"] == "c"
    assert "content-type" not in r.headers


@pytest.mark.parametrize(
    ("path", "want_path"),
    [
        ("/prefix/one/two", "/one/two"),
        ("/prefix/one", "/one"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/strip-prefix/three?q=1", "/three?q=1"),
        ("/full/one/two", "/one"),
    ],
)
def test_url_rewrite(env: Env, path: str, want_path: str) -> None:
    r = env.get("rewrite.main.test", path)
    assert r.json["path"] == want_path
    if path.startswith("/full"):
        assert r.json["headers"]["host"] == "rewritten.example"


@pytest.mark.parametrize(
    ("path", "code", "location"),
    [
        ("/host/a?x=1", 302, "http://example.org/host/a?x=1"),
        ("/scheme", 301, "https://redirect.main.test/scheme"),
        ("/path/rest", 302, "http://redirect.main.test:8443/new/rest"),
        ("/full", 302, "http://redirect.main.test/x"),
    ],
)
def test_request_redirect(env: Env, path: str, code: int, location: str) -> None:
    r = env.get("redirect.main.test", path)
    assert (r.status, r.headers["location"]) == (code, location)
