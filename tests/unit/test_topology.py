"""Endpoint selection: upstream's CategorizeEndpoints cases."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from kproxy.topology import categorize

SPN = ServicePortName("ns", "svc", "p", Protocol.TCP)
CLUSTER = ServicePort(name=SPN, port=80, cluster_ips=("172.30.0.1",))
ETP_LOCAL = replace(CLUSTER, external_policy_local=True, externally_accessible=True, node_port=30001)
ITP_LOCAL = replace(CLUSTER, internal_policy_local=True)


def ep(
    ip: str,
    node: str = "node-2",
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
    zones: tuple[str, ...] = (),
) -> Endpoint:
    return Endpoint(
        ip=ip,
        port=80,
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=node,
        zone_hints=frozenset(zones),
    )


def ips(eps: tuple[Endpoint, ...]) -> list[str]:
    return [e.ip for e in eps]


CASES = [
    ("ready only", CLUSTER, [ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=False)], ["10.0.0.1"], [], True),
    (
        "terminating fallback",
        CLUSTER,
        [ep("10.0.0.1", ready=False, terminating=True), ep("10.0.0.2", ready=False, serving=False, terminating=True)],
        ["10.0.0.1"],
        [],
        True,
    ),
    (
        "ready beats terminating",
        CLUSTER,
        [ep("10.0.0.1"), ep("10.0.0.2", ready=False, terminating=True)],
        ["10.0.0.1"],
        [],
        True,
    ),
    ("nothing serving", CLUSTER, [ep("10.0.0.2", ready=False, serving=False, terminating=True)], [], [], False),
    (
        "etp local picks local",
        ETP_LOCAL,
        [ep("10.0.1.1", node="node-1"), ep("10.0.2.1")],
        ["10.0.1.1", "10.0.2.1"],
        ["10.0.1.1"],
        True,
    ),
    ("etp local none here", ETP_LOCAL, [ep("10.0.2.1")], ["10.0.2.1"], [], True),
    (
        "etp local terminating local",
        ETP_LOCAL,
        [ep("10.0.1.1", node="node-1", ready=False, terminating=True), ep("10.0.2.1")],
        ["10.0.2.1"],
        ["10.0.1.1"],
        True,
    ),
    ("itp local none here", ITP_LOCAL, [ep("10.0.2.1")], [], [], True),
    ("zone hints used", CLUSTER, [ep("10.0.0.1", zones=("a",)), ep("10.0.0.2", zones=("b",))], ["10.0.0.1"], [], True),
    (
        "zone hint missing on one",
        CLUSTER,
        [ep("10.0.0.1", zones=("a",)), ep("10.0.0.2")],
        ["10.0.0.1", "10.0.0.2"],
        [],
        True,
    ),
    (
        "no hint for our zone",
        CLUSTER,
        [ep("10.0.0.1", zones=("b",)), ep("10.0.0.2", zones=("c",))],
        ["10.0.0.1", "10.0.0.2"],
        [],
        True,
    ),
]


@pytest.mark.parametrize("case,svc,eps,cluster,local,has_any", CASES, ids=[c[0] for c in CASES])
def test_categorize(
    case: str, svc: ServicePort, eps: list[Endpoint], cluster: list[str], local: list[str], has_any: bool
) -> None:
    sets = categorize(tuple(eps), svc, "node-1", "a")
    assert ips(sets.cluster) == cluster
    assert ips(sets.local) == local
    assert sets.has_any is has_any
    assert set(ips(sets.reachable)) == set(cluster) | set(local)
