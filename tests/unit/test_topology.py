"""Endpoint selection: upstream's CategorizeEndpoints cases (v1.35: node hints before zone
hints), each also naming the rule that chose the sets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from kproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from kproxy.topology import EndpointSets, HintsSkipped, Selection, categorize

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
    nodes: tuple[str, ...] = (),
) -> Endpoint:
    return Endpoint(
        ip=ip,
        port=80,
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=node,
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
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


# ----- hints: upstream v1.35's topologyModeFromHints, node hints before zone hints

ITP_LOCAL_NODEPORT = replace(ITP_LOCAL, externally_accessible=True, node_port=30001)
ZA, ZB, ZC = ("zone-a",), ("zone-b",), ("zone-c",)
HERE, THERE, FAR = ("node-1",), ("node-2",), ("node-3",)
S, R = Selection, HintsSkipped


@dataclass(frozen=True)
class HintCase:
    name: str
    eps: list[Endpoint]
    cluster: list[str]
    rule: Selection
    skipped: tuple[HintsSkipped, ...] = ()
    svc: ServicePort = CLUSTER
    zone: str = "zone-a"  # this node's topology.kubernetes.io/zone; the node is node-1
    local: list[str] = field(default_factory=list)
    local_rule: Selection = Selection.UNUSED
    reachable: list[str] | None = None  # default: cluster and local together
    has_any: bool = True


def four_zoned(*, ready6: bool = True, ready3: bool = True) -> list[Endpoint]:
    return [
        ep("10.1.2.3", zones=ZA, ready=ready3),
        ep("10.1.2.4", zones=ZB),
        ep("10.1.2.5", zones=ZC),
        ep("10.1.2.6", zones=ZA, ready=ready6),
    ]


HINT_CASES = [
    # Zone hints (the cases upstream has had since topology-aware hints).
    HintCase("zone hints narrow to this zone", four_zoned(), ["10.1.2.3", "10.1.2.6"], S.ZONE_HINTS),
    HintCase(
        "etp local: hints never narrow the local set",
        [
            ep("10.1.2.3", node="node-1", zones=ZA),
            ep("10.1.2.4", node="node-1", zones=ZB),
            ep("10.1.2.5", zones=ZC),
            ep("10.1.2.6", zones=ZA),
        ],
        ["10.1.2.3", "10.1.2.6"],
        S.ZONE_HINTS,
        svc=ETP_LOCAL,
        local=["10.1.2.3", "10.1.2.4"],
        local_rule=S.LOCAL_READY,
    ),
    HintCase(
        "itp local on a node port: hints never narrow the local set",
        [
            ep("10.1.2.3", node="node-1", zones=ZA),
            ep("10.1.2.4", node="node-1", zones=ZB),
            ep("10.1.2.5", zones=ZC),
            ep("10.1.2.6", zones=ZA),
        ],
        ["10.1.2.3", "10.1.2.6"],
        S.ZONE_HINTS,
        svc=ITP_LOCAL_NODEPORT,
        local=["10.1.2.3", "10.1.2.4"],
        local_rule=S.LOCAL_READY,
    ),
    HintCase(
        "node without a zone label",
        [ep("10.1.2.3", zones=ZA)],
        ["10.1.2.3"],
        S.READY,
        (R.NODE_HAS_NO_ZONE,),
        zone="",
    ),
    HintCase(
        "node in another zone", [ep("10.1.2.3", zones=ZA)], ["10.1.2.3"], S.READY, (R.NO_ZONE_HINT_HERE,), zone="zone-b"
    ),
    HintCase("an unready endpoint of this zone is not used", four_zoned(ready6=False), ["10.1.2.3"], S.ZONE_HINTS),
    HintCase(
        "only unready endpoints in this zone: every ready endpoint",
        four_zoned(ready3=False, ready6=False),
        ["10.1.2.4", "10.1.2.5"],
        S.READY,
        (R.NO_ZONE_HINT_HERE,),
    ),
    HintCase(
        "one ready endpoint missing its zone hint: every ready endpoint",
        [ep("10.1.2.3", zones=ZA), ep("10.1.2.4", zones=ZB), ep("10.1.2.5"), ep("10.1.2.6", zones=ZA)],
        ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"],
        S.READY,
        (R.ZONE_HINT_MISSING,),
    ),
    HintCase(
        "an unready endpoint missing its zone hint does not count",
        [ep("10.1.2.3", zones=ZA), ep("10.1.2.4", zones=ZB), ep("10.1.2.5", ready=False, serving=False)],
        ["10.1.2.3"],
        S.ZONE_HINTS,
    ),
    HintCase(
        "several zone hints per endpoint",
        [
            ep("10.1.2.3", zones=("zone-a", "zone-b", "zone-c")),
            ep("10.1.2.4", zones=("zone-b", "zone-c")),
            ep("10.1.2.5", zones=("zone-b", "zone-d")),
            ep("10.1.2.6", zones=("zone-c",)),
        ],
        ["10.1.2.3", "10.1.2.4", "10.1.2.6"],
        S.ZONE_HINTS,
        zone="zone-c",
    ),
    HintCase(
        "hints and localness disagree: reachable is the union",
        [
            ep("10.0.0.0", node="node-1", zones=ZA),
            ep("10.0.0.1", node="node-1", zones=ZB),
            ep("10.0.0.2", zones=ZA),
            ep("10.0.0.3", zones=ZB),
        ],
        ["10.0.0.0", "10.0.0.2"],
        S.ZONE_HINTS,
        svc=ETP_LOCAL,
        local=["10.0.0.0", "10.0.0.1"],
        local_rule=S.LOCAL_READY,
        reachable=["10.0.0.0", "10.0.0.1", "10.0.0.2"],
    ),
    HintCase(
        "terminating fallback ignores zone hints",
        [
            ep("10.1.2.3", ready=False, terminating=True, zones=ZB),
            ep("10.1.2.4", ready=False, terminating=True, zones=ZC),
        ],
        ["10.1.2.3", "10.1.2.4"],
        S.TERMINATING,
    ),
    # Node hints (PreferSameNode, GA in v1.35), honoured before zone hints. The EndpointSlice
    # controller writes both a node and a zone hint on every endpoint for PreferSameNode.
    HintCase(
        "node hints narrow to this node",
        [
            ep("10.0.1.10", node="node-1", nodes=HERE, zones=ZA),
            ep("10.0.2.10", node="node-2", nodes=THERE, zones=ZA),
            ep("10.0.3.10", node="node-3", nodes=FAR, zones=ZB),
        ],
        ["10.0.1.10"],
        S.NODE_HINTS,
    ),
    HintCase(
        "several node hints per endpoint",
        [ep("10.0.1.10", nodes=("node-2", "node-1")), ep("10.0.2.10", nodes=THERE), ep("10.0.2.11", nodes=("node-1",))],
        ["10.0.1.10", "10.0.2.11"],
        S.NODE_HINTS,
    ),
    HintCase(
        "no node hint for this node: zone hints",
        [ep("10.0.2.10", node="node-2", nodes=THERE, zones=ZA), ep("10.0.3.10", node="node-3", nodes=FAR, zones=ZB)],
        ["10.0.2.10"],
        S.ZONE_HINTS,
        (R.NO_NODE_HINT_HERE,),
    ),
    HintCase(
        "one ready endpoint missing its node hint: zone hints",
        [
            ep("10.0.1.10", node="node-1", nodes=HERE, zones=ZA),
            ep("10.0.2.10", node="node-2", zones=ZA),
            ep("10.0.3.10", node="node-3", nodes=FAR, zones=ZB),
        ],
        ["10.0.1.10", "10.0.2.10"],
        S.ZONE_HINTS,
        (R.NODE_HINT_MISSING,),
    ),
    HintCase(
        "one ready endpoint with no hint at all: every ready endpoint",
        [ep("10.0.1.10", node="node-1", nodes=HERE, zones=ZA), ep("10.0.2.10", node="node-2")],
        ["10.0.1.10", "10.0.2.10"],
        S.READY,
        (R.NODE_HINT_MISSING, R.ZONE_HINT_MISSING),
    ),
    HintCase(
        "node hints only, none for this node: every ready endpoint",
        [ep("10.0.2.10", nodes=THERE), ep("10.0.3.10", nodes=FAR)],
        ["10.0.2.10", "10.0.3.10"],
        S.READY,
        (R.NO_NODE_HINT_HERE,),
    ),
    HintCase(
        "no node hint here and no zone hint for this zone",
        [ep("10.0.2.10", nodes=THERE, zones=ZB), ep("10.0.3.10", nodes=FAR, zones=ZC)],
        ["10.0.2.10", "10.0.3.10"],
        S.READY,
        (R.NO_NODE_HINT_HERE, R.NO_ZONE_HINT_HERE),
    ),
    HintCase(
        "an unready endpoint hinted for this node does not count",
        [
            ep("10.0.1.10", node="node-1", nodes=HERE, zones=ZA, ready=False, serving=False),
            ep("10.0.2.10", node="node-2", nodes=THERE, zones=ZA),
            ep("10.0.3.10", node="node-3", nodes=FAR, zones=ZB),
        ],
        ["10.0.2.10"],
        S.ZONE_HINTS,
        (R.NO_NODE_HINT_HERE,),
    ),
    HintCase(
        "an unready endpoint missing its node hint does not count",
        [ep("10.0.1.10", node="node-1", nodes=HERE), ep("10.0.2.10", ready=False, serving=False)],
        ["10.0.1.10"],
        S.NODE_HINTS,
    ),
    HintCase(
        "terminating fallback ignores node hints",
        [
            ep("10.0.2.10", ready=False, terminating=True, nodes=THERE),
            ep("10.0.3.10", ready=False, terminating=True, nodes=FAR),
        ],
        ["10.0.2.10", "10.0.3.10"],
        S.TERMINATING,
    ),
    HintCase(
        "etp local: node hints for the cluster set, policy for the local set",
        [ep("10.0.1.10", node="node-1", nodes=HERE), ep("10.0.2.10", node="node-2", nodes=THERE)],
        ["10.0.1.10"],
        S.NODE_HINTS,
        svc=ETP_LOCAL,
        local=["10.0.1.10"],
        local_rule=S.LOCAL_READY,
    ),
    HintCase(
        "itp local ignores node hints, even odd ones",
        [ep("10.0.1.10", node="node-1", nodes=THERE), ep("10.0.2.10", node="node-2", nodes=HERE)],
        [],
        S.UNUSED,
        svc=ITP_LOCAL,
        local=["10.0.1.10"],
        local_rule=S.LOCAL_READY,
    ),
    HintCase(
        "etp local, only a terminating endpoint here",
        [ep("10.0.1.10", node="node-1", ready=False, terminating=True, nodes=HERE), ep("10.0.2.10", nodes=THERE)],
        ["10.0.2.10"],
        S.READY,
        (R.NO_NODE_HINT_HERE,),
        svc=ETP_LOCAL,
        local=["10.0.1.10"],
        local_rule=S.LOCAL_TERMINATING,
    ),
    HintCase(
        "itp local, nothing anywhere",
        [ep("10.0.1.10", node="node-1", ready=False, serving=False, nodes=HERE)],
        [],
        S.UNUSED,
        svc=ITP_LOCAL,
        local_rule=S.EMPTY,
        has_any=False,
    ),
    HintCase("nothing serving", [ep("10.0.2.10", ready=False, serving=False, nodes=THERE)], [], S.EMPTY, has_any=False),
]


@pytest.mark.parametrize("case", HINT_CASES, ids=[c.name for c in HINT_CASES])
def test_hints(case: HintCase) -> None:
    sets = categorize(tuple(case.eps), case.svc, "node-1", case.zone)
    assert (sorted(ips(sets.cluster)), sets.cluster_rule, sets.hints_skipped) == (case.cluster, case.rule, case.skipped)
    assert (sorted(ips(sets.local)), sets.local_rule) == (case.local, case.local_rule)
    reachable = case.reachable if case.reachable is not None else sorted(set(case.cluster) | set(case.local))
    assert sorted(ips(sets.reachable)) == reachable
    assert sets.has_any is case.has_any


def test_every_rule_and_reason_has_a_case() -> None:
    rules = {c.rule for c in HINT_CASES} | {c.local_rule for c in HINT_CASES}
    assert rules == set(Selection)
    assert {r for c in HINT_CASES for r in c.skipped} == set(HintsSkipped)


def test_the_rules_print_as_status_shows_them() -> None:
    sets: EndpointSets = categorize((ep("10.0.1.10", node="node-1", nodes=HERE),), ETP_LOCAL, "node-1", "zone-a")
    assert (sets.cluster_rule.value, sets.local_rule.value) == ("node-hints", "policy-local")
