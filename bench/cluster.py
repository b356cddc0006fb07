"""The benchmark's generated clusters: N Services × M endpoints, one Service and one EndpointSlice
each, and the files `kubectl get services,endpointslices -A -o yaml` (or `-o json`) would print.

One address plan for every benchmark, so that the state files, the fake API server's objects and
the in-process benchmark describe the same rules: ClusterIPs 172.30.0.0/16 (250 per /24), NodePorts
for the first 2,000 Services, endpoints in 10.0.0.0/8 spread over `node-0`..`node-{M-1}` (the
benchmark's node is `node-0`, so one endpoint of each Service is local). Up to 63,750 Services.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kproxy.testing.builders import endpoint, endpoint_slice, service

NODE = "node-0"
NODE_IP = "192.168.0.2"
MAX_SERVICES = 255 * 250
NODEPORTS = 2000


def service_obj(i: int) -> dict[str, Any]:
    ip = f"172.30.{i // 250}.{i % 250 + 1}"
    return service(name=f"svc{i}", cluster_ip=ip, type="NodePort", node_port=30000 + i if i < NODEPORTS else None)


def endpoint_ip(i: int, j: int, per_service: int) -> str:
    """The j-th endpoint of Service i: unique for up to 25 Services × 10 endpoints per /24."""
    return f"10.{1 + i // 6000}.{(i // 25) % 240}.{(i % 25) * per_service + j + 1}"


def slice_obj(i: int, per_service: int, first: str | None = None) -> dict[str, Any]:
    """Service i's EndpointSlice; `first` replaces its first endpoint's address (one endpoint
    changed, as the `kproxy run` benchmark does)."""
    ips = [endpoint_ip(i, j, per_service) for j in range(per_service)]
    if first is not None:
        ips[0] = first
    return endpoint_slice(f"svc{i}", endpoints=[endpoint(ip, f"node-{j}") for j, ip in enumerate(ips)])


def objects(services: int, per_service: int) -> list[dict[str, Any]]:
    if not 0 < services <= MAX_SERVICES or not 0 < per_service <= 10:
        raise ValueError(f"the address plan holds up to {MAX_SERVICES} Services × 10 endpoints")
    out: list[dict[str, Any]] = []
    for i in range(services):
        out.append(service_obj(i))
        out.append(slice_obj(i, per_service))
    return out


def write_state(path: Path, services: int, per_service: int, fmt: str) -> Path:
    """One `kind: List` holding every object, as kubectl prints it, in `fmt` (yaml or json)."""
    import yaml

    doc = {"apiVersion": "v1", "kind": "List", "items": objects(services, per_service), "metadata": {}}
    with path.open("w") as f:
        if fmt == "json":
            json.dump(doc, f, indent=4)  # kubectl indents JSON by four
        else:
            yaml.dump(doc, f, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)
    return path
