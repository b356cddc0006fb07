"""Ingress → routes: the seed's path and host tables row by row, class selection, conflicts,
backends, default backends, TLS and annotation failure modes (pure, no nginx)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from kproxy.convert import convert_service
from kproxy.ingress.convert import ClassOptions, build_routes, is_ours, parse_ingress_classes
from kproxy.ingress.model import PathType, RoutingTable
from kproxy.model import Protocol, Service, ServicePort, ServicePortName, ServiceType

# --- builders (keyword overrides on a valid default) -----------------------------------------

CLASS = {"metadata": {"name": "kproxy"}, "spec": {"controller": "kproxy.io/ingress-controller"}}
P = "nginx.ingress.kubernetes.io/"


def svc(
    name: str,
    *,
    ns: str = "default",
    ports: tuple[tuple[str, int, Protocol], ...] = (("http", 80, Protocol.TCP),),
    ip: str = "172.30.0.10",
    type: ServiceType = ServiceType.CLUSTER_IP,
) -> Service:
    return Service(
        ns,
        name,
        type,
        tuple(ServicePort(ServicePortName(ns, name, pn, proto), num, cluster_ips=(ip,)) for pn, num, proto in ports),
    )


def backend(service: str, port: int | str = 80) -> dict[str, Any]:
    key = "number" if isinstance(port, int) else "name"
    return {"service": {"name": service, "port": {key: port}}}


def path(p: str | None, service: str, *, type: str = "Prefix", port: int | str = 80) -> dict[str, Any]:
    out: dict[str, Any] = {"pathType": type, "backend": backend(service, port)}
    if p is not None:
        out["path"] = p
    return out


def rule(host: str | None, *paths: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"http": {"paths": list(paths)}}
    if host is not None:
        out["host"] = host
    return out


def ingress(
    name: str,
    *rules: dict[str, Any],
    ns: str = "default",
    ann: dict[str, str] | None = None,
    created: str = "2024-01-01T00:00:00Z",
    cls: str | None = "kproxy",
    default_backend: dict[str, Any] | None = None,
    tls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if cls is not None:
        spec["ingressClassName"] = cls
    if rules:
        spec["rules"] = list(rules)
    if default_backend is not None:
        spec["defaultBackend"] = default_backend
    if tls is not None:
        spec["tls"] = tls
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created, "annotations": ann or {}},
        "spec": spec,
    }


def fake_tls_secret(name: str, ns: str = "default") -> dict[str, Any]:
    """Structurally valid PEM (a DER SEQUENCE); enough for convert, not for nginx."""
    der = base64.b64encode(bytes([0x30, 0x03, 0x02, 0x01, 0x00])).decode()
    crt = f"-----BEGIN CERTIFICATE-----\n{der}\n-----END CERTIFICATE-----\n"
    key = f"-----BEGIN PRIVATE KEY-----\n{der}\n-----END PRIVATE KEY-----\n"
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "data": {
            "tls.crt": base64.b64encode(crt.encode()).decode(),
            "tls.key": base64.b64encode(key.encode()).decode(),
        },
    }


SERVICES = [svc(f"p{i}") for i in range(3)] + [svc("s1"), svc("s2"), svc("rx")]


def table(*ings: dict[str, Any], services: list[Service] | None = None, **kw: Any) -> RoutingTable:
    kw.setdefault("ingress_classes", [CLASS])
    return build_routes(list(ings), SERVICES if services is None else services, **kw)


def reasons_of(t: RoutingTable, name: str) -> list[str]:
    return [f"{r.field}: {r.message}" for r in t.reasons if r.ref == f"Ingress default/{name}"]


# --- the seed's path table, row by row ---------------------------------------------------------
# Each row: the Ingress paths (type, path) → backends p0, p1, p2 in order; the request paths; the
# expected backend index (None: no path matches → the default backend, here the controller's 404).

SEED_PATH_ROWS = [
    ("row01-Prefix-root-matches-all-paths", [("Prefix", "/")], ["/", "/foo", "/aaa/bbb/ccc", "/x.y"], 0),
    ("row02-Exact-foo-matches-foo", [("Exact", "/foo")], ["/foo"], 0),
    ("row03-Exact-foo-not-bar", [("Exact", "/foo")], ["/bar"], None),
    ("row04-Exact-foo-not-foo-slash", [("Exact", "/foo")], ["/foo/"], None),
    ("row05-Exact-foo-slash-not-foo", [("Exact", "/foo/")], ["/foo"], None),
    ("row06-Prefix-foo-matches-foo-and-foo-slash", [("Prefix", "/foo")], ["/foo", "/foo/"], 0),
    ("row07-Prefix-foo-slash-matches-foo-and-foo-slash", [("Prefix", "/foo/")], ["/foo", "/foo/"], 0),
    ("row08-Prefix-aaa-bb-not-aaa-bbb", [("Prefix", "/aaa/bb")], ["/aaa/bbb"], None),
    ("row09-Prefix-aaa-bbb-matches-aaa-bbb", [("Prefix", "/aaa/bbb")], ["/aaa/bbb"], 0),
    ("row10-Prefix-aaa-bbb-slash-ignores-trailing-slash", [("Prefix", "/aaa/bbb/")], ["/aaa/bbb"], 0),
    ("row11-Prefix-aaa-bbb-matches-trailing-slash", [("Prefix", "/aaa/bbb")], ["/aaa/bbb/"], 0),
    ("row12-Prefix-aaa-bbb-matches-subpath", [("Prefix", "/aaa/bbb")], ["/aaa/bbb/ccc"], 0),
    ("row13-Prefix-aaa-bbb-not-string-prefix", [("Prefix", "/aaa/bbb")], ["/aaa/bbbxyz"], None),
    ("row14-Prefix-root-and-aaa-picks-aaa", [("Prefix", "/"), ("Prefix", "/aaa")], ["/aaa/ccc"], 1),
    (
        "row15-Prefix-root-aaa-aaa-bbb-picks-aaa-bbb",
        [("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
        ["/aaa/bbb"],
        2,
    ),
    (
        "row16-Prefix-root-aaa-aaa-bbb-picks-root",
        [("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")],
        ["/ccc"],
        0,
    ),
    ("row17-Prefix-aaa-not-ccc-default-backend", [("Prefix", "/aaa")], ["/ccc"], None),
    ("row18-mixed-Prefix-and-Exact-foo-prefers-Exact", [("Prefix", "/foo"), ("Exact", "/foo")], ["/foo"], 1),
]


def seed_cases() -> list[Any]:
    cases = []
    for case_id, paths, requests, want in SEED_PATH_ROWS:
        for req in requests:
            cases.append(pytest.param(paths, req, want, id=f"{case_id}[{req}]"))
    return cases


def seed_row_ingresses(host: str, paths: list[tuple[str, str]], regex_host: bool) -> list[dict[str, Any]]:
    ings = [ingress("row", rule(host, *(path(p, f"p{i}", type=t) for i, (t, p) in enumerate(paths))))]
    if regex_host:
        # Another Ingress turns the host into regex locations; Exact/Prefix must keep their meaning.
        ings.append(
            ingress(
                "rx",
                rule(host, path("/zzz[0-9]+", "rx", type="ImplementationSpecific")),
                ann={P + "use-regex": "true"},
                created="2024-02-01T00:00:00Z",
            )
        )
    return ings


@pytest.mark.parametrize("regex_host", [False, True], ids=["prefix-locations", "regex-locations"])
@pytest.mark.parametrize(("paths", "request_path", "want"), seed_cases())
def test_seed_path_table(paths: list[tuple[str, str]], request_path: str, want: int | None, regex_host: bool) -> None:
    t = table(*seed_row_ingresses("paths.example.com", paths, regex_host))
    assert not t.reasons
    assert t.match("paths.example.com", request_path).target == ("404" if want is None else f"p{want}:80")


def test_seed_path_table_mixed_row_still_serves_prefix_subpaths() -> None:
    t = table(ingress("a", rule("h.example.com", path("/foo", "p0"), path("/foo", "p1", type="Exact"))))
    assert t.match("h.example.com", "/foo/x").target == "p0:80"


def test_exact_and_prefix_of_different_ingresses_are_not_a_conflict() -> None:
    t = table(
        ingress("old", rule("h.example.com", path("/foo", "p0"))),
        ingress("new", rule("h.example.com", path("/foo", "p1", type="Exact")), created="2025-01-01T00:00:00Z"),
    )
    assert not t.reasons
    assert t.match("h.example.com", "/foo").target == "p1:80"  # Exact wins the tie, whatever its age
    assert t.match("h.example.com", "/foo/bar").target == "p0:80"


def test_implementation_specific_is_a_plain_nginx_prefix() -> None:
    t = table(ingress("a", rule("h.example.com", path("/foo", "p0", type="ImplementationSpecific"))))
    assert t.match("h.example.com", "/foobar").target == "p0:80"
    assert t.match("h.example.com", "/fo").target == "404"


def test_longest_match_first_order_in_server_routes() -> None:
    t = table(
        ingress(
            "a",
            rule(
                "h.example.com",
                path("/", "p0"),
                path("/aaa", "p1"),
                path("/aaa", "p2", type="Exact"),
                path("/aaa/bbb", "p0"),
            ),
        )
    )
    server = t.server("h.example.com")
    assert server is not None
    assert [(r.path, r.path_type) for r in server.routes] == [
        ("/aaa/bbb", PathType.PREFIX),
        ("/aaa", PathType.EXACT),
        ("/aaa", PathType.PREFIX),
        ("/", PathType.PREFIX),
    ]


# --- the seed's host wildcard table --------------------------------------------------------


@pytest.mark.parametrize(
    ("host_header", "want"),
    [
        pytest.param("bar.foo.com", "p0:80", id="wildcard-row1-bar.foo.com-matches-by-suffix"),
        pytest.param("baz.bar.foo.com", "404", id="wildcard-row2-baz.bar.foo.com-no-match-one-label-only"),
        pytest.param("foo.com", "404", id="wildcard-row3-foo.com-no-match-one-label-only"),
    ],
)
def test_seed_host_wildcard_table(host_header: str, want: str) -> None:
    t = table(ingress("w", rule("*.foo.com", path("/", "p0"))))
    assert t.match(host_header, "/").target == want


def test_seed_wildcard_example_both_rules() -> None:
    """The seed's ingress-wildcard-host example: an exact host beside a wildcard host."""
    t = table(ingress("w", rule("foo.bar.com", path("/bar", "p0")), rule("*.foo.com", path("/foo", "p1"))))
    assert t.match("foo.bar.com", "/bar").target == "p0:80"
    assert t.match("x.foo.com", "/foo").target == "p1:80"
    assert t.match("x.foo.com", "/bar").target == "404"
    assert t.match("FOO.bar.com:8080", "/bar").target == "p0:80"  # case and port do not matter


def test_exact_host_beats_wildcard() -> None:
    t = table(ingress("w", rule("*.foo.com", path("/", "p0")), rule("bar.foo.com", path("/", "p1"))))
    assert t.match("bar.foo.com", "/").target == "p1:80"
    assert t.match("qux.foo.com", "/").target == "p0:80"


@pytest.mark.parametrize(
    "host",
    [
        "*",
        "*.",
        "foo.*.com",
        "*.*.foo.com",
        "Foo.com",
        "foo_bar.com",
        "1.2.3.4",
        "foo..com",
        "-a.com",
        "a" * 64 + ".com",
    ],
)
def test_invalid_hosts_drop_the_rule_with_a_reason(host: str) -> None:
    t = table(ingress("bad", rule(host, path("/", "p0")), rule("ok.example.com", path("/", "p1"))))
    assert any("spec.rules[0].host" in r for r in reasons_of(t, "bad"))
    assert t.match("ok.example.com", "/").target == "p1:80"
    assert [s.host for s in t.servers] == ["", "ok.example.com"]


def test_hostless_rule_goes_to_the_catch_all_server() -> None:
    t = table(ingress("a", rule(None, path("/x", "p0"))))
    assert t.match("anything.example.com", "/x").target == "p0:80"
    assert t.match("", "/x").target == "p0:80"


# --- class selection -----------------------------------------------------------------------

OTHER = {"metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}}


def default_class(c: dict[str, Any]) -> dict[str, Any]:
    out = {"metadata": dict(c["metadata"]), "spec": c["spec"]}
    out["metadata"]["annotations"] = {"ingressclass.kubernetes.io/is-default-class": "true"}
    return out


@pytest.mark.parametrize(
    ("ing", "classes", "opts", "ours"),
    [
        pytest.param(ingress("a"), [CLASS, OTHER], ClassOptions(), True, id="ingressClassName-of-our-controller"),
        pytest.param(ingress("a", cls="nginx"), [CLASS, OTHER], ClassOptions(), False, id="ingressClassName-other"),
        pytest.param(ingress("a", cls="missing"), [CLASS], ClassOptions(), False, id="ingressClassName-unknown"),
        pytest.param(ingress("a", cls="edge"), [], ClassOptions(class_name="edge"), True, id="configured-class-name"),
        pytest.param(
            ingress("a", cls=None, ann={"kubernetes.io/ingress.class": "kproxy"}),
            [CLASS],
            ClassOptions(),
            True,
            id="legacy-annotation-ours",
        ),
        pytest.param(
            ingress("a", cls=None, ann={"kubernetes.io/ingress.class": "nginx"}),
            [CLASS, OTHER],
            ClassOptions(),
            False,
            id="legacy-annotation-other",
        ),
        pytest.param(
            ingress("a", cls=None, ann={"kubernetes.io/ingress.class": "edge"}),
            [],
            ClassOptions(class_name="edge"),
            True,
            id="legacy-annotation-configured-name",
        ),
        pytest.param(ingress("a", cls=None), [default_class(CLASS), OTHER], ClassOptions(), True, id="default-ours"),
        pytest.param(ingress("a", cls=None), [CLASS, default_class(OTHER)], ClassOptions(), False, id="default-other"),
        pytest.param(ingress("a", cls=None), [CLASS, OTHER], ClassOptions(), False, id="no-class-no-default"),
        pytest.param(
            ingress("a", cls=None),
            [CLASS],
            ClassOptions(watch_without_class=True),
            True,
            id="watch-without-class",
        ),
        pytest.param(
            ingress("a", cls=None),
            [default_class(CLASS), default_class(OTHER)],
            ClassOptions(),
            False,
            id="two-defaults-disagree-never-double-served",
        ),
        pytest.param(
            ingress("a"),
            [{"metadata": {"name": "kproxy"}, "spec": {"controller": "example.com/x"}}],
            ClassOptions(controller="example.com/x"),
            True,
            id="configured-controller-value",
        ),
    ],
)
def test_class_selection(ing: dict[str, Any], classes: list[dict[str, Any]], opts: ClassOptions, ours: bool) -> None:
    assert is_ours(ing, parse_ingress_classes(classes), opts) is ours
    ing["spec"]["rules"] = [rule("h.example.com", path("/", "p0"))]
    t = build_routes([ing], SERVICES, ingress_classes=classes, options=opts)
    assert bool(t.ours) is ours
    assert (t.server("h.example.com") is not None) is ours
    assert not t.reasons  # Ingresses of other classes are not ours to complain about


# --- conflicts -----------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["input-old-first", "input-new-first"])
def test_oldest_ingress_wins_the_same_host_and_path(reverse: bool) -> None:
    old = ingress("old", rule("h.example.com", path("/foo", "p0")), created="2023-05-01T00:00:00Z")
    new = ingress("new", rule("h.example.com", path("/foo/", "p1")), created="2024-05-01T00:00:00Z")
    t = table(*([new, old] if reverse else [old, new]))
    assert t.match("h.example.com", "/foo/x").target == "p0:80"
    assert any("already served by the older Ingress default/old" in r for r in reasons_of(t, "new"))
    assert not reasons_of(t, "old")


def test_same_age_breaks_tie_on_namespace_then_name() -> None:
    a = ingress("a", rule("h.example.com", path("/x", "p0")), ns="zzz")
    b = ingress("b", rule("h.example.com", path("/x", "p1")), ns="aaa")
    t = build_routes([a, b], [svc("p0", ns="zzz"), svc("p1", ns="aaa")], ingress_classes=[CLASS])
    assert t.match("h.example.com", "/x").target == "p1:80"


def test_implementation_specific_slash_collides_with_prefix_of_the_same_location() -> None:
    old = ingress("old", rule("h.example.com", path("/foo", "p0")), created="2023-01-01T00:00:00Z")
    new = ingress("new", rule("h.example.com", path("/foo/", "p1", type="ImplementationSpecific")))
    t = table(new, old)
    assert t.match("h.example.com", "/foo/x").target == "p0:80"
    assert reasons_of(t, "new")


def test_duplicate_path_inside_one_ingress_keeps_the_first() -> None:
    t = table(ingress("a", rule("h.example.com", path("/x", "p0"), path("/x", "p1"))))
    assert t.match("h.example.com", "/x").target == "p0:80"
    assert any("duplicate" in r for r in reasons_of(t, "a"))


def test_one_bad_ingress_never_stops_the_others() -> None:
    bad = ingress("bad")
    bad["spec"].update(
        rules=["x", {"host": 5}, {"host": "b.example.com", "http": {"paths": "no"}}],
        tls="y",
        defaultBackend=3,
    )
    classless = ingress("classless", cls=None)
    classless["spec"] = "garbage"  # no class at all: not ours, not reported
    worse = {
        "metadata": {"name": "worse", "namespace": "default"},
        "spec": {"ingressClassName": "kproxy", "rules": 7},
    }
    t = table(bad, worse, classless, ingress("good", rule("h.example.com", path("/", "p0"))))
    assert t.match("h.example.com", "/").target == "p0:80"
    assert len(reasons_of(t, "bad")) == 5 and reasons_of(t, "worse")
    assert not reasons_of(t, "classless")
    assert {r.name for r in t.ours} == {"bad", "worse", "good"}


# --- backends ------------------------------------------------------------------------------


def test_service_port_by_number_and_by_name() -> None:
    services = [svc("web", ports=(("http", 80, Protocol.TCP), ("admin", 9000, Protocol.TCP)))]
    t = table(
        ingress("a", rule("h.example.com", path("/n", "web", port=9000), path("/m", "web", port="admin"))),
        services=services,
    )
    by_number = t.match("h.example.com", "/n").route
    by_name = t.match("h.example.com", "/m").route
    assert by_number is not None and by_name is not None
    assert by_number.backend.service_port == by_name.backend.service_port == services[0].ports[1]


def test_port_by_name_through_convert_service() -> None:
    raw = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "172.30.0.20",
            "clusterIPs": ["172.30.0.20"],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 80}],
        },
    }
    service = convert_service(raw)
    assert service is not None
    t = table(ingress("a", rule("h.example.com", path("/", "web", port="http"))), services=[service])
    m = t.match("h.example.com", "/")
    assert m.target == "web:http"
    assert m.route is not None and m.route.backend.service_port is not None
    assert m.route.backend.service_port.port == 8080


@pytest.mark.parametrize(
    ("services", "port", "reason"),
    [
        pytest.param([], 80, "not found", id="missing-service"),
        pytest.param([svc("web")], 81, "no TCP port 81", id="missing-port-number"),
        pytest.param([svc("web")], "grpc", "no TCP port grpc", id="missing-port-name"),
        pytest.param([svc("web", ports=(("dns", 80, Protocol.UDP),))], 80, "no TCP port 80", id="udp-only"),
        pytest.param([svc("web", type=ServiceType.EXTERNAL_NAME)], 80, "ExternalName", id="external-name"),
    ],
)
def test_unresolvable_backend_answers_503_with_a_reason(services: list[Service], port: int | str, reason: str) -> None:
    t = table(ingress("a", rule("h.example.com", path("/", "web", port=port))), services=services)
    assert t.match("h.example.com", "/").target == "503"
    assert any(reason in r and "answers 503" in r for r in reasons_of(t, "a"))


def test_resource_backend_is_unsupported_and_answers_503() -> None:
    ing = ingress(
        "res",
        rule(
            None,
            {
                "path": "/icons",
                "pathType": "ImplementationSpecific",
                "backend": {
                    "resource": {
                        "apiGroup": "k8s.example.com",
                        "kind": "StorageBucket",
                        "name": "icon-assets",
                    }
                },
            },
        ),
    )
    t = table(ing)
    assert t.match("x", "/icons").target == "503"
    assert any("Resource backends" in r and "not supported" in r for r in reasons_of(t, "res"))


@pytest.mark.parametrize(
    ("bad_path", "type"),
    [
        ("foo", "Prefix"),
        ("/foo bar", "Prefix"),
        ("/a/../b", "Exact"),
        ("/a//b", "Prefix"),
        ("/foo;", "Exact"),
        ("/foo(.*)", "Prefix"),
        ("/foo(.*)", "ImplementationSpecific"),  # regex text without use-regex
        ("/x", "Regex"),
    ],
)
def test_invalid_path_drops_only_that_path(bad_path: str, type: str) -> None:
    t = table(ingress("a", rule("h.example.com", path(bad_path, "p0", type=type), path("/ok", "p1"))))
    assert any("paths[0]" in r for r in reasons_of(t, "a"))
    assert t.match("h.example.com", "/ok").target == "p1:80"


def test_missing_path_type_is_rejected() -> None:
    p = path("/x", "p0")
    del p["pathType"]
    t = table(ingress("a", rule("h.example.com", p)))
    assert any("pathType" in r for r in reasons_of(t, "a"))


# --- default backends ----------------------------------------------------------------------


def test_ingress_without_rules_sends_everything_to_its_default_backend() -> None:
    t = table(ingress("test-ingress", default_backend=backend("p0")))
    assert t.match("any.example.com", "/whatever").target == "p0:80"


def test_default_backend_serves_unmatched_paths_of_its_hosts_only() -> None:
    t = table(
        ingress("a", rule("h.example.com", path("/foo", "p1")), default_backend=backend("p0")),
        ingress("b", rule("other.example.com", path("/foo", "p2"))),
    )
    assert t.match("h.example.com", "/foo").target == "p1:80"
    assert t.match("h.example.com", "/nope").target == "p0:80"
    assert t.match("other.example.com", "/nope").target == "404"
    assert t.match("unknown.example.com", "/").target == "404"  # the controller's default backend


def test_oldest_default_backend_wins_the_catch_all() -> None:
    t = table(
        ingress("new", default_backend=backend("p1"), created="2025-01-01T00:00:00Z"),
        ingress("old", default_backend=backend("p0"), created="2020-01-01T00:00:00Z"),
    )
    assert t.match("x", "/").target == "p0:80"
    assert any("defaultBackend" in r for r in reasons_of(t, "new"))


def test_default_backend_of_a_fail_closed_ingress_also_fails_closed() -> None:
    t = table(ingress("a", default_backend=backend("p0"), ann={P + "auth-type": "basic"}))
    assert t.match("x", "/").target == "503"


# --- TLS -----------------------------------------------------------------------------------


def test_tls_host_gets_the_certificate_of_its_secret() -> None:
    t = table(
        ingress("a", rule("h.example.com", path("/", "p0")), tls=[{"hosts": ["h.example.com"], "secretName": "c"}]),
        secrets=[fake_tls_secret("c")],
    )
    server = t.server("h.example.com")
    assert server is not None and server.tls is not None and server.tls.cert is not None
    assert server.tls.cert.cert_pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert not t.reasons


@pytest.mark.parametrize(
    ("secrets", "why"),
    [
        pytest.param([], "not found", id="missing"),
        pytest.param([{**fake_tls_secret("c"), "type": "Opaque"}], "kubernetes.io/tls", id="wrong-type"),
        pytest.param([{**fake_tls_secret("c"), "data": {"tls.crt": "!!!", "tls.key": "x"}}], "base64", id="not-base64"),
        pytest.param(
            [
                {
                    **fake_tls_secret("c"),
                    "data": {"tls.crt": base64.b64encode(b"hello").decode(), "tls.key": "eA=="},
                }
            ],
            "no PEM",
            id="not-pem",
        ),
    ],
)
def test_unusable_tls_secret_keeps_https_without_a_certificate(secrets: list[dict[str, Any]], why: str) -> None:
    t = table(
        ingress("a", rule("h.example.com", path("/", "p0")), tls=[{"hosts": ["h.example.com"], "secretName": "c"}]),
        secrets=secrets,
    )
    server = t.server("h.example.com")
    assert server is not None and server.tls is not None
    assert server.tls.cert is None and why in server.tls.reason
    assert any(why in r for r in reasons_of(t, "a"))


def test_tls_conflict_oldest_wins_and_tls_without_rules_is_reported() -> None:
    t = table(
        ingress(
            "old",
            rule("h.example.com", path("/", "p0")),
            tls=[{"hosts": ["h.example.com"], "secretName": "c1"}],
            created="2020-01-01T00:00:00Z",
        ),
        ingress("new", tls=[{"hosts": ["h.example.com", "lonely.example.com"], "secretName": "c2"}]),
        secrets=[fake_tls_secret("c1"), fake_tls_secret("c2")],
    )
    server = t.server("h.example.com")
    assert server is not None and server.tls is not None and server.tls.secret_name == "c1"
    assert any("already uses Secret default/c1" in r for r in reasons_of(t, "new"))
    assert any("lonely.example.com has no rules" in r for r in reasons_of(t, "new"))


# --- annotations: failure modes ------------------------------------------------------------


def test_unknown_and_unsupported_annotations_are_reported_not_ignored_silently() -> None:
    t = table(
        ingress(
            "a",
            rule("h.example.com", path("/", "p0")),
            ann={P + "frobnicate": "yes", P + "affinity": "cookie", "example.com/other": "x"},
        )
    )
    rs = reasons_of(t, "a")
    assert any("frobnicate" in r and "unknown" in r for r in rs)
    assert any("affinity" in r and "not supported" in r for r in rs)
    assert not any("example.com/other" in r for r in rs)  # not our prefix
    assert t.match("h.example.com", "/").target == "p0:80"


def test_invalid_ordinary_annotation_is_ignored_with_a_reason() -> None:
    t = table(ingress("a", rule("h.example.com", path("/", "p0")), ann={P + "limit-rps": "lots"}))
    assert t.match("h.example.com", "/").target == "p0:80"
    route = t.match("h.example.com", "/").route
    assert route is not None and route.options.rate_limit is None
    assert any("limit-rps" in r and "ignored" in r for r in reasons_of(t, "a"))


@pytest.mark.parametrize(
    "ann",
    [
        pytest.param({P + "configuration-snippet": "more_set_headers x;"}, id="snippet"),
        pytest.param({P + "server-snippet": "allow all;"}, id="server-snippet"),
        pytest.param({P + "whitelist-source-range": "10.0.0.0/8, not-a-cidr"}, id="bad-allow-list"),
        pytest.param({P + "auth-type": "basic", P + "auth-secret": "missing"}, id="auth-secret-missing"),
        pytest.param({P + "auth-type": "digest", P + "auth-secret": "htpasswd"}, id="auth-digest-unsupported"),
        pytest.param({P + "auth-type": "basic", P + "auth-secret": "other/htpasswd"}, id="auth-secret-other-ns"),
        pytest.param({P + "auth-secret": "htpasswd"}, id="auth-secret-without-type"),
        pytest.param({P + "auth-url": "https://auth.example.com/"}, id="auth-url-unsupported"),
        pytest.param({P + "denylist-source-range": "10.0.0.0/8"}, id="denylist-unsupported"),
    ],
)
def test_security_annotations_that_cannot_be_honoured_fail_closed(ann: dict[str, str]) -> None:
    htpasswd = {
        "metadata": {"name": "htpasswd", "namespace": "other"},
        "data": {"auth": base64.b64encode(b"u:$apr1$x$y\n").decode()},
    }
    t = table(ingress("a", rule("h.example.com", path("/", "p0"), path("/x", "p1")), ann=ann), secrets=[htpasswd])
    assert t.match("h.example.com", "/").target == "503"
    assert t.match("h.example.com", "/x").target == "503"
    assert any("answers 503" in r for r in reasons_of(t, "a"))


def test_valid_basic_auth_is_kept() -> None:
    secret = {
        "metadata": {"name": "htpasswd", "namespace": "default"},
        "data": {"auth": base64.b64encode(b"alice:$apr1$abc$def\n\nbob:{SHA}xyz=\n").decode()},
    }
    t = table(
        ingress(
            "a",
            rule("h.example.com", path("/", "p0")),
            ann={P + "auth-type": "basic", P + "auth-secret": "htpasswd", P + "auth-realm": "Staff only"},
        ),
        secrets=[secret],
    )
    route = t.match("h.example.com", "/").route
    assert route is not None and route.options.auth is not None
    assert route.options.auth.htpasswd == "alice:$apr1$abc$def\nbob:{SHA}xyz=\n"
    assert route.options.auth.realm == "Staff only"
    assert not t.reasons


# --- canary --------------------------------------------------------------------------------


def test_canary_adds_an_alternative_backend_to_the_main_path() -> None:
    main = ingress("main", rule("h.example.com", path("/", "p0")), created="2020-01-01T00:00:00Z")
    canary = ingress(
        "canary",
        rule("h.example.com", path("/", "p1")),
        ann={P + "canary": "true", P + "canary-by-header": "X-Canary", P + "canary-weight": "10"},
    )
    t = table(canary, main)
    server = t.server("h.example.com")
    assert server is not None and len(server.routes) == 1
    route = server.routes[0]
    assert route.canary is not None and route.canary.backend.ref.service == "p1"
    assert route.canary.policy.header == "X-Canary" and route.canary.policy.weight == 10
    assert not t.reasons


def test_canary_without_main_and_second_canary_are_reported() -> None:
    main = ingress("main", rule("h.example.com", path("/", "p0")), created="2020-01-01T00:00:00Z")
    c1 = ingress(
        "c1",
        rule("h.example.com", path("/", "p1")),
        ann={P + "canary": "true"},
        created="2021-01-01T00:00:00Z",
    )
    c2 = ingress("c2", rule("h.example.com", path("/", "p2"), path("/other", "p2")), ann={P + "canary": "true"})
    t = table(main, c1, c2)
    rs = reasons_of(t, "c2")
    assert any("already has the canary of the older Ingress default/c1" in r for r in rs)
    assert any("no main Ingress" in r for r in rs)
    server = t.server("h.example.com")
    assert server is not None and [r.path for r in server.routes] == ["/"]  # a canary never adds a path
