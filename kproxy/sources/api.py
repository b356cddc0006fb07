"""One list of the API server, for `kproxy sync` without --state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kproxy.errors import InputError


def list_once(node_name: str, kubeconfig: str | None = None, *, master: str = "") -> list[dict[str, Any]]:
    """Services, EndpointSlices and this node's Node object, listed once.

    `master`: the API server's address, overriding the kubeconfig's (kube-proxy's --master)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    # The client's loaders are untyped; these names give them a type (as in sources.kube).
    load_kube_config: Callable[..., None] = config.load_kube_config
    load_incluster_config: Callable[..., None] = config.load_incluster_config
    configuration = client.Configuration()
    try:
        if kubeconfig:
            load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                load_incluster_config(client_configuration=configuration)
            except ConfigException:
                load_kube_config(client_configuration=configuration)
    except (ConfigException, OSError) as e:
        raise InputError(f"no usable kubeconfig: {e}") from e
    if master:
        configuration.host = master
    api = client.ApiClient(configuration)

    def items(resp: Any, kind: str) -> list[dict[str, Any]]:
        return [{**item, "kind": kind} for item in json.loads(resp.data).get("items") or []]

    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    try:
        objects = items(core.list_service_for_all_namespaces(_preload_content=False), "Service")
        objects += items(discovery.list_endpoint_slice_for_all_namespaces(_preload_content=False), "EndpointSlice")
        objects += items(core.list_node(field_selector=f"metadata.name={node_name}", _preload_content=False), "Node")
    except (ApiException, OSError) as e:
        raise InputError(f"cannot list from the API server: {e}") from e
    except Exception as e:  # urllib3 connection errors have no common public base
        raise InputError(f"cannot reach the API server: {e}") from e
    return objects
