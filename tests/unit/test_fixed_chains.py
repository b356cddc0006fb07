"""The chains both modes write under the same names are one rendering (proxier/fixed_chains.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kproxy.config import ProxyConfig
from kproxy.model import IPFamily
from kproxy.proxier import names
from kproxy.proxier.fixed_chains import LOCALNET_JUMPS, fixed_chains
from kproxy.testing.builders import endpoint_slice, node, service
from kproxy.testing.flows import BASE_CFG, both_endpoints
from kproxy.testing.ipvs_scenario import render_ipvs_objects
from kproxy.testing.scenario import render_objects

OBJECTS = [node(), service(type="NodePort", node_port=30080), endpoint_slice(endpoints=both_endpoints())]
SHARED = (("nat", names.MARK_MASQ), ("filter", names.FORWARD), ("filter", names.LOCALNET_FIREWALL))


@pytest.mark.parametrize(
    "cfg",
    [
        BASE_CFG,
        replace(BASE_CFG, conntrack_tcp_liberal=True, masquerade_bit=3),
        replace(BASE_CFG, localhost_nodeports=False),
    ],
    ids=["defaults", "liberal-bit-3", "no-localhost-nodeports"],
)
@pytest.mark.parametrize("family", list(IPFamily), ids=["v4", "v6"])
def test_both_modes_write_the_same_fixed_chains_but_the_ipvs_hairpin_rule(cfg: ProxyConfig, family: IPFamily) -> None:
    iptables, ctx = render_objects(OBJECTS, cfg, family)
    ipvs, _ = render_ipvs_objects(OBJECTS, cfg, family=family)
    fixed = fixed_chains(ctx)
    for table, chain in SHARED:
        assert iptables.tables[table].get(chain) == ipvs.iptables.tables[table].get(chain)
    assert iptables.tables["filter"].get(names.LOCALNET_FIREWALL) == fixed.localnet.get(names.LOCALNET_FIREWALL)
    assert iptables.tables["nat"][names.POSTROUTING] == fixed.postrouting
    # The one difference: IPVS has no SEP chain to mark hairpin traffic in; it masquerades it first.
    head, *rest = ipvs.iptables.tables["nat"][names.POSTROUTING]
    assert tuple(rest) == fixed.postrouting and "LOOP-BACK" in head and head.endswith("-j MASQUERADE")
    guarded = family is IPFamily.V4 and cfg.localhost_nodeports
    assert bool(fixed.localnet) == guarded
    for ruleset in (iptables, ipvs.iptables):
        assert (set(LOCALNET_JUMPS) <= set(ruleset.jumps)) == guarded


def test_invalid_packets_are_dropped_unless_tcp_is_liberal() -> None:
    _, ctx = render_objects(OBJECTS, BASE_CFG)
    assert "--ctstate INVALID -j DROP" in fixed_chains(ctx).forward[0]
    assert not any("INVALID" in r for r in fixed_chains(replace(ctx, conntrack_tcp_liberal=True)).forward)
