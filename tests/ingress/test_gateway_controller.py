"""The controller with Gateway API on, against the fake API server and a real nginx.

Gateway listener port 80 is served on the harness's HTTP port. Checks: HTTPRoutes are served,
statuses are written (and written again only when they change), and a change of a route
reloads nginx without dropping a request that is in flight.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable
from typing import Any

from ingresskit import LOOPBACK, wait_until
from test_controller import Harness, harness, node  # noqa: F401  (harness is a fixture)

G = "gateway.networking.k8s.io/v1"


def objects(h: Harness) -> None:
    h.api.create(
        "gatewayclasses",
        {
            "apiVersion": G,
            "kind": "GatewayClass",
            "metadata": {"name": "kproxy"},
            "spec": {"controllerName": "kproxy.io/gateway-controller"},
        },
    )
    h.api.create(
        "gateways",
        {
            "apiVersion": G,
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": "default"},
            "spec": {"gatewayClassName": "kproxy", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
        },
    )


def httproute(h: Harness, backend: str) -> dict[str, Any]:
    return {
        "apiVersion": G,
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["gw.test"],
            "rules": [{"backendRefs": [{"name": backend, "port": h.port_of(backend)}]}],
        },
    }


def make(harness: Callable[..., Harness]) -> Harness:  # noqa: F811
    h = harness(gateway_controller="kproxy.io/gateway-controller")
    o = h.ctl.cfg.nginx
    # Serve the Gateway's port 80 on the harness's HTTP port (the renderer's port map).
    object.__setattr__(o, "gateway_ports", ((80, o.http_port), (443, o.https_port)))
    h.api.create("nodes", node("node-1", "192.168.0.2"))
    objects(h)
    return h


def conditions(obj: dict[str, Any] | None) -> dict[str, str]:
    st = (obj or {}).get("status") or {}
    conds = st.get("conditions") or [c for p in st.get("parents") or [] for c in p["conditions"]]
    return {c["type"]: c["reason"] for c in conds}


def test_httproute_served_and_statuses_written_once(harness: Callable[..., Harness]) -> None:  # noqa: F811
    h = make(harness)
    h.ctl.start()
    assert h.ctl.ready.wait(15)
    h.api.create("httproutes", httproute(h, "s1"))
    h.served_by("gw.test", "s1")
    assert h.api.wait_for(
        lambda: (
            conditions(h.api.get("httproutes", "web", "default"))
            == {"Accepted": "Accepted", "ResolvedRefs": "ResolvedRefs"}
        ),
        10,
    )
    assert h.api.wait_for(
        lambda: (
            conditions(h.api.get("gateways", "gw", "default")) == {"Accepted": "Accepted", "Programmed": "Programmed"}
        ),
        10,
    )
    gw = h.api.get("gateways", "gw", "default")
    assert gw is not None
    assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": "192.168.0.2"}]
    assert gw["status"]["listeners"][0]["attachedRoutes"] == 1
    assert conditions(h.api.get("gatewayclasses", "kproxy")) == {"Accepted": "Accepted"}

    # Nothing changed: more syncs write no status.
    patches = len(h.api.requests("patch"))
    for _ in range(3):
        h.ctl.request_sync()
    wait_until(lambda: h.ctl.runner is not None, 1, "sync")
    h.api.create(
        "services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "unrelated", "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "127.0.0.1",
                "clusterIPs": ["127.0.0.1"],
                "ports": [{"port": 1, "protocol": "TCP"}],
            },
        },
    )
    h.served_by("gw.test", "s1")
    threading.Event().wait(0.5)  # a few sync periods (0.05 s) for a wrong write to show up
    assert len(h.api.requests("patch")) == patches

    # A broken backend: ResolvedRefs goes False, the route answers 500.
    obj = h.api.get("httproutes", "web", "default")
    assert obj is not None
    obj["spec"]["rules"][0]["backendRefs"][0]["name"] = "ghost"
    h.api.update("httproutes", obj)
    assert h.api.wait_for(
        lambda: conditions(h.api.get("httproutes", "web", "default")).get("ResolvedRefs") == "BackendNotFound", 10
    )
    wait_until(lambda: (r := h.get("gw.test")) is not None and r.status == 500, 10, "500")


def test_route_change_reloads_without_dropping_an_in_flight_request(harness: Callable[..., Harness]) -> None:  # noqa: F811
    h = make(harness)
    h.ctl.start()
    assert h.ctl.ready.wait(15)
    h.api.create("httproutes", httproute(h, "s1"))
    h.served_by("gw.test", "s1")
    # The worker of the configuration before the route may still accept a connection until it
    # has taken the master's QUIT (nginx's reload): then it answers 404. The in-flight request
    # must reach the route's worker, the only one once the old has gone.
    wait_until(lambda: len(h.ctl.nginx.workers()) == 1, 15, "the worker without the route to exit")
    # A request in flight (headers and half its body sent) while the route changes and nginx
    # reloads: the old worker finishes it on the old route.
    conn = http.client.HTTPConnection(LOOPBACK, h.http_port, timeout=10)
    conn.putrequest("POST", "/upload", skip_host=True)
    conn.putheader("Host", "gw.test")
    conn.putheader("Content-Length", "200000")
    conn.endheaders()
    conn.send(b"z" * 100_000)
    obj = h.api.get("httproutes", "web", "default")
    assert obj is not None
    obj["spec"]["rules"][0]["backendRefs"][0] = {"name": "s2", "port": h.port_of("s2")}
    h.api.update("httproutes", obj)
    h.served_by("gw.test", "s2")
    conn.send(b"z" * 100_000)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert (resp.status, body["body_length"], body["backend"]) == (200, 200_000, "s1")
