"""`kproxy ingress convert`: Ingresses and ingress-nginx annotations → Gateway API objects.

One test per mapping, then the round trip: the repository's Ingress scenarios (the seed's path
and host tables, the Vagrant smoke app, and one of every annotation the converter maps) are
converted, read back by kproxy's own Gateway API reading, and every request of a table must end
where the original Ingresses send it, according to the pure matchers of both APIs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from test_ingress_routes import CLASS, SEED_PATH_ROWS, P, fake_tls_secret, ingress, path, rule, svc

from kproxy.cli.main import main
from kproxy.convert import convert_service
from kproxy.ingress.convert import ClassOptions, build_routes
from kproxy.ingress.gateway import GatewayOptions, build_gateway, combine
from kproxy.ingress.migrate import MigrateOptions, Migration, migrate
from kproxy.ingress.model import RoutingTable
from kproxy.model import Service

REPO = Path(__file__).resolve().parents[2]
SERVICES = [svc(n, ip=f"172.30.0.{10 + i}") for i, n in enumerate(("p0", "p1", "p2", "web", "next", "api", "rx"))]


def convert(*ings: dict[str, Any], services: list[Service] | None = None, **kw: Any) -> Migration:
    return migrate(list(ings), SERVICES if services is None else services, **kw)


def kinds(m: Migration, kind: str) -> list[dict[str, Any]]:
    return [o for o in m.objects if o["kind"] == kind]


def route_named(m: Migration, name: str) -> dict[str, Any]:
    (r,) = [o for o in kinds(m, "HTTPRoute") if o["metadata"]["name"] == name]
    return r


def notes(m: Migration, ref: str = "Ingress default/a") -> str:
    return "\n".join(f"{r.field}: {r.message}" for r in m.reasons if r.ref == ref)


# --- one test per mapping --------------------------------------------------------------------


def test_paths_hosts_and_one_gateway_per_class() -> None:
    m = convert(
        ingress(
            "a",
            rule(
                "a.example.com",
                path("/x", "p0", type="Exact"),
                path("/y", "p1"),
                path("/z", "p2", type="ImplementationSpecific"),
            ),
        ),
        ingress("b", rule("b.example.com", path("/", "p0")), cls="other"),
    )
    assert [o["kind"] for o in m.objects] == ["GatewayClass", "Gateway", "Gateway", "HTTPRoute", "HTTPRoute"]
    assert [g["metadata"]["name"] for g in kinds(m, "Gateway")] == ["kproxy", "other"]
    r = route_named(m, "a")
    assert r["spec"]["hostnames"] == ["a.example.com"]
    assert r["spec"]["parentRefs"][0]["name"] == "kproxy"
    assert [(x["matches"][0]["path"], x["backendRefs"]) for x in r["spec"]["rules"]] == [
        ({"type": "Exact", "value": "/x"}, [{"name": "p0", "port": 80}]),
        ({"type": "PathPrefix", "value": "/y"}, [{"name": "p1", "port": 80}]),
        ({"type": "PathPrefix", "value": "/z"}, [{"name": "p2", "port": 80}]),
    ]
    assert "ImplementationSpecific /z written as PathPrefix" in notes(m)


def test_several_hosts_get_one_route_each_and_default_backend_is_a_root_rule() -> None:
    m = convert(
        ingress(
            "a",
            rule("a.example.com", path("/x", "p0")),
            rule("*.b.example.com", path("/", "p1")),
            default_backend={"service": {"name": "p2", "port": {"number": 80}}},
        )
    )
    names = [o["metadata"]["name"] for o in kinds(m, "HTTPRoute")]
    assert names == ["a-a.example.com", "a-wildcard.b.example.com"]
    rules = route_named(m, "a-a.example.com")["spec"]["rules"]
    assert rules[-1] == {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [{"name": "p2", "port": 80}],
    }
    assert "a Gateway API wildcard covers any number of labels" in notes(m)


def test_tls_listener_certificate_grant_and_https_redirect() -> None:
    m = convert(
        ingress("a", rule("a.example.com", path("/", "p0")), tls=[{"hosts": ["a.example.com"], "secretName": "a-tls"}]),
        secrets=[fake_tls_secret("a-tls")],
        options=MigrateOptions(gateway_namespace="edge"),
    )
    (gw,) = kinds(m, "Gateway")
    https = gw["spec"]["listeners"][1]
    assert https["hostname"] == "a.example.com" and https["port"] == 443
    assert https["tls"]["certificateRefs"] == [{"kind": "Secret", "name": "a-tls", "namespace": "default"}]
    (grant,) = kinds(m, "ReferenceGrant")
    assert grant["metadata"]["namespace"] == "default"
    assert grant["spec"]["from"][0]["namespace"] == "edge"
    assert grant["spec"]["to"] == [{"group": "", "kind": "Secret", "name": "a-tls"}]
    serve, redirect = route_named(m, "a"), route_named(m, "a-https-redirect")
    assert serve["spec"]["parentRefs"][0]["sectionName"] == "https-a.example.com"
    assert redirect["spec"]["parentRefs"][0]["sectionName"] == "http"
    assert redirect["spec"]["rules"][0]["filters"] == [
        {"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}
    ]


def test_ssl_redirect_false_serves_both_listeners() -> None:
    m = convert(
        ingress(
            "a",
            rule("a.example.com", path("/", "p0")),
            tls=[{"hosts": ["a.example.com"], "secretName": "t"}],
            ann={P + "ssl-redirect": "false"},
        )
    )
    assert [o["metadata"]["name"] for o in kinds(m, "HTTPRoute")] == ["a"]
    assert [p["sectionName"] for p in route_named(m, "a")["spec"]["parentRefs"]] == ["http", "https-a.example.com"]


def test_force_ssl_redirect_without_tls_writes_only_the_redirect() -> None:
    m = convert(ingress("a", rule("a.example.com", path("/", "p0")), ann={P + "force-ssl-redirect": "true"}))
    assert [o["metadata"]["name"] for o in kinds(m, "HTTPRoute")] == ["a-https-redirect"]
    assert "only the redirect is written" in notes(m)


@pytest.mark.parametrize(
    ("p", "type_", "target", "want_match", "want_rewrite"),
    [
        (
            "/v1(/|$)(.*)",
            "ImplementationSpecific",
            "/$2",
            ("PathPrefix", "/v1"),
            {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"},
        ),
        (
            "/v1/(.*)",
            "ImplementationSpecific",
            "/api/$1",
            ("PathPrefix", "/v1"),
            {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/api"},
        ),
        ("/old", "Prefix", "/new", ("PathPrefix", "/old"), {"type": "ReplaceFullPath", "replaceFullPath": "/new"}),
        ("/old", "Exact", "/new/$1", ("Exact", "/old"), {"type": "ReplaceFullPath", "replaceFullPath": "/new/"}),
        ("/(.*)", "ImplementationSpecific", "/$1", ("PathPrefix", "/"), None),
    ],
)
def test_rewrite_target(p: str, type_: str, target: str, want_match: tuple[str, str], want_rewrite: Any) -> None:
    m = convert(ingress("a", rule("a.example.com", path(p, "p0", type=type_)), ann={P + "rewrite-target": target}))
    (r,) = route_named(m, "a")["spec"]["rules"]
    assert r["matches"][0]["path"] == {"type": want_match[0], "value": want_match[1]}
    assert r.get("filters") == (
        None if want_rewrite is None else [{"type": "URLRewrite", "urlRewrite": {"path": want_rewrite}}]
    )


@pytest.mark.parametrize(("p", "target"), [("/v[0-9]+/(.*)", "/$1"), ("/v1/(.*)/x", "/$1"), ("/v1/(.*)", "/$1/x")])
def test_regex_captures_that_are_no_prefix_replacement_are_reported(p: str, target: str) -> None:
    m = convert(
        ingress(
            "a", rule("a.example.com", path(p, "p0", type="ImplementationSpecific")), ann={P + "rewrite-target": target}
        )
    )
    assert not kinds(m, "HTTPRoute")
    assert "path left out" in notes(m)


@pytest.mark.parametrize(
    ("ann", "want"),
    [
        (
            {P + "permanent-redirect": "https://new.example.com/x"},
            {
                "scheme": "https",
                "hostname": "new.example.com",
                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"},
                "statusCode": 301,
            },
        ),
        (
            {P + "permanent-redirect": "http://new.example.com:8080", P + "permanent-redirect-code": "308"},
            {
                "scheme": "http",
                "hostname": "new.example.com",
                "port": 8080,
                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/"},
                "statusCode": 308,
            },
        ),
        (
            {P + "temporal-redirect": "https://tmp.example.com/y"},
            {
                "scheme": "https",
                "hostname": "tmp.example.com",
                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/y"},
                "statusCode": 302,
            },
        ),
    ],
)
def test_permanent_and_temporal_redirects(ann: dict[str, str], want: dict[str, Any]) -> None:
    m = convert(ingress("a", rule("a.example.com", path("/", "p0")), ann=ann))
    (r,) = route_named(m, "a")["spec"]["rules"]
    assert r == {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "filters": [{"type": "RequestRedirect", "requestRedirect": want}],
    }
    assert not notes(m)


def test_redirect_with_a_query_is_reported() -> None:
    m = convert(
        ingress(
            "a", rule("a.example.com", path("/", "p0")), ann={P + "permanent-redirect": "https://n.example.com/?a=b"}
        )
    )
    assert "cannot set a query string" in notes(m)


def test_app_root_is_an_exact_root_redirect() -> None:
    m = convert(ingress("a", rule("a.example.com", path("/", "p0")), ann={P + "app-root": "/app"}))
    first = route_named(m, "a")["spec"]["rules"][0]
    assert first == {
        "matches": [{"path": {"type": "Exact", "value": "/"}}],
        "filters": [
            {
                "type": "RequestRedirect",
                "requestRedirect": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/app"}, "statusCode": 302},
            }
        ],
    }


def test_canary_by_weight_and_header() -> None:
    main_ = ingress("a", rule("a.example.com", path("/", "web")))
    canary = ingress(
        "c",
        rule("a.example.com", path("/", "next")),
        ann={
            P + "canary": "true",
            P + "canary-weight": "30",
            P + "canary-by-header": "X-Canary",
            P + "canary-by-header-value": "yes",
        },
        created="2024-06-01T00:00:00Z",
    )
    m = convert(main_, canary)
    assert [o["metadata"]["name"] for o in kinds(m, "HTTPRoute")] == ["a"]
    by_header, weighted = route_named(m, "a")["spec"]["rules"]
    assert by_header["matches"][0]["headers"] == [{"type": "Exact", "name": "X-Canary", "value": "yes"}]
    assert by_header["backendRefs"] == [{"name": "next", "port": 80}]
    assert weighted["backendRefs"] == [
        {"name": "web", "port": 80, "weight": 70},
        {"name": "next", "port": 80, "weight": 30},
    ]
    assert "weights 70/30" in notes(m, "Ingress default/c")


def test_services_absent_from_the_input_are_no_reason_to_drop_anything() -> None:
    main_ = ingress("a", rule("a.example.com", path("/", "web")), tls=[{"hosts": ["a.example.com"], "secretName": "t"}])
    canary = ingress(
        "c",
        rule("a.example.com", path("/", "next")),
        ann={P + "canary": "true", P + "canary-weight": "10"},
        created="2024-06-01T00:00:00Z",
    )
    m = convert(main_, canary, services=[])
    (rule_,) = route_named(m, "a")["spec"]["rules"]
    assert rule_["backendRefs"] == [
        {"name": "web", "port": 80, "weight": 90},
        {"name": "next", "port": 80, "weight": 10},
    ]
    assert "not found" not in "\n".join(map(str, m.reasons))
    named = convert(ingress("n", rule("a.example.com", path("/", "web", port="http"))), services=[])
    assert not kinds(named, "HTTPRoute")
    assert "is a name and the Service is not in the input" in notes(named, "Ingress default/n")


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("configuration-snippet", "more_set_headers 'A: b';", "raw nginx configuration"),
        ("server-snippet", "location /x {}", "raw nginx configuration"),
        ("enable-cors", "true", "no CORS filter"),
        ("limit-rps", "5", "no rate limiting"),
        ("proxy-body-size", "8m", "no request body size limit"),
        ("affinity", "cookie", "session persistence"),
        ("upstream-hash-by", "$request_uri", "no Gateway API equivalent"),
    ],
)
def test_other_annotations_are_reported_and_routes_kept(name: str, value: str, why: str) -> None:
    m = convert(ingress("a", rule("a.example.com", path("/", "p0")), ann={P + name: value}))
    assert route_named(m, "a")["spec"]["rules"][0]["backendRefs"] == [{"name": "p0", "port": 80}]
    assert f"metadata.annotations[{P}{name}]: not carried over: " in notes(m)
    assert why in notes(m)


@pytest.mark.parametrize(
    "ann",
    [
        {P + "whitelist-source-range": "10.0.0.0/8"},
        {P + "auth-type": "basic", P + "auth-secret": "missing"},
        {P + "auth-url": "https://auth.example.com/"},
    ],
)
def test_protected_ingresses_fail_closed(ann: dict[str, str]) -> None:
    m = convert(ingress("a", rule("a.example.com", path("/", "p0")), ann=ann))
    assert not kinds(m, "HTTPRoute")
    assert "fail closed" in notes(m)


def test_output_is_deterministic_whatever_the_input_order() -> None:
    ings = [
        ingress("a", rule("a.example.com", path("/", "p0")), tls=[{"hosts": ["a.example.com"], "secretName": "t"}]),
        ingress("b", rule("b.example.com", path("/b", "p1")), ns="team", cls="x"),
        ingress("c", rule(None, path("/", "p2")), ann={P + "limit-rps": "3"}),
    ]
    one, two = convert(*ings), convert(*reversed(ings))
    assert yaml.safe_dump_all(one.objects) == yaml.safe_dump_all(two.objects)
    assert one.reasons == two.reasons


# --- round trip: the same routing decisions through both APIs ---------------------------------


def ingress_decision(t: RoutingTable, scheme: str, host: str, p: str) -> str:
    m = t.match(host, p)
    r = m.route
    if r is None:
        return "404"
    o = r.options
    if o.deny or not r.backend.ok:
        return "error"
    redirect = o.force_ssl_redirect or (o.ssl_redirect if o.ssl_redirect is not None else m.server.tls is not None)
    if scheme == "http" and redirect:
        return "https-redirect"
    if o.permanent_redirect is not None:
        return f"redirect {o.permanent_redirect_code} {o.permanent_redirect}"
    if o.app_root is not None and p == "/":
        return f"redirect 302 {o.app_root}"
    upstream = p
    if o.rewrite_target is not None and m.location.modifier in ("~", "~*"):
        hit = re.search(m.location.pattern, p, re.IGNORECASE if m.location.modifier == "~*" else 0)
        assert hit is not None
        upstream = re.sub(
            r"\$([1-9])",
            lambda g: hit.group(int(g.group(1))) or "" if int(g.group(1)) <= (hit.re.groups) else "",
            o.rewrite_target,
        )
    shares = [(r.backend, 1)]
    if r.canary is not None and r.canary.policy.weight:
        w = min(r.canary.policy.weight, r.canary.policy.weight_total)
        shares = [(r.backend, r.canary.policy.weight_total - w), (r.canary.backend, w)]
    return (
        _split([(b.ref.service, b.service_port.port if b.service_port else 0, w) for b, w in shares]) + f" {upstream}"
    )


def gateway_decision(t: RoutingTable, scheme: str, host: str, p: str) -> str:
    server = t.gateway_server_for(80 if scheme == "http" else 443, host)
    r = server.gateway_match(p) if server is not None else None
    if r is None:
        return "404"
    a = r.action
    assert a is not None
    if a.redirect is not None:
        rd = a.redirect
        if rd.scheme == "https" and scheme == "http" and rd.hostname is None and rd.path is None:
            return "https-redirect"
        target = rd.path.apply(p) if rd.path is not None else p
        if rd.hostname is None:
            return f"redirect {rd.status} {target}"
        return f"redirect {rd.status} {rd.scheme}://{rd.hostname}{f':{rd.port}' if rd.port else ''}{'' if target == '/' and rd.path else target}"
    valid = [b for b in a.backends if b.weight > 0]
    if not valid or not all(b.backend.ok for b in valid):
        return "error"
    upstream = a.rewrite_path.apply(p) if a.rewrite_path is not None else p
    return _split([(b.backend.ref.service, int(b.backend.ref.port), b.weight) for b in valid]) + f" {upstream}"


def _split(shares: list[tuple[str, int, int]]) -> str:
    shares = [s for s in shares if s[2] > 0]
    if len(shares) == 1:
        return f"{shares[0][0]}:{shares[0][1]}"
    total = sum(w for _, _, w in shares)
    return "+".join(f"{s}:{port}={100 * w // total}%" for s, port, w in shares)


def round_trip(
    ings: list[dict[str, Any]], services: list[Service], secrets: list[dict[str, Any]], classes: list[dict[str, Any]]
) -> tuple[RoutingTable, RoutingTable, Migration]:
    m = migrate(ings, services, secrets, classes)
    ing_table = build_routes(ings, services, secrets, classes, ClassOptions(watch_without_class=True))
    objs = {
        k: [o for o in m.objects if o["kind"] == k] for k in ("GatewayClass", "Gateway", "HTTPRoute", "ReferenceGrant")
    }
    res = build_gateway(
        objs["GatewayClass"],
        objs["Gateway"],
        objs["HTTPRoute"],
        services,
        secrets,
        objs["ReferenceGrant"],
        [],
        GatewayOptions(),
    )
    for o in objs["HTTPRoute"]:  # every converted route is accepted with its references resolved
        st = res.status("HTTPRoute", o["metadata"]["namespace"], o["metadata"]["name"])
        for parent in st["parents"]:
            assert {c["type"]: c["status"] for c in parent["conditions"]} == {
                "Accepted": "True",
                "ResolvedRefs": "True",
            }, (o["metadata"], parent)
    gw_table = combine(RoutingTable(servers=()), res)
    assert not gw_table.reasons, gw_table.reasons
    return ing_table, gw_table, m


def seed_scenarios() -> list[Any]:
    out = []
    for case_id, paths, requests, _ in SEED_PATH_ROWS:
        ings = [
            ingress("row", rule("paths.example.com", *(path(p, f"p{i}", type=t) for i, (t, p) in enumerate(paths))))
        ]
        reqs = [("http", "paths.example.com", r) for r in requests] + [("http", "paths.example.com", "/elsewhere")]
        out.append(pytest.param(ings, reqs, id=case_id))
    wild = [ingress("w", rule("foo.bar.com", path("/bar", "p0")), rule("*.foo.com", path("/foo", "p1")))]
    out.append(
        pytest.param(
            wild,
            [
                ("http", h, p)
                for h in ("foo.bar.com", "x.foo.com", "foo.com", "FOO.bar.com:8080")
                for p in ("/bar", "/foo", "/")
            ],
            id="seed-wildcard-example",
        )
    )
    return out


TLS_STORY = [
    ingress(
        "shop",
        rule("shop.example.com", path("/", "web"), path("/healthz", "p0", type="Exact")),
        tls=[{"hosts": ["shop.example.com"], "secretName": "shop-tls"}],
        default_backend={"service": {"name": "p2", "port": {"number": 80}}},
        ann={P + "proxy-body-size": "8m"},
    ),
    ingress(
        "shop-canary",
        rule("shop.example.com", path("/", "next")),
        ann={P + "canary": "true", P + "canary-weight": "25"},
        created="2024-02-01T00:00:00Z",
    ),
    ingress(
        "docs",
        rule("docs.example.com", path("/old", "p1"), path("/guide", "p2", type="Exact")),
        tls=[{"hosts": ["docs.example.com"], "secretName": "docs-tls"}],
        ann={P + "ssl-redirect": "false", P + "app-root": "/guide"},
    ),
    ingress(
        "moved",
        rule("moved.example.com", path("/", "p0")),
        ann={P + "permanent-redirect": "https://shop.example.com/new"},
    ),
    ingress(
        "api",
        rule("api.example.com", path("/v1(/|$)(.*)", "api", type="ImplementationSpecific")),
        ann={P + "use-regex": "true", P + "rewrite-target": "/$2"},
    ),
    ingress(
        "api2",
        rule("api2.example.com", path("/v2/(.*)", "api", type="ImplementationSpecific")),
        ann={P + "rewrite-target": "/inner/$1"},
    ),
    ingress("old", rule("old.example.com", path("/app", "p1")), ann={P + "rewrite-target": "/"}),
]
TLS_REQUESTS = [
    (scheme, host, p)
    for host in ("shop.example.com", "docs.example.com")
    for scheme in ("http", "https")
    for p in ("/", "/healthz", "/healthz/x", "/old/a", "/guide", "/x")
] + [
    ("http", h, p)
    for h in ("moved.example.com", "api.example.com", "api2.example.com", "old.example.com", "nohost.example.com")
    for p in ("/", "/v1", "/v1/", "/v1/users/7", "/v2/x", "/app", "/app/deep")
]


def scenarios() -> list[Any]:
    smoke = list(yaml.safe_load_all((REPO / "vagrant" / "smoke-app.yaml").read_text()))
    smoke_svcs = [
        s
        for i, o in enumerate(smoke)
        if o and o.get("kind") == "Service"
        for s in [convert_service({**o, "spec": {**o["spec"], "clusterIP": f"172.30.9.{i}"}})]
        if s is not None
    ]
    smoke_ings = [o for o in smoke if o and o.get("kind") == "Ingress"]
    return seed_scenarios() + [
        pytest.param(
            smoke_ings,
            [("http", "echo.kproxy.test", p) for p in ("/", "/anything")] + [("http", "other.test", "/")],
            smoke_svcs,
            id="vagrant-smoke-app",
        ),
        pytest.param(TLS_STORY, TLS_REQUESTS, id="tls-redirects-canary-rewrites"),
    ]


def _params() -> list[Any]:
    out = []
    for p in scenarios():
        values = list(p.values)
        if len(values) == 2:
            values.append(SERVICES)
        out.append(pytest.param(*values, id=p.id))
    return out


@pytest.mark.parametrize(("ings", "requests", "services"), _params())
def test_round_trip_routes_every_request_alike(
    ings: list[dict[str, Any]], requests: list[tuple[str, str, str]], services: list[Service]
) -> None:
    secrets = [fake_tls_secret("shop-tls"), fake_tls_secret("docs-tls")]
    ing_t, gw_t, _ = round_trip(ings, services, secrets, [CLASS])
    for scheme, host, p in requests:
        want = ingress_decision(ing_t, scheme, host, p)
        assert gateway_decision(gw_t, scheme, host, p) == want, (scheme, host, p)


def test_round_trip_known_differences_are_named() -> None:
    """What Gateway API decides differently is named: a wildcard covering two labels (the seed's
    host row 2), and a host-less rule also serving paths a host's own routes do not match."""
    ings = [ingress("w", rule("*.foo.com", path("/", "p0"))), ingress("h", rule("h.example.com", path("/h", "p1")))]
    ings.append(ingress("any", rule(None, path("/", "p2"))))
    ing_t, gw_t, m = round_trip(ings, SERVICES, [], [CLASS])
    assert ingress_decision(ing_t, "http", "baz.bar.foo.com", "/") == "p2:80 /"
    assert gateway_decision(gw_t, "http", "baz.bar.foo.com", "/") == "p0:80 /"
    assert "covers any number of labels" in notes(m, "Ingress default/w")
    assert ingress_decision(ing_t, "http", "h.example.com", "/x") == "404"
    assert gateway_decision(gw_t, "http", "h.example.com", "/x") == "p2:80 /x"
    assert "also serves the paths other hosts' routes do not match" in notes(m, "Ingress default/any")


def test_cli_convert_then_render(tmp_path: Path) -> None:
    state = tmp_path / "state.yaml"
    svc_objs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": n, "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": f"172.30.0.{10 + i}",
                "clusterIPs": [f"172.30.0.{10 + i}"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            },
        }
        for i, n in enumerate(("web", "next", "p0", "p1", "p2", "api"))
    ]
    state.write_text(
        yaml.safe_dump_all(
            [CLASS | {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass"}, *svc_objs, *TLS_STORY]
        )
    )
    runner = CliRunner()
    res = runner.invoke(main, ["ingress", "convert", "--state", str(state)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "gateway.yaml"
    out.write_text(res.stdout)
    assert (
        "kproxy: Ingress default/shop: metadata.annotations[nginx.ingress.kubernetes.io/proxy-body-size]: not carried over"
        in res.stderr
    )
    again = runner.invoke(main, ["ingress", "convert", "--state", str(state)])
    assert again.stdout == res.stdout  # deterministic
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump_all(svc_objs))
    rendered = runner.invoke(
        main, ["ingress", "render", "--strict", "--state", str(out), "--state", str(tmp_path / "svc.yaml")]
    )
    assert rendered.exit_code == 0, rendered.stderr
    assert "server_name" in rendered.stdout
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.path.exists(nginx):  # and real nginx accepts what was rendered
        conf = tmp_path / "nginx.conf"
        conf.write_text(rendered.stdout.replace("/var/lib/kproxy/ingress", str(tmp_path)))
        r = subprocess.run(
            [nginx, "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr", "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr


def test_the_docs_example_is_what_the_command_prints(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "gateway-api.md").read_text()
    section = doc[doc.index("## Leaving ingress-nginx") :]
    blocks = re.findall(r"```(?:yaml|text)\n(.*?)```", section, re.S)
    source, stderr, stdout = blocks[0], blocks[1], blocks[2]
    (tmp_path / "ingresses.yaml").write_text(source)
    res = CliRunner().invoke(main, ["ingress", "convert", "--state", str(tmp_path / "ingresses.yaml")])
    assert res.exit_code == 0
    assert res.stderr == stderr
    assert res.stdout == stdout
