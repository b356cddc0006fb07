"""HTTPRoute semantics and status, one table per feature, modelled on the Gateway API conformance
tests (same-namespace route, hostname intersection, listener hostname matching, matching across
routes, header/query/method matching, weights, filters, cross-namespace references, invalid
backends and parents). The pure matcher (`Server.gateway_match`) is what the renderer emits, so
these rows are also run against a real nginx in tests/ingress/test_gateway_real.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_ingress_routes import svc

from kproxy.ingress.gateway import GatewayOptions, GatewayResult, build_gateway, combine, covers, intersect
from kproxy.ingress.model import Route, RoutingTable

NS = "infra"
GC = {"metadata": {"name": "kproxy"}, "spec": {"controllerName": "kproxy.io/gateway-controller"}}
SERVICES = [svc(n, ns=NS, ip=f"172.30.0.{10 + i}") for i, n in enumerate(("v1", "v2", "v3"))] + [
    svc("web", ns="other", ip="172.30.1.10")
]


def listener(name: str, port: int = 80, hostname: str | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port, "protocol": kw.pop("protocol", "HTTP")}
    if hostname is not None:
        out["hostname"] = hostname
    out.update(kw)
    return out


def gateway(name: str = "gw", *listeners: dict[str, Any], ns: str = NS, **spec: Any) -> dict[str, Any]:
    return {
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "generation": 1, "creationTimestamp": "2020-01-01T00:00:00Z"},
        "spec": {
            "gatewayClassName": spec.pop("cls", "kproxy"),
            "listeners": list(listeners) or [listener("http", allowedRoutes={"namespaces": {"from": "All"}})],
            **spec,
        },
    }


def be(name: str, port: int = 80, **kw: Any) -> dict[str, Any]:
    return {"name": name, "port": port, **kw}


def rule(*backends: dict[str, Any], matches: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"backendRefs": list(backends), **kw}
    if matches is not None:
        out["matches"] = matches
    return out


def route(
    name: str,
    *rules: dict[str, Any],
    ns: str = NS,
    parents: list[dict[str, Any]] | None = None,
    hostnames: list[str] | None = None,
    created: str = "2021-01-01T00:00:00Z",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"parentRefs": parents or [{"name": "gw", "namespace": NS}], "rules": list(rules)}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return {
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns, "generation": 2, "creationTimestamp": created},
        "spec": spec,
    }


def prefix(p: str, **kw: Any) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": p}, **kw}


def exact(p: str, **kw: Any) -> dict[str, Any]:
    return {"path": {"type": "Exact", "value": p}, **kw}


def build(gateways: list[dict[str, Any]], routes: list[dict[str, Any]], **kw: Any) -> GatewayResult:
    return build_gateway(
        [GC],
        gateways,
        routes,
        SERVICES,
        kw.pop("secrets", []),
        kw.pop("grants", []),
        kw.pop("namespaces", []),
        GatewayOptions(addresses=("192.0.2.1",)),
    )


def table(gateways: list[dict[str, Any]], routes: list[dict[str, Any]], **kw: Any) -> RoutingTable:
    return combine(RoutingTable(servers=()), build(gateways, routes, **kw))


def target(r: Route | None) -> str:
    """Where a request ends: a backend name, a redirect, or the status code nginx answers."""
    if r is None:
        return "404"
    a = r.action
    assert a is not None
    if a.redirect is not None:
        return f"redirect {a.redirect.status}"
    valid = [b for b in a.backends if b.weight > 0]
    if not valid or not all(b.backend.ok for b in valid):
        return "500" if not any(b.backend.ok for b in valid) else "mixed"
    return "+".join(b.backend.ref.service for b in valid)


def resolve(t: RoutingTable, host: str, path: str, port: int = 80, **kw: Any) -> str:
    server = t.gateway_server_for(port, host)
    if server is None:
        return "no listener"
    return target(server.gateway_match(path, **kw))


def parent_conditions(res: GatewayResult, name: str, ns: str = NS) -> list[dict[str, Any]]:
    st = res.status("HTTPRoute", ns, name)
    assert st is not None, f"no status for {name}"
    return [{c["type"]: c["reason"]} for p in st["parents"] for c in p["conditions"]]


# --- simple same-namespace route, status -------------------------------------------------------


def test_simple_same_namespace_route_and_statuses() -> None:
    res = build([gateway()], [route("r", rule(be("v1")))])
    assert res.status("GatewayClass", "", "kproxy")["conditions"][0]["reason"] == "Accepted"
    gw = res.status("Gateway", NS, "gw")
    assert [(c["type"], c["status"], c["reason"]) for c in gw["conditions"]] == [
        ("Accepted", "True", "Accepted"),
        ("Programmed", "True", "Programmed"),
    ]
    assert gw["addresses"] == [{"type": "IPAddress", "value": "192.0.2.1"}]
    (ls,) = gw["listeners"]
    assert ls["attachedRoutes"] == 1
    assert ls["supportedKinds"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}]
    assert {c["type"]: c["status"] for c in ls["conditions"]} == {
        "Accepted": "True",
        "Conflicted": "False",
        "ResolvedRefs": "True",
        "Programmed": "True",
    }
    st = res.status("HTTPRoute", NS, "r")
    (parent,) = st["parents"]
    assert parent["parentRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "namespace": NS,
        "name": "gw",
    }
    assert parent["controllerName"] == "kproxy.io/gateway-controller"
    assert [(c["type"], c["status"], c["reason"], c["observedGeneration"]) for c in parent["conditions"]] == [
        ("Accepted", "True", "Accepted", 2),
        ("ResolvedRefs", "True", "ResolvedRefs", 2),
    ]
    t = combine(RoutingTable(servers=()), res)
    assert resolve(t, "anything.example", "/") == "v1"


def test_other_controllers_objects_get_no_status() -> None:
    other = gateway("theirs", cls="nginx")
    res = build([other], [route("r", rule(be("v1")), parents=[{"name": "theirs"}])])
    assert res.status("Gateway", NS, "theirs") is None
    assert res.status("HTTPRoute", NS, "r") is None
    assert res.servers == ()


# --- hostnames ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "want"),
    [
        ("*.example.com", "foo.example.com", True),
        ("*.example.com", "foo.bar.example.com", True),  # listener wildcards cover many labels
        ("*.example.com", "example.com", False),
        ("example.com", "example.com", True),
        (None, "anything", True),
        ("*.example.com", "*.foo.example.com", True),
    ],
)
def test_covers(pattern: str | None, host: str, want: bool) -> None:
    assert covers(pattern, host) is want


@pytest.mark.parametrize(
    ("listener_host", "route_hosts", "want"),
    [
        pytest.param("very.specific.com", ("non.matching.com", "*.nonmatchingwildcard.io"), (), id="no-intersection"),
        pytest.param(
            "*.wildcard.io",
            ("bar.wildcard.io", "foo.bar.wildcard.io"),
            ("bar.wildcard.io", "foo.bar.wildcard.io"),
            id="route-more-specific",
        ),
        pytest.param("very.specific.com", ("*.specific.com",), ("very.specific.com",), id="listener-more-specific"),
        pytest.param(None, ("a.com",), ("a.com",), id="listener-any"),
        pytest.param("a.com", (), ("a.com",), id="route-any"),
        pytest.param("*.anotherwildcard.io", ("*.anotherwildcard.io",), ("*.anotherwildcard.io",), id="same-wildcard"),
    ],
)
def test_hostname_intersection(listener_host: str | None, route_hosts: tuple[str, ...], want: tuple[str, ...]) -> None:
    assert intersect(listener_host, route_hosts) == want


def listener_hostname_gateway() -> dict[str, Any]:
    # httproute-listener-hostname-matching: four listeners on port 80
    return gateway(
        "gw",
        listener("listener-1", hostname="bar.com"),
        listener("listener-2", hostname="foo.bar.com"),
        listener("listener-3", hostname="*.bar.com"),
        listener("listener-4", hostname="*.foo.com"),
    )


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("bar.com", "v1"),
        ("foo.bar.com", "v2"),
        ("baz.bar.com", "v3"),
        ("boo.bar.com", "v3"),
        ("multiple.prefixes.bar.com", "v3"),
        ("multiple.prefixes.foo.com", "v3"),
        ("foo.com", "404"),
        ("no.matching.host", "404"),
    ],
)
def test_listener_hostname_matching(host: str, want: str) -> None:
    routes = [
        route("r1", rule(be("v1")), parents=[{"name": "gw", "sectionName": "listener-1"}]),
        route("r2", rule(be("v2")), parents=[{"name": "gw", "sectionName": "listener-2"}]),
        route(
            "r3",
            rule(be("v3")),
            parents=[{"name": "gw", "sectionName": "listener-3"}, {"name": "gw", "sectionName": "listener-4"}],
        ),
    ]
    assert resolve(table([listener_hostname_gateway()], routes), host, "/") == want


HOSTNAME_INTERSECTION_GATEWAY = gateway(
    "gw",
    listener("listener-1", hostname="very.specific.com"),
    listener("listener-2", hostname="*.wildcard.io"),
    listener("listener-3", hostname="*.anotherwildcard.io"),
)


@pytest.mark.parametrize(
    ("host", "path", "want"),
    [
        ("very.specific.com", "/s1", "v1"),
        ("non.matching.com", "/s1", "404"),
        ("foo.nonmatchingwildcard.io", "/s1", "404"),
        ("foo.wildcard.io", "/s1", "404"),
        ("very.specific.com", "/s2", "404"),
        ("bar.wildcard.io", "/s2", "v1"),
        ("foo.bar.wildcard.io", "/s2", "v1"),
        ("foo.wildcard.io", "/s2", "404"),
        ("very.specific.com", "/s3", "v1"),
        ("anotherwildcard.io", "/s4", "404"),
        ("foo.anotherwildcard.io", "/s4", "v1"),
        ("foo.bar.anotherwildcard.io", "/s4", "v1"),
    ],
)
def test_hostname_intersection_routing(host: str, path: str, want: str) -> None:
    routes = [
        route(
            "specific",
            rule(be("v1"), matches=[prefix("/s1")]),
            hostnames=["non.matching.com", "*.nonmatchingwildcard.io", "very.specific.com"],
        ),
        route(
            "wildcard",
            rule(be("v1"), matches=[prefix("/s2")]),
            hostnames=["non.matching.com", "bar.wildcard.io", "foo.bar.wildcard.io"],
        ),
        route("bigger", rule(be("v1"), matches=[prefix("/s3")]), hostnames=["*.specific.com"]),
        route("another", rule(be("v1"), matches=[prefix("/s4")]), hostnames=["*.anotherwildcard.io"]),
    ]
    assert resolve(table([HOSTNAME_INTERSECTION_GATEWAY], routes), host, path) == want


def test_no_matching_listener_hostname_status() -> None:
    res = build([HOSTNAME_INTERSECTION_GATEWAY], [route("r", rule(be("v1")), hostnames=["nope.example"])])
    assert parent_conditions(res, "r") == [{"Accepted": "NoMatchingListenerHostname"}, {"ResolvedRefs": "ResolvedRefs"}]
    assert all(s.routes == () for s in res.servers)


# --- precedence --------------------------------------------------------------------------------


def across_routes() -> list[dict[str, Any]]:
    # httproute-matching-across-routes
    return [
        route(
            "a",
            rule(be("v1"), matches=[prefix("/")]),
            rule(be("v2"), matches=[exact("/example", headers=[{"name": "version", "value": "one"}])]),
            hostnames=["example.com", "example.net"],
        ),
        route(
            "b",
            rule(be("v2"), matches=[prefix("/v2")]),
            rule(be("v3"), matches=[exact("/v2/example"), exact("/", headers=[{"name": "version", "value": "two"}])]),
            hostnames=["example.com"],
        ),
    ]


@pytest.mark.parametrize(
    ("host", "path", "headers", "want"),
    [
        ("example.com", "/", {}, "v1"),
        ("example.net", "/", {}, "v1"),
        ("example.com", "/example", {"version": "one"}, "v2"),
        ("example.com", "/example", {}, "v1"),
        ("example.com", "/v2", {}, "v2"),
        ("example.com", "/v2/example", {}, "v3"),
        ("example.com", "/", {"version": "two"}, "v3"),
        ("example.net", "/v2", {}, "v1"),
        ("example.net", "/", {"version": "two"}, "v1"),
    ],
)
def test_matching_across_routes(host: str, path: str, headers: dict[str, str], want: str) -> None:
    assert resolve(table([gateway()], across_routes()), host, path, headers=headers) == want


def precedence_route() -> dict[str, Any]:
    h = [{"name": "version", "value": "one"}]
    q = [{"name": "animal", "value": "whale"}]
    return route(
        "prec",
        rule(be("v1"), matches=[prefix("/")]),
        rule(be("v2"), matches=[prefix("/", headers=h)]),
        rule(be("v3"), matches=[prefix("/", headers=h + [{"name": "color", "value": "blue"}])]),
        rule(be("v1"), matches=[prefix("/", method="POST")]),
        rule(be("v2"), matches=[prefix("/q", queryParams=q)]),
        rule(be("v3"), matches=[prefix("/q", queryParams=q, headers=h)]),
        rule(be("v2"), matches=[prefix("/a/b")]),
        rule(be("v3"), matches=[exact("/a/b")]),
    )


@pytest.mark.parametrize(
    ("path", "method", "headers", "query", "want"),
    [
        pytest.param("/", "GET", {}, "", "v1", id="plain"),
        pytest.param("/x", "GET", {"Version": "one"}, "", "v2", id="header-name-case-insensitive"),
        pytest.param("/x", "GET", {"version": "ONE"}, "", "v1", id="header-value-case-sensitive"),
        pytest.param("/x", "GET", {"version": "one", "color": "blue"}, "", "v3", id="most-headers"),
        pytest.param("/x", "POST", {"version": "one", "color": "blue"}, "", "v1", id="method-before-headers"),
        pytest.param("/q", "GET", {}, "animal=whale", "v2", id="query"),
        pytest.param("/q", "GET", {}, "Animal=whale", "v1", id="query-name-case-sensitive"),
        pytest.param("/q", "GET", {"version": "one"}, "x=1&animal=whale", "v3", id="query-and-header"),
        pytest.param("/a/b", "GET", {}, "", "v3", id="exact-before-prefix"),
        pytest.param("/a/b/c", "GET", {}, "", "v2", id="longest-prefix"),
        pytest.param("/a/bc", "GET", {}, "", "v1", id="prefix-is-element-wise"),
        pytest.param("/a/b/", "GET", {}, "", "v2", id="trailing-slash-under-prefix"),
    ],
)
def test_precedence_within_a_route(path: str, method: str, headers: dict[str, str], query: str, want: str) -> None:
    t = table([gateway()], [precedence_route()])
    assert resolve(t, "h", path, method=method, headers=headers, query=query) == want


def test_oldest_route_wins_a_tie_then_name() -> None:
    older = route("zzz", rule(be("v1"), matches=[prefix("/p")]), created="2020-06-01T00:00:00Z")
    newer = route("aaa", rule(be("v2"), matches=[prefix("/p")]), created="2021-06-01T00:00:00Z")
    assert resolve(table([gateway()], [newer, older]), "h", "/p") == "v1"
    same_age = route("aaa", rule(be("v2"), matches=[prefix("/p")]), created="2020-06-01T00:00:00Z")
    assert resolve(table([gateway()], [older, same_age]), "h", "/p") == "v2"


def test_precise_hostname_beats_wildcard_across_routes() -> None:
    gw = gateway("gw", listener("l", hostname="*.example.com", allowedRoutes={"namespaces": {"from": "Same"}}))
    wild = route("wild", rule(be("v1"), matches=[exact("/x")]), created="2019-01-01T00:00:00Z")
    precise = route("precise", rule(be("v2"), matches=[prefix("/")]), hostnames=["a.example.com"])
    t = table([gw], [wild, precise])
    assert resolve(t, "a.example.com", "/x") == "v2"
    assert resolve(t, "b.example.com", "/x") == "v1"


def test_trailing_slash_of_path_prefix_is_ignored() -> None:
    t = table([gateway()], [route("r", rule(be("v1"), matches=[prefix("/foo/")]))])
    assert resolve(t, "h", "/foo") == "v1"
    assert resolve(t, "h", "/foo/bar") == "v1"
    assert resolve(t, "h", "/foobar") == "404"


# --- weights and backends ----------------------------------------------------------------------


def test_weights_and_weight_zero() -> None:
    r = route("w", rule(be("v1", weight=70), be("v2", weight=30), be("v3", weight=0)))
    t = table([gateway()], [r])
    assert resolve(t, "h", "/") == "v1+v2"  # weight 0: never picked


def test_all_weights_zero_answers_500() -> None:
    t = table([gateway()], [route("w", rule(be("v1", weight=0)))])
    assert resolve(t, "h", "/") == "500"


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        pytest.param(be("nope"), "BackendNotFound", id="missing-service"),
        pytest.param(be("v1", port=9999), "BackendNotFound", id="missing-port"),
        pytest.param(be("v1", kind="Pod"), "InvalidKind", id="invalid-kind"),
        pytest.param(be("v1", group="example.com", kind="Service"), "InvalidKind", id="invalid-group"),
        pytest.param(be("web", namespace="other"), "RefNotPermitted", id="cross-namespace-without-grant"),
    ],
)
def test_invalid_backend_is_500_and_resolved_refs_false(backend: dict[str, Any], reason: str) -> None:
    res = build([gateway()], [route("r", rule(backend))])
    assert parent_conditions(res, "r") == [{"Accepted": "Accepted"}, {"ResolvedRefs": reason}]
    st = res.status("HTTPRoute", NS, "r")["parents"][0]["conditions"][1]
    assert st["status"] == "False"
    assert resolve(combine(RoutingTable(servers=()), res), "h", "/") == "500"


def grant(to_name: str | None = None, from_ns: str = NS) -> dict[str, Any]:
    to: dict[str, Any] = {"group": "", "kind": "Service"}
    if to_name:
        to["name"] = to_name
    return {
        "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "other"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": from_ns}],
            "to": [to],
        },
    }


@pytest.mark.parametrize(
    ("g", "want"),
    [
        pytest.param(grant(), "web", id="grant-all-services"),
        pytest.param(grant("web"), "web", id="grant-this-service"),
        pytest.param(grant("other-svc"), "500", id="grant-another-service"),
        pytest.param(grant(from_ns="elsewhere"), "500", id="grant-another-namespace"),
    ],
)
def test_cross_namespace_backend_with_reference_grant(g: dict[str, Any], want: str) -> None:
    t = table([gateway()], [route("r", rule(be("web", namespace="other")))], grants=[g])
    assert resolve(t, "h", "/") == want


# --- parents -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parents", "listeners", "reason"),
    [
        pytest.param([{"name": "gw", "sectionName": "nope"}], None, "NoMatchingParent", id="section-name"),
        pytest.param([{"name": "gw", "port": 8080}], None, "NoMatchingParent", id="port"),
        pytest.param([{"name": "gw", "sectionName": "http", "port": 80}], None, "Accepted", id="section-and-port"),
        pytest.param(
            [{"name": "gw"}],
            [listener("http", allowedRoutes={"namespaces": {"from": "Same"}})],
            "NotAllowedByListeners",
            id="other-namespace-not-allowed",
        ),
        pytest.param(
            [{"name": "gw"}],
            [
                listener(
                    "http",
                    allowedRoutes={"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}},
                )
            ],
            "Accepted",
            id="namespace-selector",
        ),
        pytest.param(
            [{"name": "gw"}],
            [listener("http", allowedRoutes={"namespaces": {"from": "All"}, "kinds": [{"kind": "GRPCRoute"}]})],
            "NotAllowedByListeners",
            id="kind-not-allowed",
        ),
    ],
)
def test_parent_ref_attachment(
    parents: list[dict[str, Any]], listeners: list[dict[str, Any]] | None, reason: str
) -> None:
    parents = [{**p, "namespace": NS} for p in parents]
    gw = gateway("gw", *(listeners or []))
    namespaces = [{"metadata": {"name": "apps", "labels": {"team": "a"}}}]
    res = build([gw], [route("r", rule(be("web")), ns="apps", parents=parents)], namespaces=namespaces)
    assert parent_conditions(res, "r", ns="apps")[0] == {"Accepted": reason}


def test_listener_conflicts_and_invalid_kinds() -> None:
    gw = gateway(
        "gw",
        listener("a", port=8080),
        listener("b", port=8080),  # same port and hostname
        listener("c", port=8080, protocol="HTTPS", tls={"certificateRefs": [{"name": "missing"}]}),
        listener("d", port=9090, protocol="TCP"),
        listener("e", port=9091, allowedRoutes={"kinds": [{"kind": "TCPRoute"}]}),
    )
    st = build([gw], [])
    ls = {
        x["name"]: {c["type"]: (c["status"], c["reason"]) for c in x["conditions"]}
        for x in st.status("Gateway", NS, "gw")["listeners"]
    }
    assert ls["a"]["Conflicted"] == ("False", "NoConflicts")
    assert ls["b"]["Conflicted"] == ("True", "HostnameConflict")
    assert ls["c"]["ResolvedRefs"] == ("False", "InvalidCertificateRef")
    assert ls["d"]["Accepted"] == ("False", "UnsupportedProtocol")
    assert ls["e"]["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    gwc = st.status("Gateway", NS, "gw")["conditions"][0]
    assert (gwc["status"], gwc["reason"]) == ("True", "ListenersNotValid")


def test_http_listener_on_the_ingress_https_port_conflicts() -> None:
    st = build([gateway("gw", listener("h", port=443))], [])
    (ls,) = st.status("Gateway", NS, "gw")["listeners"]
    assert {c["type"]: c["reason"] for c in ls["conditions"]}["Conflicted"] == "ProtocolConflict"


# --- unsupported features are rejected in status -----------------------------------------------


@pytest.mark.parametrize(
    "bad_rule",
    [
        pytest.param(
            rule(be("v1"), matches=[{"path": {"type": "RegularExpression", "value": "/.*"}}]), id="regex-path"
        ),
        pytest.param(
            rule(be("v1"), matches=[prefix("/", headers=[{"name": "x", "value": "y", "type": "RegularExpression"}])]),
            id="regex-header",
        ),
        pytest.param(
            rule(be("v1"), matches=[prefix("/", headers=[{"name": "x_y", "value": "y"}])]), id="underscore-header"
        ),
        pytest.param(
            rule(be("v1"), filters=[{"type": "RequestMirror", "requestMirror": {"backendRef": be("v2")}}]), id="mirror"
        ),
        pytest.param(rule(be("v1"), filters=[{"type": "ExtensionRef"}]), id="extension-ref"),
        pytest.param(
            rule(
                be("v1"),
                matches=[exact("/x")],
                filters=[
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/y"}},
                    }
                ],
            ),
            id="prefix-rewrite-on-exact",
        ),
        pytest.param(rule(be("v1"), sessionPersistence={"sessionName": "x"}), id="session-persistence"),
    ],
)
def test_unsupported_is_rejected_with_unsupported_value(bad_rule: dict[str, Any]) -> None:
    res = build([gateway()], [route("r", bad_rule)])
    st = res.status("HTTPRoute", NS, "r")["parents"][0]["conditions"][0]
    assert (st["status"], st["reason"]) == ("False", "UnsupportedValue")
    assert all(s.routes == () for s in res.servers)
    assert any(r.ref == "HTTPRoute infra/r" for r in res.reasons)


# --- filters -----------------------------------------------------------------------------------


def redirect_route(rr: dict[str, Any], match: dict[str, Any] | None = None) -> dict[str, Any]:
    return route(
        "rd", rule(matches=[match or prefix("/")], filters=[{"type": "RequestRedirect", "requestRedirect": rr}])
    )


@pytest.mark.parametrize(
    ("rr", "port", "want"),
    [
        pytest.param({"hostname": "example.org"}, 80, ("http", "example.org", None, 302), id="hostname"),
        pytest.param({"scheme": "https"}, 80, ("https", None, None, 302), id="scheme-https-drops-port"),
        pytest.param({"scheme": "https", "port": 8443}, 80, ("https", None, 8443, 302), id="scheme-and-port"),
        pytest.param({"statusCode": 301}, 8080, ("http", None, 8080, 301), id="listener-port-kept"),
        pytest.param({"port": 80}, 8080, ("http", None, None, 302), id="well-known-port-dropped"),
    ],
)
def test_redirect_scheme_host_port(rr: dict[str, Any], port: int, want: tuple[Any, ...]) -> None:
    gw = gateway("gw", listener("http", port=port, allowedRoutes={"namespaces": {"from": "All"}}))
    server = table([gw], [redirect_route(rr)]).gateway_server_for(port, "h")
    assert server is not None
    r = server.gateway_match("/x")
    assert r is not None and r.action is not None and r.action.redirect is not None
    rd = r.action.redirect
    assert (rd.scheme, rd.hostname, rd.port, rd.status) == want


@pytest.mark.parametrize(
    ("match", "edit", "request_path", "want"),
    [
        (
            prefix("/prefix/one"),
            {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"},
            "/prefix/one/two",
            "/one/two",
        ),
        (prefix("/prefix/one"), {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"}, "/prefix/one", "/one"),
        (
            prefix("/strip-prefix"),
            {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"},
            "/strip-prefix/three",
            "/three",
        ),
        (prefix("/strip-prefix"), {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}, "/strip-prefix", "/"),
        (prefix("/full"), {"type": "ReplaceFullPath", "replaceFullPath": "/one"}, "/full/one/two", "/one"),
    ],
)
def test_path_edits(match: dict[str, Any], edit: dict[str, Any], request_path: str, want: str) -> None:
    r = route("rw", rule(be("v1"), matches=[match], filters=[{"type": "URLRewrite", "urlRewrite": {"path": edit}}]))
    server = table([gateway()], [r]).gateway_server_for(80, "h")
    assert server is not None
    got = server.gateway_match(request_path)
    assert got is not None and got.action is not None and got.action.rewrite_path is not None
    assert got.action.rewrite_path.apply(request_path) == want


# --- Ingress and Gateway on one nginx ----------------------------------------------------------


def test_ingress_keeps_its_host_on_a_shared_port() -> None:
    from test_ingress_routes import CLASS, ingress, path
    from test_ingress_routes import rule as ing_rule

    from kproxy.ingress.convert import build_routes

    ing = build_routes(
        [ingress("old", ing_rule("shop.example.com", path("/", "web", port=80)))], [svc("web")], [], [CLASS]
    )
    gw = build([gateway()], [route("r", rule(be("v1")), hostnames=["shop.example.com", "new.example.com"])])
    t = combine(ing, gw)
    assert (
        t.gateway_server_for(80, "shop.example.com") is None
        or t.gateway_server_for(80, "shop.example.com").host != "shop.example.com"
    )  # type: ignore[union-attr]
    assert resolve(t, "new.example.com", "/") == "v1"
    assert any(r.ref == "HTTPRoute infra/r" and "Ingress keeps it" in r.message for r in t.reasons)
