"""The Ingress controller against the fake API server and a real nginx on 127.0.0.1.

Services have ClusterIP 127.0.0.1 and their port is an echo backend's port, so the default
``service`` upstream mode sends straight to the backends. Waits are on conditions (the fake API
server's own condition, or polling real HTTP with a deadline), never on fixed sleeps.
"""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ingresskit import LOOPBACK, NGINX, Backend, Cert, free_ports, request, wait_until, worker_user
from test_reload import BROKEN_HOST, breaking_render, tls_secret

from kproxy.ingress.controller import ControllerConfig, IngressController, serve_health
from kproxy.ingress.metrics import IngressMetrics
from kproxy.ingress.nginx import NginxOptions, UpstreamMode
from kproxy.ingress.selector import parse_selector
from kproxy.sources.kube import load_client_configuration
from kproxy.testing.fakeapi import FakeAPIServer

P = "nginx.ingress.kubernetes.io/"
OURS = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "IngressClass",
    "metadata": {"name": "kproxy"},
    "spec": {"controller": "kproxy.io/ingress-controller"},
}
OTHER = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "IngressClass",
    "metadata": {"name": "other"},
    "spec": {"controller": "example.com/other"},
}


def service(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": LOOPBACK,
            "clusterIPs": [LOOPBACK],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        },
    }


def ing(
    name: str,
    host: str,
    svc: str,
    port: int,
    *,
    cls: str = "kproxy",
    ann: dict[str, str] | None = None,
    tls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ingressClassName": cls,
        "rules": [
            {
                "host": host,
                "http": {
                    "paths": [
                        {
                            "path": "/",
                            "pathType": "Prefix",
                            "backend": {"service": {"name": svc, "port": {"number": port}}},
                        }
                    ]
                },
            }
        ],
    }
    if tls is not None:
        spec["tls"] = tls
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": "default", "annotations": ann or {}},
        "spec": spec,
    }


def node(
    name: str, internal: str, *, external: str | None = None, edge: bool = True, ready: str = "True"
) -> dict[str, Any]:
    addrs = [{"type": "InternalIP", "address": internal}]
    if external:
        addrs.append({"type": "ExternalIP", "address": external})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"node-role.kubernetes.io/edge": ""} if edge else {}},
        "status": {"addresses": addrs, "conditions": [{"type": "Ready", "status": ready}]},
    }


class Harness:
    def __init__(
        self,
        api: FakeAPIServer,
        backends: dict[str, Backend],
        state: Path,
        *,
        upstream_mode: UpstreamMode = UpstreamMode.SERVICE,
        **cfg: Any,
    ) -> None:
        self.api = api
        self.backends = backends
        self.state = state
        self.http_port, self.https_port = free_ports(2)
        options = NginxOptions(
            http_port=self.http_port,
            https_port=self.https_port,
            listen_addresses=(LOOPBACK,),
            cert_dir=str(state / "certs"),
            run_dir=str(state),
            user=worker_user(),
            worker_processes=1,
            worker_shutdown_timeout=10,
            upstream_mode=upstream_mode,
        )
        settings: dict[str, Any] = {
            "nginx": options,
            "nginx_binary": NGINX,
            "state_dir": str(state),
            "node_name": "node-1",
            "min_sync_period": 0.05,
            "sync_period": 30,
            "retry_period": 0.2,
            "reload_timeout": 5,
            "edge_selector": parse_selector("node-role.kubernetes.io/edge"),
        }
        config = ControllerConfig(**{**settings, **cfg})
        self.metrics = IngressMetrics()
        configuration = load_client_configuration(str(api.write_kubeconfig(state / "kubeconfig")))
        self.ctl = IngressController(config, configuration, metrics=self.metrics, render_fn=breaking_render)

    def port_of(self, backend: str) -> int:
        return self.backends[backend].port

    def get(self, host: str) -> Any:
        try:
            return request(self.http_port, host)
        except OSError:
            return None

    def served_by(self, host: str, backend: str, timeout: float = 10) -> None:
        def ok() -> bool:
            r = self.get(host)
            return r is not None and r.status == 200 and r.backend == backend

        wait_until(ok, timeout, f"{host} served by {backend}")

    def status_of(self, name: str) -> list[dict[str, Any]] | None:
        obj = self.api.get("ingresses", name, "default")
        if obj is None:
            return None
        return ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress")

    def wait_status(self, name: str, want: Any, timeout: float = 10) -> None:
        assert self.api.wait_for(lambda: self.status_of(name) == want, timeout), (name, self.status_of(name))

    def events(self, name: str, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.api.events() if e["involvedObject"].get("name") == name and e["reason"] == reason]

    def wait_event(self, name: str, reason: str, timeout: float = 10) -> dict[str, Any]:
        assert self.api.wait_for(lambda: bool(self.events(name, reason)), timeout), [
            (e["involvedObject"]["name"], e["reason"], e["message"]) for e in self.api.events()
        ]
        return self.events(name, reason)[0]


@pytest.fixture
def harness(echo_backends: Callable[..., Backend]) -> Iterator[Callable[..., Harness]]:
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed")
    backends = {n: echo_backends(n) for n in ("s1", "s2")}
    made: list[tuple[Harness, FakeAPIServer, Path]] = []

    def make(**cfg: Any) -> Harness:
        api = FakeAPIServer().start()
        state = Path(tempfile.mkdtemp(prefix="kproxy-ctl-"))
        try:
            state.chmod(0o755)
            h = Harness(api, backends, state, **cfg)
        except BaseException:
            api.stop()
            shutil.rmtree(state, ignore_errors=True)
            raise
        made.append((h, api, state))
        for name, b in backends.items():
            api.create("services", service(name, b.port))
        api.create("ingressclasses", OURS)
        api.create("ingressclasses", OTHER)
        return h

    try:
        yield make
    finally:
        for h, api, state in made:
            h.ctl.stop()
            api.stop()
            shutil.rmtree(state, ignore_errors=True)


def test_ingresses_created_updated_and_deleted_are_served(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.api.create("nodes", node("node-1", "192.168.0.2"))
    h.ctl.start()
    assert h.ctl.ready.wait(15), "not ready"
    assert h.get("web.test").status == 404  # ready with an empty table: the controller's 404

    h.api.create("ingresses", ing("web", "web.test", "s1", h.port_of("s1")))
    h.served_by("web.test", "s1")
    obj = h.api.get("ingresses", "web", "default")
    assert obj is not None
    obj["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] = {
        "name": "s2",
        "port": {"number": h.port_of("s2")},
    }
    h.api.update("ingresses", obj)
    h.served_by("web.test", "s2")
    h.api.delete("ingresses", "web", "default")
    wait_until(lambda: (r := h.get("web.test")) is not None and r.status == 404, 10, "web.test gone")
    assert h.metrics.registry.get_sample_value("kproxy_ingress_reload_failures_total") == 0.0


def test_a_burst_of_changes_is_coalesced(harness: Callable[..., Harness]) -> None:
    h = harness(min_sync_period=0.5)
    h.ctl.start()
    assert h.ctl.ready.wait(15)
    before = h.metrics.registry.get_sample_value("kproxy_ingress_success_total") or 0.0
    with h.api.batch():
        for i in range(20):
            h.api.create("ingresses", ing(f"b{i}", f"b{i}.test", "s1", h.port_of("s1")))
    h.served_by("b19.test", "s1")
    for i in range(20):
        h.served_by(f"b{i}.test", "s1", timeout=2)
    reloads = (h.metrics.registry.get_sample_value("kproxy_ingress_success_total") or 0.0) - before
    assert 1 <= reloads <= 3, reloads  # 20 Ingresses, a handful of reloads at most


def test_status_is_published_for_our_ingresses_only(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.api.create("nodes", node("node-1", "192.168.0.2"))
    h.api.create("nodes", node("node-2", "192.168.0.3", external="198.51.100.7"))
    h.api.create("nodes", node("node-3", "192.168.0.4", edge=False))
    h.api.create("nodes", node("node-4", "192.168.0.5", ready="False"))
    h.api.create("ingresses", ing("mine", "mine.test", "s1", h.port_of("s1")))
    h.api.create("ingresses", ing("theirs", "theirs.test", "s1", h.port_of("s1"), cls="other"))
    h.ctl.start()
    h.wait_status("mine", [{"ip": "192.168.0.2"}, {"ip": "198.51.100.7"}])  # ExternalIP preferred
    h.served_by("mine.test", "s1")
    assert h.status_of("theirs") is None
    assert h.get("theirs.test").status == 404  # not served either
    # node-3 becomes an edge node: the status follows.
    n3 = node("node-3", "192.168.0.4")
    h.api.update("nodes", n3)
    h.wait_status("mine", [{"ip": "192.168.0.2"}, {"ip": "192.168.0.4"}, {"ip": "198.51.100.7"}])
    assert h.status_of("theirs") is None
    # The Ingress moves to the other class: the status we wrote is taken back.
    obj = h.api.get("ingresses", "mine", "default")
    assert obj is not None
    obj["spec"]["ingressClassName"] = "other"
    h.api.update("ingresses", obj)
    h.wait_status("mine", None)
    wait_until(lambda: (r := h.get("mine.test")) is not None and r.status == 404, 10, "mine.test no longer served")
    assert not [e for e in h.api.events() if e["involvedObject"]["name"] == "theirs"]


def test_publish_status_address_overrides_the_edge_nodes(harness: Callable[..., Harness]) -> None:
    h = harness(publish_status_address=("203.0.113.5", "lb.example.com"))
    h.api.create("nodes", node("node-1", "192.168.0.2"))
    h.api.create("ingresses", ing("mine", "mine.test", "s1", h.port_of("s1")))
    h.ctl.start()
    h.wait_status("mine", [{"ip": "203.0.113.5"}, {"hostname": "lb.example.com"}])
    assert not any(r.resource == "nodes" for r in h.api.requests())  # nodes are not even watched


def test_no_status_and_not_ready_until_nginx_serves(harness: Callable[..., Harness]) -> None:
    h = harness(nginx_binary="/nonexistent/nginx")
    h.api.create("nodes", node("node-1", "192.168.0.2"))
    h.api.create("ingresses", ing("mine", "mine.test", "s1", h.port_of("s1")))
    server = serve_health(h.ctl, "127.0.0.1")
    try:
        h.ctl.start()
        assert h.api.wait_for(lambda: len(h.api.requests("list")) >= 5, 10)  # it listed everything
        wait_until(
            lambda: (h.metrics.registry.get_sample_value("kproxy_ingress_reload_failures_total") or 0) >= 2,
            10,
            "retried failures",
        )
        assert not h.ctl.ready.is_set() and h.status_of("mine") is None
        conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 503
        conn.close()
    finally:
        server.stop()


def test_health_and_metrics_endpoints(harness: Callable[..., Harness]) -> None:
    h = harness()
    server = serve_health(h.ctl, "127.0.0.1")
    try:
        h.ctl.start()
        assert h.ctl.ready.wait(15)
        conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=5)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
        assert "kproxy_ingress_config_last_reload_successful 1.0" in body
        assert "kproxy_ingress_reload_failures_total 0.0" in body
    finally:
        server.stop()


def test_failures_become_events_and_the_last_good_configuration_keeps_serving(
    harness: Callable[..., Harness], cert_factory: Callable[[str], Cert]
) -> None:
    h = harness()
    h.api.create("ingresses", ing("web", "web.test", "s1", h.port_of("s1")))
    h.ctl.start()
    h.served_by("web.test", "s1")

    # 1. A configuration nginx -t refuses: the Ingress whose server block fails gets the Event.
    h.api.create("ingresses", ing("broken", BROKEN_HOST, "s2", h.port_of("s2")))
    ev = h.wait_event("broken", "ReloadFailed")
    assert ev["type"] == "Warning" and "no_such_directive" in ev["message"]
    assert ev["involvedObject"]["kind"] == "Ingress" and ev["involvedObject"]["uid"]
    assert h.metrics.registry.get_sample_value("kproxy_ingress_config_last_reload_successful") == 0.0
    # Meanwhile a change elsewhere cannot go in either (one configuration), and the old one serves.
    obj = h.api.get("ingresses", "web", "default")
    assert obj is not None
    obj["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] = {
        "name": "s2",
        "port": {"number": h.port_of("s2")},
    }
    h.api.update("ingresses", obj)
    assert h.get("web.test").backend == "s1"
    assert h.get(BROKEN_HOST).status == 404
    # Removing the culprit lets everything through.
    h.api.delete("ingresses", "broken", "default")
    h.served_by("web.test", "s2")
    wait_until(
        lambda: h.metrics.registry.get_sample_value("kproxy_ingress_config_last_reload_successful") == 1.0,
        5,
        "the success metric",
    )  # set right after the reload that already serves
    assert len(h.events("broken", "ReloadFailed")) == 1  # reported once, not on every retry

    # 2. A Secret whose key does not match its certificate: only that host loses HTTPS.
    good, bad, other = cert_factory("good.test"), cert_factory("bad.test"), cert_factory("other.test")
    h.api.create("secrets", tls_secret("tls-good", good))
    h.api.create("secrets", tls_secret("tls-bad", bad, key_from=other))
    h.api.create(
        "ingresses",
        ing("good", "good.test", "s1", h.port_of("s1"), tls=[{"hosts": ["good.test"], "secretName": "tls-good"}]),
    )
    h.api.create(
        "ingresses",
        ing("bad", "bad.test", "s1", h.port_of("s1"), tls=[{"hosts": ["bad.test"], "secretName": "tls-bad"}]),
    )
    ev = h.wait_event("bad", "TLSSecretRejected")
    assert "default/tls-bad" in ev["message"] and "key values mismatch" in ev["message"]
    ctx = ssl.create_default_context(cafile=str(good.crt))
    wait_until(lambda: _tls_backend(h, "good.test", ctx) == "s1", 10, "good.test over TLS")
    assert not h.events("good", "TLSSecretRejected")

    # 3. An annotation kproxy does not support: reported on the Ingress, the rest is served.
    h.api.create("ingresses", ing("odd", "odd.test", "s1", h.port_of("s1"), ann={P + "affinity": "cookie"}))
    ev = h.wait_event("odd", "Rejected")
    assert "affinity" in ev["message"] and "not supported by kproxy" in ev["message"]
    h.served_by("odd.test", "s1")


def _tls_backend(h: Harness, host: str, ctx: Any) -> str | None:
    try:
        return str(request(h.https_port, host, tls=ctx).backend)
    except OSError:
        return None


def endpoint_slice(port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "ep-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "ep"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [LOOPBACK], "conditions": {"ready": ready}}],
    }


def test_endpoints_mode_follows_the_endpoint_slices(harness: Callable[..., Harness]) -> None:
    h = harness(upstream_mode=UpstreamMode.ENDPOINTS)
    svc = service("ep", 80)
    svc["spec"]["clusterIP"] = svc["spec"]["clusterIPs"][0] = "172.30.0.50"  # never used in this mode
    h.api.create("services", svc)
    h.api.create("endpointslices", endpoint_slice(h.port_of("s1")))
    h.api.create("ingresses", ing("ep", "ep.test", "ep", 80))
    h.ctl.start()
    h.served_by("ep.test", "s1")
    h.api.update("endpointslices", endpoint_slice(h.port_of("s2")))
    h.served_by("ep.test", "s2")
    h.api.update("endpointslices", endpoint_slice(h.port_of("s2"), ready=False))
    wait_until(lambda: (r := h.get("ep.test")) is not None and r.status == 503, 10, "no ready endpoint: 503")
