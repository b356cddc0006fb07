"""Packet-flow tables over the rendered iptables rules: the shared table in kproxy.testing.flows,
traced through the iptables mode, plus affinity and IPv6 cases."""

from __future__ import annotations

import pytest

from kproxy.model import IPFamily, Protocol, ServicePortName
from kproxy.proxier import names
from kproxy.testing.builders import endpoint, endpoint_slice, service
from kproxy.testing.flows import (
    BASE_CFG,
    BOTH,
    OTHER_POD,
    REMOTE_POD,
    SCENARIOS,
    UNTOUCHED,
    V6,
    Flow,
    Scenario,
    both_endpoints,
    check,
)
from kproxy.testing.scenario import tracer_for

REMOTE_ONLY = {f"{REMOTE_POD}:80"}


@pytest.mark.parametrize(
    "scenario,flow",
    [(s, f) for s in SCENARIOS for f in s.flows],
    ids=[f"{s.name}: {f.name}" for s in SCENARIOS for f in s.flows],
)
def test_flow(scenario: Scenario, flow: Flow) -> None:
    check(tracer_for(scenario.objects, scenario.cfg), flow)


def test_session_affinity_sticks_to_the_remembered_endpoint() -> None:
    objs = [service(affinity=600), endpoint_slice(endpoints=both_endpoints())]
    spn = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    sep = names.endpoint_chain(spn, f"{REMOTE_POD}:80")
    fresh = tracer_for(objs, BASE_CFG).trace(OTHER_POD, "172.30.0.41", 80)
    assert fresh.endpoints == BOTH
    sticky = tracer_for(objs, BASE_CFG, affinity={sep: OTHER_POD}).trace(OTHER_POD, "172.30.0.41", 80)
    assert sticky.endpoints == REMOTE_ONLY
    other_client = tracer_for(objs, BASE_CFG, affinity={sep: OTHER_POD}).trace("10.0.1.21", "172.30.0.41", 80)
    assert other_client.endpoints == BOTH


def test_ipv6_family() -> None:
    objs = [
        service(type="NodePort", node_port=30080, cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
        endpoint_slice(endpoints=both_endpoints()),
        endpoint_slice(
            name="svc1-v6",
            address_type="IPv6",
            endpoints=[endpoint("fd00:10:1::10", "node-1"), endpoint("fd00:10:2::10", "node-2")],
        ),
    ]
    tr = tracer_for(objs, V6, family=IPFamily.V6)
    eps6 = {"[fd00:10:1::10]:80", "[fd00:10:2::10]:80"}
    check(tr, Flow("pod to v6 cluster IP", "fd00:10:1::20", "fd00:172:30::41", 80, eps6, masq=False))
    check(tr, Flow("outside to v6 node port", "2001:db8:203::10", "fd00:192:168::2", 30080, eps6, masq=True))
    check(tr, Flow("no localhost node ports on v6", "::1", "::1", 30080, UNTOUCHED))
    check(tr, Flow("a v4 address means nothing to the v6 rules", "fd00:10:1::20", "172.30.0.41", 80, UNTOUCHED))
