"""Hostile Gateway API objects cannot inject nginx configuration: every string field an HTTPRoute
or Gateway carries (hostnames, paths, header and query names and values, methods, header
modifier names and values, redirect and rewrite targets, backend and parent references,
timeouts, certificate references) is fed the Ingress hostile corpus.

For each case: the configuration parses into directives kproxy emits and nothing else, the
marker never appears outside a quoted argument, and everything outside the hostile route's own
server (and the http-level maps, splits and upstreams it alone adds) is unchanged. Per field,
all hostile values at once pass `nginx -t`.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_gateway_routes import GC, SERVICES, be, exact, gateway, listener, prefix, route, rule
from test_ingress_hostile import (
    HOSTILE_HOSTS,
    HOSTILE_PATHS,
    HOSTILE_VALUES,
    Directive,
    check_structure,
    nginx_t,
    options,
    parse,
)

from kproxy.ingress.gateway import GatewayOptions, build_gateway, combine
from kproxy.ingress.model import RoutingTable
from kproxy.ingress.nginx import NginxConfig, render

EVIL = "evil.example.com"


@pytest.fixture(scope="module")
def prefix_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kproxy-gw-hostile-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def base() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    gws = [
        gateway(
            "gw",
            listener("http", allowedRoutes={"namespaces": {"from": "All"}}),
            listener("shop", hostname="shop.example.com", port=8080, allowedRoutes={"namespaces": {"from": "All"}}),
        )
    ]
    routes = [
        route(
            "shop",
            rule(be("v1"), matches=[prefix("/")]),
            rule(be("v2"), matches=[exact("/x", headers=[{"name": "a", "value": "b"}])]),
            hostnames=["shop.example.com"],
        ),
        route("catch", rule(be("v1", weight=3), be("v2", weight=1))),
    ]
    return gws, routes


def table(extra_routes: list[dict[str, Any]] = [], extra_gateways: list[dict[str, Any]] = []) -> RoutingTable:  # noqa: B006
    gws, routes = base()
    res = build_gateway(
        [GC], gws + extra_gateways, routes + extra_routes, SERVICES, options=GatewayOptions(addresses=("192.0.2.1",))
    )
    return combine(RoutingTable(servers=()), res)


def stripped(tree: tuple[Directive, ...], base_keys: set[Any] | None) -> Any:
    """The tree minus the hostile server(s), minus http-level blocks the base does not have
    (when `base_keys` is given), minus the hash sizes a long name may raise."""

    def key(d: Directive) -> Any:
        return d.key()

    out = []
    for d in tree:
        if d.name.value == "http" and d.block is not None:
            inner = []
            for x in d.block:
                if x.name.value == "server" and x.block is not None:
                    names = [a.value for y in x.block if y.name.value == "server_name" for a in y.args]
                    if any("evil" in n for n in names):
                        continue
                if x.name.value.startswith("server_names_hash_"):
                    continue
                if (
                    base_keys is not None
                    and x.name.value in ("map", "geo", "split_clients", "upstream")
                    and key(x) not in base_keys
                ):
                    continue
                inner.append(key(x))
            out.append(("http", tuple(inner)))
        else:
            out.append(key(d))
    return tuple(out)


def http_keys(tree: tuple[Directive, ...]) -> set[Any]:
    return {x.key() for d in tree if d.name.value == "http" and d.block for x in d.block}


def assert_confined(t: RoutingTable) -> NginxConfig:
    base_tree = parse(render(table(), options()).text)
    cfg = render(t, options())
    tree = parse(cfg.text)
    check_structure(tree)
    assert stripped(tree, http_keys(base_tree)) == stripped(base_tree, None)
    return cfg


def evil_route(r: dict[str, Any]) -> dict[str, Any]:
    r["metadata"]["namespace"] = "evil"
    r["metadata"]["name"] = "hostile"
    r["spec"]["parentRefs"] = [{"name": "gw", "namespace": "infra", "sectionName": "http"}]
    r["spec"].setdefault("hostnames", [EVIL])
    return r


def with_filter(kind: str, body: dict[str, Any], match: dict[str, Any] | None = None) -> dict[str, Any]:
    key = kind[0].lower() + kind[1:]
    return rule(be("v1"), matches=[match or prefix("/p")], filters=[{"type": kind, key: body}])


# Each field: a function from a hostile string to the hostile route (or gateway).
ROUTE_FIELDS: dict[str, Callable[[str], dict[str, Any]]] = {
    "hostnames": lambda v: route("x", rule(be("v1")), hostnames=[v]),
    "path.exact": lambda v: route("x", rule(be("v1"), matches=[exact(v)])),
    "path.prefix": lambda v: route("x", rule(be("v1"), matches=[prefix(v)])),
    "header.name": lambda v: route("x", rule(be("v1"), matches=[prefix("/", headers=[{"name": v, "value": "x"}])])),
    "header.value": lambda v: route("x", rule(be("v1"), matches=[prefix("/", headers=[{"name": "x-a", "value": v}])])),
    "query.name": lambda v: route("x", rule(be("v1"), matches=[prefix("/", queryParams=[{"name": v, "value": "x"}])])),
    "query.value": lambda v: route("x", rule(be("v1"), matches=[prefix("/", queryParams=[{"name": "q", "value": v}])])),
    "method": lambda v: route("x", rule(be("v1"), matches=[prefix("/", method=v)])),
    "reqheader.set.name": lambda v: route(
        "x", with_filter("RequestHeaderModifier", {"set": [{"name": v, "value": "x"}]})
    ),
    "reqheader.set.value": lambda v: route(
        "x", with_filter("RequestHeaderModifier", {"set": [{"name": "X-A", "value": v}]})
    ),
    "reqheader.add.value": lambda v: route(
        "x", with_filter("RequestHeaderModifier", {"add": [{"name": "X-A", "value": v}]})
    ),
    "reqheader.remove": lambda v: route("x", with_filter("RequestHeaderModifier", {"remove": [v]})),
    "respheader.set.name": lambda v: route(
        "x", with_filter("ResponseHeaderModifier", {"set": [{"name": v, "value": "x"}]})
    ),
    "respheader.add.value": lambda v: route(
        "x", with_filter("ResponseHeaderModifier", {"add": [{"name": "X-A", "value": v}]})
    ),
    "redirect.hostname": lambda v: route("x", with_filter("RequestRedirect", {"hostname": v})),
    "redirect.scheme": lambda v: route("x", with_filter("RequestRedirect", {"scheme": v})),
    "redirect.fullpath": lambda v: route(
        "x", with_filter("RequestRedirect", {"path": {"type": "ReplaceFullPath", "replaceFullPath": v}})
    ),
    "redirect.prefix": lambda v: route(
        "x", with_filter("RequestRedirect", {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": v}})
    ),
    "rewrite.hostname": lambda v: route("x", with_filter("URLRewrite", {"hostname": v})),
    "rewrite.fullpath": lambda v: route(
        "x", with_filter("URLRewrite", {"path": {"type": "ReplaceFullPath", "replaceFullPath": v}})
    ),
    "rewrite.prefix": lambda v: route(
        "x", with_filter("URLRewrite", {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": v}})
    ),
    "backend.name": lambda v: route("x", rule(be(v))),
    "backend.namespace": lambda v: route("x", rule(be("v1", namespace=v))),
    "backend.kind": lambda v: route("x", rule(be("v1", kind=v))),
    "timeout": lambda v: route("x", rule(be("v1"), timeouts={"request": v})),
    "parent.section": lambda v: route("x", rule(be("v1"))),
}
CORPUS = HOSTILE_VALUES + HOSTILE_PATHS + HOSTILE_HOSTS


def hostile_route(field: str, value: str) -> dict[str, Any]:
    r = evil_route(ROUTE_FIELDS[field](value))
    if field == "parent.section":
        r["spec"]["parentRefs"][0]["sectionName"] = value
    return r


@pytest.mark.parametrize("value", CORPUS, ids=[f"v{i:02d}" for i in range(len(CORPUS))])
@pytest.mark.parametrize("field", sorted(ROUTE_FIELDS))
def test_hostile_route_field_is_confined(field: str, value: str) -> None:
    assert_confined(table([hostile_route(field, value)]))


@pytest.mark.parametrize("field", sorted(ROUTE_FIELDS))
def test_all_hostile_values_of_a_field_at_once_pass_nginx_t(field: str, prefix_dir: Path) -> None:
    routes = []
    for i, value in enumerate(CORPUS):
        r = hostile_route(field, value)
        r["metadata"]["name"] = f"hostile-{i}"
        if field != "hostnames":
            r["spec"]["hostnames"] = [f"evil{i}.example.com"]
        routes.append(r)
    t = table(routes)
    cfg = render(t, options(prefix_dir))
    check_structure(parse(cfg.text))
    nginx_t(cfg, prefix_dir)


GATEWAY_FIELDS: dict[str, Callable[[str], dict[str, Any]]] = {
    "listener.hostname": lambda v: gateway("evil", listener("l", hostname=v, port=9090), ns="evil"),
    "listener.name": lambda v: gateway("evil", listener(v, hostname=EVIL, port=9090), ns="evil"),
    "certificate.name": lambda v: gateway(
        "evil",
        listener("l", hostname=EVIL, port=9443, protocol="HTTPS", tls={"certificateRefs": [{"name": v}]}),
        ns="evil",
    ),
    "address": lambda v: gateway("evil", listener("l", hostname=EVIL, port=9090), ns="evil", addresses=[{"value": v}]),
}


@pytest.mark.parametrize("value", CORPUS, ids=[f"v{i:02d}" for i in range(len(CORPUS))])
@pytest.mark.parametrize("field", sorted(GATEWAY_FIELDS))
def test_hostile_gateway_field_is_confined(field: str, value: str) -> None:
    gw = GATEWAY_FIELDS[field](value)
    r = evil_route(route("x", rule(be("v1"))))
    r["spec"]["parentRefs"] = [{"name": "evil", "namespace": "evil"}]
    r["spec"].pop("hostnames")
    t = table([r], [copy.deepcopy(gw)])
    cfg = render(t, options())
    tree = parse(cfg.text)
    check_structure(tree)
    # Its listener ports are its own: every other server is as without it.
    assert tuple(s for s in t.servers if s.port not in (9090, 9443)) == table().servers


@pytest.mark.parametrize("field", sorted(GATEWAY_FIELDS))
def test_all_hostile_gateways_of_a_field_at_once_pass_nginx_t(field: str, prefix_dir: Path) -> None:
    gws = []
    for i, value in enumerate(CORPUS):
        gw = copy.deepcopy(GATEWAY_FIELDS[field](value))
        gw["metadata"]["name"] = f"evil-{i}"
        gws.append(gw)
    cfg = render(table([], gws), options(prefix_dir))
    check_structure(parse(cfg.text))
    nginx_t(cfg, prefix_dir)
