"""The reflector against the fake API server, through the real `kubernetes` client.

Every wait is on a condition with a deadline (the recorder's, the fake server's, or the
backoff's); nothing sleeps. Every reflector and server a test starts is stopped by the fixtures,
which also check that no thread is left behind.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from kubernetes import client as k8s

from kproxy.errors import ConfigError
from kproxy.sources.kube import (
    INGRESSES,
    NODES,
    SERVICES,
    Backoff,
    KeyStore,
    Reflector,
    Store,
    informer,
    key_informer,
    load_client_configuration,
    name_selector,
    object_key,
)
from kproxy.testing.fakeapi import FakeAPIServer

Obj = dict[str, Any]
# How long any single wait may take before the test fails. Generous on purpose: it bounds a
# failing test, while a passing one waits milliseconds.
DEADLINE = 10.0

# The client imports its API modules on first use (CoreV1Api alone takes about half a second of
# model building); pay that once here rather than inside the first test's deadline.
k8s.CoreV1Api, k8s.DiscoveryV1Api, k8s.NetworkingV1Api  # noqa: B018


# -- helpers -----------------------------------------------------------------------------------


def service(name: str, namespace: str = "default", **labels: str) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"clusterIP": "172.30.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def node(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


class Recorder:
    """A Handler that records what it is told and lets a test wait for it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.updates: list[tuple[Obj, Obj]] = []
        self.deleted: list[Obj] = []
        self._cond = threading.Condition()

    def _note(self, what: str, key: str) -> None:
        with self._cond:
            self.calls.append((what, key))
            self._cond.notify_all()

    def on_add(self, obj: Obj) -> None:
        self._note("add", object_key(obj))

    def on_update(self, old: Obj, new: Obj) -> None:
        self.updates.append((old, new))
        self._note("update", object_key(new))

    def on_delete(self, obj: Obj) -> None:
        self.deleted.append(obj)
        self._note("delete", object_key(obj))

    def on_synced(self) -> None:
        self._note("synced", "")

    def wait_for(self, predicate: Callable[[list[tuple[str, str]]], bool], timeout: float = DEADLINE) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.calls), timeout)

    def wait_calls(self, n: int) -> list[tuple[str, str]]:
        assert self.wait_for(lambda calls: len(calls) >= n), f"expected {n} calls, got {self.calls}"
        return list(self.calls)


class ServiceTarget(Recorder):
    """The same, reached through kproxy's on_<kind>_... naming (named_handler)."""

    def on_service_add(self, obj: Obj) -> None:
        self.on_add(obj)

    def on_service_update(self, old: Obj, new: Obj) -> None:
        self.on_update(old, new)

    def on_service_delete(self, obj: Obj) -> None:
        self.on_delete(obj)

    def on_service_synced(self) -> None:
        self.on_synced()


class RecordingBackoff(Backoff):
    """A deterministic backoff (no jitter) that lets a test wait for the n-th retry."""

    def __init__(self, initial: float = 0.01, cap: float = 0.05) -> None:
        super().__init__(initial, cap, jitter=0.0)
        self.delays: list[float] = []
        self._cond = threading.Condition()

    def next_delay(self) -> float:
        delay = super().next_delay()
        with self._cond:
            self.delays.append(delay)
            self._cond.notify_all()
        return delay

    def wait_retries(self, n: int, timeout: float = DEADLINE) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.delays) >= n, timeout)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads left running: {left}"


@pytest.fixture
def api() -> Iterator[FakeAPIServer]:
    with FakeAPIServer() as server:
        yield server


@pytest.fixture
def configuration(api: FakeAPIServer, tmp_path: Path) -> k8s.Configuration:
    cfg = load_client_configuration(str(api.write_kubeconfig(tmp_path)))
    # The client takes HTTP(S)_PROXY from the environment; tests talk to loopback only.
    cfg.proxy = None
    return cfg


Start = Callable[..., Reflector]


@pytest.fixture
def start(configuration: k8s.Configuration) -> Iterator[Start]:
    """Start a reflector for a resource into a sink; every one is stopped at teardown."""
    started: list[Reflector] = []

    def _start(resource: Any = SERVICES, sink: Any = None, **options: Any) -> Reflector:
        options.setdefault("backoff", RecordingBackoff())
        reflector = Reflector(resource, configuration, sink if sink is not None else Store(), **options)
        reflector.start()
        started.append(reflector)
        return reflector

    yield _start
    for reflector in started:
        reflector.stop()
        assert not reflector.alive


def synced(reflector: Reflector, api: FakeAPIServer, resource: str = "services") -> None:
    """Wait until the first list is in and the watch that follows it is open."""
    assert reflector.wait_synced(DEADLINE)
    assert api.wait_for_watches(resource, 1, DEADLINE)


# -- tests -------------------------------------------------------------------------------------


def test_initial_list_is_delivered_as_kubectl_shaped_objects(
    api: FakeAPIServer, configuration: k8s.Configuration
) -> None:
    api.create("services", service("a"))
    api.create("services", service("b", namespace="other"))
    target = ServiceTarget()
    reflector, store = informer(SERVICES, configuration, target, backoff=RecordingBackoff())
    with reflector:
        assert reflector.wait_synced(DEADLINE)
        assert target.wait_calls(3) == [("add", "default/a"), ("add", "other/b"), ("synced", "")]
        assert reflector.has_synced()
        assert reflector.resource_version == str(api.resource_version)
        # The API server leaves kind/apiVersion out of list items; the reflector puts them back.
        obj = store.get("default/a")
        assert obj is not None
        assert (obj["kind"], obj["apiVersion"]) == ("Service", "v1")
        assert obj["spec"]["ports"] == [{"port": 80, "protocol": "TCP"}]
    assert not reflector.alive


def test_changes_are_seen_in_order_with_previous_state(api: FakeAPIServer, start: Start) -> None:
    api.create("services", service("a"))
    api.create("services", service("b"))
    recorder = Recorder()
    reflector = start(sink=Store(recorder))
    synced(reflector, api)
    recorder.wait_calls(3)

    api.create("services", service("c"))
    changed = service("a")
    changed["spec"]["clusterIP"] = "172.30.0.99"
    api.update("services", changed)
    final_b = api.delete("services", "b")

    calls = recorder.wait_calls(6)
    assert calls[3:] == [("add", "default/c"), ("update", "default/a"), ("delete", "default/b")]
    old, new = recorder.updates[0]
    assert (old["spec"]["clusterIP"], new["spec"]["clusterIP"]) == ("172.30.0.10", "172.30.0.99")
    assert recorder.deleted[0]["metadata"]["resourceVersion"] == final_b["metadata"]["resourceVersion"]
    assert reflector.resource_version == final_b["metadata"]["resourceVersion"]
    assert len(api.requests("list", "services")) == 1


def test_bookmark_advances_resource_version_without_events(api: FakeAPIServer, start: Start) -> None:
    recorder = Recorder()
    reflector = start(sink=Store(recorder))
    synced(reflector, api)
    recorder.wait_calls(1)
    watch = api.requests("watch", "services")[-1]
    assert watch.query["allowWatchBookmarks"] == "true"
    assert 0 < int(watch.query["timeoutSeconds"]) <= 600

    api.create("nodes", node("n1"))  # moves the global RV; nothing for a services watch
    api.send_bookmark()

    assert reflector.wait_for_resource_version(str(api.resource_version), DEADLINE)
    assert recorder.calls == [("synced", "")]


def test_periodic_bookmarks(configuration: k8s.Configuration, tmp_path: Path) -> None:
    with FakeAPIServer(bookmark_interval=0.05) as api:
        cfg = load_client_configuration(str(api.write_kubeconfig(tmp_path)))
        cfg.proxy = None
        recorder = Recorder()
        with Reflector(SERVICES, cfg, Store(recorder), backoff=RecordingBackoff()) as reflector:
            synced(reflector, api)
            api.create("nodes", node("n1"))
            assert reflector.wait_for_resource_version(str(api.resource_version), DEADLINE)
            assert recorder.calls == [("synced", "")]


def test_expired_history_relists_and_the_view_converges(api: FakeAPIServer, start: Start) -> None:
    for name in ("a", "b", "c"):
        api.create("services", service(name))
    recorder = Recorder()
    store = Store(recorder)
    reflector = start(sink=store)
    synced(reflector, api)
    recorder.wait_calls(4)

    with structlog.testing.capture_logs() as logs:
        # Atomic for every watch: none of these changes is ever streamed, only the 410 is.
        with api.batch():
            api.delete("services", "b")
            changed = service("a")
            changed["spec"]["clusterIP"] = "172.30.0.99"
            api.update("services", changed)
            api.create("services", service("d"))
            api.expire_history()
        assert recorder.wait_for(lambda calls: len(calls) >= 7)

    assert recorder.calls[4:] == [("delete", "default/b"), ("update", "default/a"), ("add", "default/d")]
    assert store.keys() == ["default/a", "default/c", "default/d"]
    assert recorder.calls.count(("synced", "")) == 1
    assert len(api.requests("list", "services")) == 2
    assert "watch_relist" in [e["event"] for e in logs]
    assert [e for e in logs if e["log_level"] not in ("debug", "info")] == []
    assert api.wait_for_watches("services", 1, DEADLINE)  # watching again after the relist
    api.create("services", service("e"))
    assert recorder.wait_calls(8)[-1] == ("add", "default/e")


def test_http_410_on_the_watch_request_relists(api: FakeAPIServer, start: Start) -> None:
    recorder = Recorder()
    reflector = start(sink=Store(recorder))
    synced(reflector, api)
    api.fail_next("services", 1, 410, verb="watch")
    assert api.drop_connections() == 1
    assert api.wait_for(lambda: len(api.requests("list", "services")) == 2, DEADLINE)
    assert api.wait_for_watches("services", 1, DEADLINE)
    api.create("services", service("a"))
    assert recorder.wait_calls(2) == [("synced", ""), ("add", "default/a")]


def test_dropped_stream_resumes_from_last_rv_without_duplicates_or_losses(api: FakeAPIServer, start: Start) -> None:
    recorder = Recorder()
    reflector = start(sink=Store(recorder))
    synced(reflector, api)
    first = api.create("services", service("s1"))
    recorder.wait_calls(2)

    with api.batch():
        # Cut the stream, then change things before the reflector can possibly reconnect.
        assert api.drop_connections() == 1
        api.create("services", service("s2"))
        api.create("services", service("s3"))
    recorder.wait_calls(4)
    api.create("services", service("s4"))

    calls = recorder.wait_calls(5)
    assert calls == [("synced", "")] + [("add", f"default/s{i}") for i in range(1, 5)]
    watches = api.requests("watch", "services")
    assert watches[1].resource_version == first["metadata"]["resourceVersion"]
    assert len(api.requests("list", "services")) == 1  # resumed, not relisted


def test_watch_ended_by_the_server_timeout_is_resumed_at_once(api: FakeAPIServer, start: Start) -> None:
    recorder = Recorder()
    # rand=0 makes timeoutSeconds exactly watch_timeout: the server ends the stream after 1 s.
    reflector = start(sink=Store(recorder), watch_timeout=1.0, rand=lambda: 0.0)
    synced(reflector, api)
    assert api.wait_for(lambda: len(api.requests("watch", "services")) >= 2, DEADLINE)
    first, second = api.requests("watch", "services")[:2]
    assert first.query["timeoutSeconds"] == "1"
    assert second.resource_version == first.resource_version
    assert len(api.requests("list", "services")) == 1
    assert api.wait_for_watches("services", 1, DEADLINE)
    api.create("services", service("a"))
    assert recorder.wait_calls(2) == [("synced", ""), ("add", "default/a")]


def test_failing_list_is_retried_with_backoff(api: FakeAPIServer, start: Start) -> None:
    api.create("services", service("a"))
    api.fail_next("services", 3, status=500)
    backoff = RecordingBackoff(initial=0.01, cap=0.03)
    recorder = Recorder()
    with structlog.testing.capture_logs() as logs:
        reflector = start(sink=Store(recorder), backoff=backoff)
        assert reflector.wait_synced(DEADLINE)
    assert backoff.delays == [0.01, 0.02, 0.03]  # doubling, capped
    failures = [e for e in logs if e["event"] == "list_failed"]
    assert [(e["status"], e["delay"], e["log_level"]) for e in failures] == [
        (500, 0.01, "warning"),
        (500, 0.02, "warning"),
        (500, 0.03, "warning"),
    ]
    assert all(e["resource"] == "services" for e in failures)
    assert len(api.requests("list", "services")) == 4
    assert recorder.wait_calls(2) == [("add", "default/a"), ("synced", "")]


def test_success_resets_the_backoff(api: FakeAPIServer, start: Start) -> None:
    api.create("services", service("a"))
    api.fail_next("services", 3, status=500)
    backoff = RecordingBackoff(initial=0.01, cap=0.03)
    reflector = start(backoff=backoff)
    synced(reflector, api)
    assert backoff.delays == [0.01, 0.02, 0.03]
    # The list succeeded: the next outage backs off from the start again, not from the cap.
    api.fail_next("services", 2, status=503, verb="watch")
    api.expire_history()  # the open watch ends (410) and the relist's watch meets the failures
    assert backoff.wait_retries(6)
    # One delay guards the relist (410 straight after a list); the relist resets it again.
    assert backoff.delays[3:] == [0.01, 0.01, 0.02]


def test_the_default_backoff_brings_a_reflector_back_within_five_seconds() -> None:
    worst = Backoff(rand=lambda: 1.0)
    delays = [worst.next_delay() for _ in range(20)]
    assert max(delays) == 5.0


def test_backoff_jitter_and_reset() -> None:
    draws = iter([0.0, 1.0, 0.5])
    backoff = Backoff(0.5, 30.0, jitter=0.5, rand=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(3)] == [0.5, 1.5, 2.5]
    assert backoff.failures == 3
    backoff.reset()
    assert backoff.failures == 0
    capped = Backoff(0.5, 2.0, jitter=0.0)
    assert [capped.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_recovers_when_the_api_server_comes_back(api: FakeAPIServer, start: Start) -> None:
    api.create("services", service("a"))
    backoff = RecordingBackoff()
    recorder = Recorder()
    reflector = start(sink=Store(recorder), backoff=backoff)
    synced(reflector, api)
    recorder.wait_calls(2)

    api.stop()
    api.create("services", service("b"))  # written while the server is away
    assert backoff.wait_retries(2)  # the reflector is failing to reconnect, backing off
    api.start()

    assert recorder.wait_calls(3)[-1] == ("add", "default/b")
    assert len(api.requests("list", "services")) == 1  # history kept: resumed, no relist


def test_recovers_with_relist_when_history_expired_during_the_outage(api: FakeAPIServer, start: Start) -> None:
    api.create("services", service("a"))
    backoff = RecordingBackoff()
    recorder = Recorder()
    store = Store(recorder)
    reflector = start(sink=store, backoff=backoff)
    synced(reflector, api)
    recorder.wait_calls(2)

    api.stop()
    api.delete("services", "a")
    api.create("services", service("b"))
    api.expire_history()
    assert backoff.wait_retries(1)
    api.start()

    assert recorder.wait_for(lambda calls: ("add", "default/b") in calls)
    assert store.keys() == ["default/b"]
    assert recorder.calls[2:] == [("delete", "default/a"), ("add", "default/b")]


def test_node_field_selector_sees_only_its_own_node(api: FakeAPIServer, start: Start) -> None:
    api.create("nodes", node("node-a"))
    api.create("nodes", node("node-b"))
    recorder = Recorder()
    store = Store(recorder)
    reflector = start(NODES, store, field_selector=name_selector("node-a"))
    synced(reflector, api, "nodes")
    api.create("nodes", node("node-c"))
    labelled = node("node-a")
    labelled["metadata"]["labels"] = {"topology.kubernetes.io/zone": "z1"}
    api.update("nodes", labelled)
    assert recorder.wait_calls(3) == [("add", "node-a"), ("synced", ""), ("update", "node-a")]
    assert store.keys() == ["node-a"]
    assert api.requests("list", "nodes")[0].query["fieldSelector"] == "metadata.name=node-a"


def test_label_selector_transitions_arrive_as_delete_and_add(api: FakeAPIServer, start: Start) -> None:
    # kube-proxy ignores services that name another proxy (service.kubernetes.io/service-proxy-name).
    recorder = Recorder()
    reflector = start(sink=Store(recorder), label_selector="!service.kubernetes.io/service-proxy-name")
    synced(reflector, api)
    api.create("services", service("a"))
    api.update("services", service("a", **{"service.kubernetes.io/service-proxy-name": "other"}))
    api.update("services", service("a"))
    assert recorder.wait_calls(4) == [
        ("synced", ""),
        ("add", "default/a"),
        ("delete", "default/a"),
        ("add", "default/a"),
    ]


def test_a_failing_handler_ends_the_reflector_loudly(api: FakeAPIServer, start: Start) -> None:
    class Broken(Recorder):
        def on_add(self, obj: Obj) -> None:
            raise RuntimeError("bug in the consumer")

    api.create("services", service("a"))
    with structlog.testing.capture_logs() as logs:
        reflector = start(sink=Store(Broken()))
        assert reflector.join(DEADLINE)
    assert isinstance(reflector.error, RuntimeError)
    assert not reflector.has_synced()
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["reflector_crashed"]


def test_stop_is_prompt_while_watching(api: FakeAPIServer, start: Start) -> None:
    reflector = start()
    synced(reflector, api)
    began = time.monotonic()
    reflector.stop()
    assert time.monotonic() - began < 1.0
    assert not reflector.alive
    assert api.wait_for(lambda: api.open_watches("services") == 0, DEADLINE)


def test_stop_is_prompt_while_a_list_hangs(api: FakeAPIServer, start: Start) -> None:
    api.slow_list(30.0)
    reflector = start()
    assert api.wait_for(lambda: len(api.requests("list", "services")) == 1, DEADLINE)
    began = time.monotonic()
    reflector.stop()
    assert time.monotonic() - began < 1.0
    assert not reflector.alive
    assert not reflector.has_synced()


def test_stop_is_prompt_while_backing_off(api: FakeAPIServer, start: Start) -> None:
    api.fail_next("services", 1, status=503)
    backoff = RecordingBackoff(initial=30.0, cap=30.0)
    reflector = start(backoff=backoff)
    assert backoff.wait_retries(1)
    began = time.monotonic()
    reflector.stop()
    assert time.monotonic() - began < 1.0
    assert not reflector.alive


def test_fake_serves_status_updates_and_events(
    api: FakeAPIServer, configuration: k8s.Configuration, start: Start
) -> None:
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}},
    }
    api.create("ingresses", ingress)
    recorder = Recorder()
    reflector = start(INGRESSES, Store(recorder))
    synced(reflector, api, "ingresses")
    with k8s.ApiClient(configuration) as api_client:
        networking = k8s.NetworkingV1Api(api_client)
        lb = {"loadBalancer": {"ingress": [{"ip": "192.168.0.2"}]}}
        networking.patch_namespaced_ingress_status(
            "web", "default", {"status": lb, "spec": {"ignored": True}}, _preload_content=False
        )
        stored = api.get("ingresses", "web")
        assert stored is not None
        # The typed functions take plain dicts too: pydantic validates them into models.
        current: Any = stored
        current["status"] = {"loadBalancer": {}}
        networking.replace_namespaced_ingress_status("web", "default", current, _preload_content=False)
        current["status"] = lb  # the resourceVersion is stale now: refused as the real server does
        with pytest.raises(k8s.ApiException) as refused:
            networking.replace_namespaced_ingress_status("web", "default", current, _preload_content=False)
        assert refused.value.status == 409

        event: Any = {
            "metadata": {"generateName": "web."},
            "involvedObject": {"kind": "Ingress", "namespace": "default", "name": "web"},
            "reason": "Sync",
            "message": "Scheduled for sync",
            "type": "Normal",
        }
        k8s.CoreV1Api(api_client).create_namespaced_event("default", event, _preload_content=False)

    assert recorder.wait_calls(4)[2:] == [("update", "default/web"), ("update", "default/web")]
    patched = recorder.updates[0][1]
    assert patched["status"] == lb
    assert "ignored" not in patched["spec"]  # the status subresource changes status only
    assert [(e["reason"], e["metadata"]["namespace"]) for e in api.events()] == [("Sync", "default")]
    assert api.events()[0]["metadata"]["name"].startswith("web.")


def test_unusable_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the API server configuration"):
        load_client_configuration(str(tmp_path / "missing"))


# -- paged lists: the fake API server as the real one pages ------------------------------------


def list_page(api_client: k8s.ApiClient, **query: Any) -> Obj:
    """One list request through the typed client, its body as raw JSON."""
    resp = k8s.CoreV1Api(api_client).list_service_for_all_namespaces(**query, _preload_content=False)
    try:
        body: Obj = json.loads(resp.data)
    finally:
        resp.release_conn()
    return body


def names_of(page: Obj) -> list[str]:
    return [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in page["items"]]


def status_of(exc: k8s.ApiException) -> Obj:
    body: Obj = json.loads(exc.body)
    return body


def test_pages_cover_one_snapshot_exactly_once_whatever_is_written_between_them(
    api: FakeAPIServer, configuration: k8s.Configuration
) -> None:
    for ns, name in [("b", "s1"), ("a", "s2"), ("c", "s0"), ("a", "s1"), ("b", "s2"), ("c", "s1"), ("b", "s0")]:
        api.create("services", service(name, namespace=ns))
    snapshot = [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in api.objects("services")]
    with k8s.ApiClient(configuration) as api_client:
        first = list_page(api_client, limit=3)
        # Between the pages: a new object among the keys still to come, one of those deleted,
        # one changed, and the history moves on (still within what it keeps).
        api.create("services", service("s1a", namespace="b"))
        api.delete("services", "s1", namespace="c")
        changed = service("s2", namespace="b")
        changed["spec"]["clusterIP"] = "172.30.0.99"
        api.update("services", changed)
        second = list_page(api_client, limit=3, _continue=first["metadata"]["continue"])
        third = list_page(api_client, limit=3, _continue=second["metadata"]["continue"])

    pages = [first, second, third]
    assert [names_of(p) for p in pages] == [snapshot[0:3], snapshot[3:6], snapshot[6:7]]
    assert snapshot == sorted(snapshot)  # key order: namespace, then name
    assert {p["metadata"]["resourceVersion"] for p in pages} == {first["metadata"]["resourceVersion"]}
    assert [p["metadata"].get("remainingItemCount") for p in pages] == [4, 1, None]
    assert "continue" not in third["metadata"]
    assert {o["spec"]["clusterIP"] for p in pages for o in p["items"]} == {"172.30.0.10"}  # as listed
    assert [(p["kind"], p["apiVersion"]) for p in pages] == [("ServiceList", "v1")] * 3


def test_a_selector_filters_pages_and_hides_the_remaining_count(
    api: FakeAPIServer, configuration: k8s.Configuration
) -> None:
    for i in range(5):
        api.create("services", service(f"s{i}", **({"tier": "web"} if i in (0, 3, 4) else {})))
    with k8s.ApiClient(configuration) as api_client:
        first = list_page(api_client, limit=2, label_selector="tier=web")
        second = list_page(api_client, limit=2, label_selector="tier=web", _continue=first["metadata"]["continue"])
    assert (names_of(first), names_of(second)) == (["default/s0", "default/s3"], ["default/s4"])
    assert "remainingItemCount" not in first["metadata"]  # unknown when a selector filters
    assert "continue" not in second["metadata"]


def test_an_expired_continue_is_410_with_a_token_for_the_rest_from_the_latest_state(
    api: FakeAPIServer, configuration: k8s.Configuration
) -> None:
    for name in ("s0", "s1", "s2", "s3"):
        api.create("services", service(name))
    with k8s.ApiClient(configuration) as api_client:
        first = list_page(api_client, limit=2)
        api.create("services", service("s4"))
        api.expire_history()  # compaction: the first page's snapshot is gone
        with pytest.raises(k8s.ApiException) as expired:
            list_page(api_client, limit=2, _continue=first["metadata"]["continue"])
        status = status_of(expired.value)
        rest = list_page(api_client, _continue=status["metadata"]["continue"])
    assert expired.value.status == 410
    assert (status["reason"], status["code"]) == ("Expired", 410)
    assert status["message"].startswith(
        "The provided continue parameter is too old to display a consistent list result. You can start a "
        "new list without the continue parameter, or use the continue token in this response to retrieve "
        "the remainder of the results."
    )
    # The fresh token continues after the same key, from the latest state: inconsistent, as said.
    assert names_of(rest) == ["default/s2", "default/s3", "default/s4"]
    assert rest["metadata"]["resourceVersion"] == str(api.resource_version)


@pytest.mark.parametrize(
    "token",
    [
        "not base64 at all!",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"v":"meta.k8s.io/v1","rv":0,"start":"default/a\\u0000"}').decode(),
        base64.urlsafe_b64encode(b'{"v":"meta.k8s.io/v1","rv":105,"start":""}').decode(),
    ],
    ids=["not-base64", "not-an-object", "no-resource-version", "no-start-key"],
)
def test_a_malformed_continue_token_is_400(api: FakeAPIServer, configuration: k8s.Configuration, token: str) -> None:
    api.create("services", service("a"))
    with k8s.ApiClient(configuration) as api_client, pytest.raises(k8s.ApiException) as refused:
        list_page(api_client, limit=1, _continue=token)
    assert refused.value.status == 400
    status = status_of(refused.value)
    assert status["reason"] == "BadRequest"
    assert status["message"].startswith("invalid continue token: continue key is not valid")


def test_a_continue_with_a_resource_version_is_400(api: FakeAPIServer, configuration: k8s.Configuration) -> None:
    api.create("services", service("a"))
    api.create("services", service("b"))
    with k8s.ApiClient(configuration) as api_client:
        first = list_page(api_client, limit=1)
        with pytest.raises(k8s.ApiException) as refused:
            list_page(api_client, limit=1, _continue=first["metadata"]["continue"], resource_version="0")
    assert refused.value.status == 400


def test_limit_is_ignored_by_a_watch_and_a_list_from_the_cache(
    api: FakeAPIServer, configuration: k8s.Configuration
) -> None:
    for name in ("a", "b", "c"):
        api.create("services", service(name))
    with k8s.ApiClient(configuration) as api_client:
        cached = list_page(api_client, limit=1, resource_version="0")
        resp = k8s.CoreV1Api(api_client).list_service_for_all_namespaces(
            watch=True, limit=1, timeout_seconds=1, _preload_content=False
        )
        try:
            events = [json.loads(line) for line in resp.data.splitlines() if line.strip()]
        finally:
            resp.release_conn()
    assert names_of(cached) == ["default/a", "default/b", "default/c"]
    assert "continue" not in cached["metadata"]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
    ]


# -- paged lists: the reflector ----------------------------------------------------------------


class WriteDuringList(Recorder):
    """A Recorder that makes `write` happen once, at the first add. Behind a `KeyStore`, which
    hands each page on as it arrives, that is between the first page's request and the next
    one's, on the reflector's own thread."""

    def __init__(self, write: Callable[[], None]) -> None:
        super().__init__()
        self._write: Callable[[], None] | None = write
        self.added: list[Obj] = []

    def on_add(self, obj: Obj) -> None:
        if self._write is not None:
            write, self._write = self._write, None
            write()
        self.added.append(obj)
        super().on_add(obj)


def list_queries(api: FakeAPIServer) -> list[tuple[str | None, bool]]:
    """(limit, continued?) of every list request for services."""
    return [(r.query.get("limit"), "continue" in r.query) for r in api.requests("list", "services")]


def test_a_list_comes_in_pages_and_writes_between_them_arrive_by_the_watch(api: FakeAPIServer, start: Start) -> None:
    originals = [api.create("services", service(f"a{i}")) for i in range(7)]
    listed_at = str(api.resource_version)

    def write() -> None:
        api.create("services", service("a2x"))  # sorts among the keys still to be listed
        api.delete("services", "a5")
        changed = service("a4")
        changed["spec"]["clusterIP"] = "172.30.0.99"
        api.update("services", changed)

    recorder = WriteDuringList(write)
    store = KeyStore(recorder)
    reflector = start(sink=store, page_size=3)
    synced(reflector, api)

    calls = recorder.wait_calls(11)
    assert calls == [("add", f"default/a{i}") for i in range(7)] + [
        ("synced", ""),
        ("add", "default/a2x"),
        ("delete", "default/a5"),
        ("update", "default/a4"),
    ]
    assert list_queries(api) == [("3", False), ("3", True), ("3", True)]
    assert api.requests("watch", "services")[0].resource_version == listed_at  # the first page's
    assert {(o["kind"], o["apiVersion"]) for o in recorder.added} == {("Service", "v1")}
    # What the daemon's store keeps of an object, and hands back as `old`: key and version.
    old, new = recorder.updates[0]
    a4 = originals[4]["metadata"]
    assert old == {"metadata": {"name": "a4", "namespace": "default", "resourceVersion": a4["resourceVersion"]}}
    assert new["spec"]["clusterIP"] == "172.30.0.99"
    assert store.keys() == sorted(f"default/{n}" for n in ("a0", "a1", "a2", "a2x", "a3", "a4", "a6"))
    assert store.version("default/a4") == new["metadata"]["resourceVersion"]


def test_a_snapshot_expired_mid_list_falls_back_to_one_full_list_and_converges(
    api: FakeAPIServer, start: Start
) -> None:
    originals = [api.create("services", service(f"a{i}")) for i in range(7)]

    def write() -> None:
        api.delete("services", "a1")  # on the page being handed over: only the relist can tell
        changed = service("a0")
        changed["spec"]["clusterIP"] = "172.30.0.99"
        api.update("services", changed)
        api.create("services", service("a7"))
        api.expire_history()  # compaction: the rest of the pages can no longer be served

    recorder = WriteDuringList(write)
    store = KeyStore(recorder)
    with structlog.testing.capture_logs() as logs:
        reflector = start(sink=store, page_size=3)
        synced(reflector, api)
    calls = recorder.wait_calls(11)

    assert calls == [
        ("add", "default/a0"),
        ("add", "default/a1"),
        ("add", "default/a2"),
        # The full list: a2 is unchanged and not reported again; a1 is gone at its end.
        ("update", "default/a0"),
        ("add", "default/a3"),
        ("add", "default/a4"),
        ("add", "default/a5"),
        ("add", "default/a6"),
        ("add", "default/a7"),
        ("delete", "default/a1"),
        ("synced", ""),
    ]
    a1 = originals[1]["metadata"]
    assert recorder.deleted == [
        {"metadata": {"name": "a1", "namespace": "default", "resourceVersion": a1["resourceVersion"]}}
    ]
    assert list_queries(api) == [("3", False), ("3", True), (None, False)]
    fallback = [e for e in logs if e["event"] == "list_expired_paging"]
    assert [(e["log_level"], e["pages"], e["resource"]) for e in fallback] == [("warning", 1, "services")]
    assert "410" in fallback[0]["error"]
    assert reflector.resource_version == str(api.resource_version)
    assert store.keys() == [f"default/a{i}" for i in (0, 2, 3, 4, 5, 6, 7)]
    api.create("services", service("a8"))  # and watching from the full list's resourceVersion
    assert recorder.wait_calls(12)[-1] == ("add", "default/a8")


def test_a_failed_page_restarts_the_list_from_the_first_page(api: FakeAPIServer, start: Start) -> None:
    for i in range(5):
        api.create("services", service(f"a{i}"))
    recorder = WriteDuringList(lambda: api.fail_next("services", 1, status=500))
    store = KeyStore(recorder)
    reflector = start(sink=store, page_size=2)
    synced(reflector, api)
    assert list_queries(api) == [("2", False), ("2", True), ("2", False), ("2", True), ("2", True)]
    # The first attempt's page was delivered; the retry's is the same objects, not reported twice.
    assert recorder.wait_calls(6) == [("add", f"default/a{i}") for i in range(5)] + [("synced", "")]
    assert store.keys() == [f"default/a{i}" for i in range(5)]


def test_the_daemons_informer_sees_adds_updates_deletes_and_relists_as_store_does(
    api: FakeAPIServer, configuration: k8s.Configuration
) -> None:
    for name in ("a", "b", "c"):
        api.create("services", service(name))
    target = ServiceTarget()
    reflector, store = key_informer(SERVICES, configuration, target, backoff=RecordingBackoff(), page_size=2)
    with reflector:
        synced(reflector, api)
        assert target.wait_calls(4) == [
            ("add", "default/a"),
            ("add", "default/b"),
            ("add", "default/c"),
            ("synced", ""),
        ]
        with api.batch():  # none of this is streamed: only the 410, then the relist tells
            api.delete("services", "b")
            changed = service("a")
            changed["spec"]["clusterIP"] = "172.30.0.99"
            api.update("services", changed)
            api.create("services", service("d"))
            api.expire_history()
        # As Store, but the relist's delete comes last: only the end of a list tells what is gone.
        assert target.wait_calls(7)[4:] == [("update", "default/a"), ("add", "default/d"), ("delete", "default/b")]
        assert store.keys() == ["default/a", "default/c", "default/d"]
        assert api.wait_for_watches("services", 1, DEADLINE)
        api.delete("services", "c")
        assert target.wait_calls(8)[-1] == ("delete", "default/c")
        assert target.deleted[-1]["spec"]["clusterIP"] == "172.30.0.10"  # the watch's own last state
        assert len(store) == 2


def calls_by_key(calls: list[tuple[str, str]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for what, key in calls:
        found.setdefault(key, []).append(what)
    return found


def test_the_lean_store_reports_what_the_caching_store_reports() -> None:
    def svc(name: str, rv: str) -> Obj:
        obj = service(name)
        obj["metadata"]["resourceVersion"] = rv
        return obj

    def feed(sink: Any) -> None:
        sink.begin_list()
        sink.list_page([svc("a", "1"), svc("b", "2")])
        sink.list_page([svc("c", "3")])
        sink.end_list("3")
        sink.update(svc("a", "4"))
        sink.add(svc("b", "5"))  # re-entering a selector: an update
        sink.delete(svc("z", "6"))  # never seen: nothing to forget
        sink.delete(svc("c", "7"))
        sink.begin_list()
        sink.list_page([svc("a", "4")])  # a list cut short, begun again
        sink.begin_list()
        sink.list_page([svc("a", "4"), svc("d", "8")])
        sink.end_list("9")

    caching, lean = Recorder(), Recorder()
    feed(Store(caching))
    feed(KeyStore(lean))
    assert (
        calls_by_key(lean.calls)
        == calls_by_key(caching.calls)
        == {
            "default/a": ["add", "update"],
            "default/b": ["add", "update", "delete"],
            "default/c": ["add", "delete"],
            "": ["synced"],
            "default/d": ["add"],
        }
    )
    assert [old["metadata"]["resourceVersion"] for old, _ in lean.updates] == ["1", "2"]
