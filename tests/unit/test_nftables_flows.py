"""Packet-flow tables over the rendered nftables table: the shared table in kproxy.testing.flows
traced through the nftables mode (every divergence from the iptables mode named with its
reason), plus affinity and IPv6 cases."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from kproxy.config import ProxyConfig, validate
from kproxy.model import IPFamily, Protocol, ServicePortName
from kproxy.proxier.nftables import names
from kproxy.proxier.nftables import render as nft
from kproxy.proxier.nftables.trace import REJECT, UNTOUCHED, Tracer
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, service
from kproxy.testing.flows import (
    BASE_CFG,
    BOTH,
    OTHER_POD,
    REMOTE_POD,
    SCENARIOS,
    V6,
    Flow,
    Scenario,
    both_endpoints,
    check,
)
from kproxy.view import family_view, node_context

HOST = ("127.0.0.1", "192.168.0.2", "::1", "fd00:192:168::2")
REMOTE_ONLY = {f"{REMOTE_POD}:80"}

_UNKNOWN_PORT = (
    REJECT,
    "upstream's nftables mode rejects traffic to a live ClusterIP on a port no Service serves "
    "(cluster-ips-check), as the IPVS mode does; the iptables mode lets it through untouched",
)
_NO_LOCALHOST = (
    UNTOUCHED,
    "no localhost NodePorts in the nftables mode, as upstream's (route_localnet is a security "
    "risk, CVE-2020-8558); the node's own stack gets the packet",
)
# (scenario, flow) -> (what the nftables mode gives instead, why)
DIVERGES: dict[tuple[str, str], tuple[set[str] | str, str]] = {
    ("clusterip", "other port untouched"): _UNKNOWN_PORT,
    ("clusterip", "udp to a tcp service untouched"): _UNKNOWN_PORT,
    ("udp and sctp", "tcp on the udp port untouched"): _UNKNOWN_PORT,
    ("nodeport", "node to localhost"): _NO_LOCALHOST,
}


def tracer_for(
    objects: Iterable[Mapping[str, Any]],
    cfg: ProxyConfig,
    family: IPFamily = IPFamily.V4,
    affinity: Mapping[str, str] | None = None,
) -> Tracer:
    state, rejected = build_state(objects, service_proxy_name=cfg.service_proxy_name)
    assert not rejected
    ctx = node_context(validate(cfg), family, state.nodes.get(cfg.node_name), HOST)
    view = family_view(state, family)
    return Tracer(nft.render(view.ports, view.endpoints, ctx), ctx.local_ips, affinity)


@pytest.mark.parametrize(
    "scenario,flow",
    [(s, f) for s in SCENARIOS for f in s.flows],
    ids=[f"{s.name}: {f.name}" for s in SCENARIOS for f in s.flows],
)
def test_flow(scenario: Scenario, flow: Flow) -> None:
    tracer = tracer_for(scenario.objects, scenario.cfg)
    instead = DIVERGES.get((scenario.name, flow.name))
    if instead is not None:
        expect, why = instead
        assert why
        flow = Flow(flow.name, flow.src, flow.dst, flow.port, expect, None, flow.proto, flow.iface)
    check(tracer, flow)


def test_session_affinity_sticks_to_the_remembered_endpoint() -> None:
    objs = [service(affinity=600), endpoint_slice(endpoints=both_endpoints())]
    spn = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    remembered = names.affinity_set(spn, REMOTE_POD, 80)
    assert tracer_for(objs, BASE_CFG).trace(OTHER_POD, "172.30.0.41", 80).endpoints == BOTH
    sticky = tracer_for(objs, BASE_CFG, affinity={remembered: OTHER_POD})
    assert sticky.trace(OTHER_POD, "172.30.0.41", 80).endpoints == REMOTE_ONLY
    assert sticky.trace("10.0.1.21", "172.30.0.41", 80).endpoints == BOTH


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
    check(tr, Flow("a v4 address means nothing to the v6 table", "fd00:10:1::20", "172.30.0.41", 80, UNTOUCHED))
