"""The few writes the ingress module makes to the API server: Ingress status and Events.

The `kubernetes` client stays in `kproxy.sources` (the layer contract); callers hand in plain
dicts and get `ApiWriteError` for anything that failed, so a write failure is logged and
counted by the caller and never ends a sync loop.

- `patch_ingress_status` writes ``status.loadBalancer.ingress`` with a merge patch on the status
  subresource (the list is replaced as a whole, as merge patches do), nothing else.
- `event` posts a core/v1 Event about one object, named as client-go's recorder names them
  (``<object>.<unique suffix>``), with the reporting component and instance set.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any, cast

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kproxy.errors import KproxyError

Obj = dict[str, Any]


class ApiWriteError(KproxyError):
    """A write to the API server failed (the caller logs and counts it; it is retried later)."""


class ApiWriter:
    def __init__(
        self,
        configuration: k8s.Configuration,
        *,
        component: str = "kproxy-ingress",
        instance: str = "",
        timeout: float = 10.0,
    ) -> None:
        self._api = k8s.ApiClient(configuration)
        self._net = k8s.NetworkingV1Api(self._api)
        self._core = k8s.CoreV1Api(self._api)
        self.component = component
        self.instance = instance
        self._timeout = timeout

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    def patch_ingress_status(self, namespace: str, name: str, lb_ingress: list[Obj]) -> None:
        body = {"status": {"loadBalancer": {"ingress": lb_ingress or None}}}
        try:
            resp: Any = self._net.patch_namespaced_ingress_status(
                name, namespace, body, _preload_content=False, _request_timeout=self._timeout
            )
            resp.release_conn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiWriteError(f"updating the status of Ingress {namespace}/{name}: {_describe(e)}") from e

    def patch_gateway_status(self, plural: str, namespace: str, name: str, status: Obj) -> None:
        """Merge-patch the status subresource of a Gateway API object (``namespace`` "" for a
        GatewayClass). `status` is the whole status section kproxy wants there."""
        api = k8s.CustomObjectsApi(self._api)
        version = "v1beta1" if plural == "referencegrants" else "v1"
        group = "gateway.networking.k8s.io"
        body = {"status": status}
        try:
            if namespace:
                resp: Any = api.patch_namespaced_custom_object_status(
                    group,
                    version,
                    namespace,
                    plural,
                    name,
                    body,
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=self._timeout,
                )
            else:
                resp = api.patch_cluster_custom_object_status(
                    group,
                    version,
                    plural,
                    name,
                    body,
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=self._timeout,
                )
            resp.release_conn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiWriteError(f"updating the status of {plural} {namespace}/{name}: {_describe(e)}") from e

    def event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        """`involved`: kind, apiVersion, namespace, name (and uid, resourceVersion if known)."""
        namespace = str(involved.get("namespace") or "default")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{involved.get('name', 'object')}.{int(time.time() * 1e9):x}{secrets.token_hex(2)}",
                "namespace": namespace,
            },
            "involvedObject": {k: v for k, v in involved.items() if v},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.component, **({"host": self.instance} if self.instance else {})},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            # Legacy-style (no eventTime), as client-go's record.EventRecorder writes them.
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
        }
        try:
            # The body goes out as the dict it is (the client serialises dicts unchanged); the
            # client's annotation names only its model class, hence the cast.
            resp: Any = self._core.create_namespaced_event(
                namespace,
                cast("k8s.CoreV1Event", body),
                _preload_content=False,
                _request_timeout=self._timeout,
            )
            resp.release_conn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise ApiWriteError(
                f"posting an event about {involved.get('kind')} {namespace}/{involved.get('name')}: {_describe(e)}"
            ) from e


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        try:
            msg = json.loads(e.body or "{}").get("message") or e.reason
        except (ValueError, AttributeError):
            msg = e.reason
        return f"{e.status} {msg}"
    return f"{type(e).__name__}: {e}"
