"""The IPVS mode without a kernel: rendered state, packet-flow tables, plans, and the proxier over
fakes.

The flow table is tests/unit/test_iptables_flows.py's, case for case, traced through the IPVS
mode's hooks (kproxy.proxier.ipvs.trace). Where the IPVS mode cannot give the iptables mode's
result the case says so (`differs=`) and why; every other case expects exactly what the iptables
mode expects. The test IP plan: node-1 192.168.0.2 with pods 10.0.1.0/24, node-2's pods
10.0.2.0/24, cluster CIDR 10.0.0.0/8, outside clients 203.0.113.0/24, LB IPs 198.51.100.0/24.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kproxy.config import SCHEDULERS, IpvsConfig, ProxyConfig, validate, validate_ipvs_config
from kproxy.errors import BackendError, ConfigError
from kproxy.model import IPFamily, Protocol
from kproxy.node import NodeContext
from kproxy.proxier import names
from kproxy.proxier.iptables.trace import UNTOUCHED
from kproxy.proxier.ipvs import plan as pvp
from kproxy.proxier.ipvs import render as pv
from kproxy.proxier.ipvs.proxier import IpvsProxier
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.testing.fakeiptables import FakeIptables
from kproxy.testing.flows import (
    BASE_CFG,
    BOTH,
    EXT_IP,
    LB_IP,
    LOCAL_POD,
    LOCAL_POD2,
    NODE_IP,
    OTHER_POD,
    REMOTE_POD,
    SCENARIOS,
    Flow,
    Scenario,
    both_endpoints,
    check,
)
from kproxy.testing.ipvs_fakes import FakeDummy, FakeIpset, FakeIpvs
from kproxy.testing.ipvs_scenario import ipvs_tracer_for, render_ipvs_objects
from kproxy.view import family_view, node_context

CIP = "172.30.0.41"
LOCAL_ONLY = {f"{LOCAL_POD}:80"}
REMOTE_ONLY = {f"{REMOTE_POD}:80"}
TCP = Protocol.TCP


@pytest.mark.parametrize(
    "scenario,flow",
    [(s, f) for s in SCENARIOS for f in s.flows],
    ids=[f"{s.name}: {f.name}" for s in SCENARIOS for f in s.flows],
)
def test_flow(scenario: Scenario, flow: Flow) -> None:
    check(ipvs_tracer_for(scenario.objects, scenario.cfg), flow, mode="ipvs")


def test_every_difference_from_the_iptables_mode_is_explained() -> None:
    differing = [(s.name, f.name) for s in SCENARIOS for f in s.flows if f.ipvs is not None]
    assert all(f.ipvs_why for s in SCENARIOS for f in s.flows if f.ipvs is not None)
    assert differing == [
        ("clusterip", "other port untouched"),
        ("clusterip", "udp to a tcp service untouched"),
        ("nodeport", "node to localhost"),
        ("etp and itp both local", "pod to LB is short-circuited to every endpoint"),
        ("udp and sctp", "tcp on the udp port untouched"),
    ]


def test_node_with_a_vip_source_is_masqueraded_without_a_detector() -> None:
    # Only in the IPVS mode is a VIP a local address the node may pick as a source.
    objs = [service(), endpoint_slice(endpoints=both_endpoints())]
    cfg = replace(BASE_CFG, cluster_cidrs=())
    check(ipvs_tracer_for(objs, cfg), Flow("VIP source", CIP, CIP, 80, BOTH, masq=True), mode="ipvs")


def test_session_affinity_is_ipvs_persistence() -> None:
    objs = [service(affinity=600), endpoint_slice(endpoints=both_endpoints())]
    desired, _ = render_ipvs_objects(objs, BASE_CFG)
    vs = desired.virtual_servers[(TCP, CIP, 80)]
    assert vs.persistent and vs.timeout == 600
    assert vs.header() == f"TCP  {CIP}:80 rr persistent 600"
    fresh = ipvs_tracer_for(objs, BASE_CFG).trace(OTHER_POD, CIP, 80)
    assert fresh.endpoints == BOTH
    pinned = {(f"{CIP}:80", OTHER_POD): f"{REMOTE_POD}:80"}
    sticky = ipvs_tracer_for(objs, BASE_CFG, affinity=pinned).trace(OTHER_POD, CIP, 80)
    assert sticky.endpoints == REMOTE_ONLY
    other_client = ipvs_tracer_for(objs, BASE_CFG, affinity=pinned).trace("10.0.1.21", CIP, 80)
    assert other_client.endpoints == BOTH


V6 = ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"))
V6_OBJS = [
    service(type="NodePort", node_port=30080, cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
    endpoint_slice(endpoints=both_endpoints()),
    endpoint_slice(
        name="svc1-v6",
        address_type="IPv6",
        endpoints=[endpoint("fd00:10:1::10", "node-1"), endpoint("fd00:10:2::10", "node-2")],
    ),
]


def test_ipv6_family() -> None:
    tr = ipvs_tracer_for(V6_OBJS, V6, family=IPFamily.V6)
    eps6 = {"[fd00:10:1::10]:80", "[fd00:10:2::10]:80"}
    check(tr, Flow("pod to v6 cluster IP", "fd00:10:1::20", "fd00:172:30::41", 80, eps6, masq=False), mode="ipvs")
    check(
        tr, Flow("outside to v6 node port", "2001:db8:203::10", "fd00:192:168::2", 30080, eps6, masq=True), mode="ipvs"
    )
    check(tr, Flow("no localhost node ports on v6", "::1", "::1", 30080, UNTOUCHED), mode="ipvs")
    check(
        tr,
        Flow("a v4 address means nothing to the v6 rules", "fd00:10:1::20", "172.30.0.41", 80, UNTOUCHED),
        mode="ipvs",
    )


def test_ipv6_sets_are_prefixed_and_typed_inet6() -> None:
    desired, _ = render_ipvs_objects(V6_OBJS, V6, family=IPFamily.V6)
    assert all(n.startswith("KPROXY-6-") for n in desired.ipsets)
    assert "family inet6" in desired.ipsets["KPROXY-6-CLUSTER-IP"].create_line()
    assert desired.ipsets["KPROXY-6-CLUSTER-IP"].entries == {"fd00:172:30::41,tcp:80"}
    text = str(desired)
    assert "TCP  [fd00:172:30::41]:80 rr" in text and "-> [fd00:10:1::10]:80" in text
    assert "--match-set KPROXY-6-CLUSTER-IP dst,dst ! -s fd00:10::/32" in text
    assert "fd00:172:30::41/128" in text


# ----------------------------------------------------------------------------------------------
# The rendered state, table by table


def _vs(objs: list[dict], cfg: ProxyConfig = BASE_CFG, **kw) -> dict[tuple, set[str]]:  # type: ignore[no-untyped-def]
    desired, _ = render_ipvs_objects(objs, cfg, **kw)
    return {k: {rs.addr for rs in v.real_servers} for k, v in desired.virtual_servers.items()}


RENDER_CASES = [
    pytest.param(
        [service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], external_ips=[EXT_IP]),
         endpoint_slice(endpoints=both_endpoints())],
        {(TCP, CIP, 80): BOTH, (TCP, LB_IP, 80): BOTH, (TCP, EXT_IP, 80): BOTH, (TCP, NODE_IP, 30080): BOTH},
        id="every address of a LoadBalancer gets a VS; not 127.0.0.1",
    ),
    pytest.param(
        [service(type="NodePort", node_port=30080, etp="Local"), endpoint_slice(endpoints=both_endpoints())],
        {(TCP, CIP, 80): BOTH, (TCP, NODE_IP, 30080): LOCAL_ONLY},
        id="eTP Local: local real servers on external VSs only",
    ),
    pytest.param(
        [service(itp="Local", type="NodePort", node_port=30080), endpoint_slice(endpoints=both_endpoints())],
        {(TCP, CIP, 80): LOCAL_ONLY, (TCP, NODE_IP, 30080): BOTH},
        id="iTP Local: local real servers on the ClusterIP VS only",
    ),
    pytest.param(
        [service(type="NodePort", node_port=30080, etp="Local"), endpoint_slice(endpoints=[endpoint(REMOTE_POD)])],
        {(TCP, CIP, 80): REMOTE_ONLY},
        id="a Local policy with no local endpoint: no VS (DROP in filter)",
    ),
    pytest.param(
        [service(type="NodePort", node_port=30080), endpoint_slice(endpoints=[])],
        {(TCP, CIP, 80): set(), (TCP, NODE_IP, 30080): set()},
        id="no endpoints: VSs without real servers (REJECT in filter)",
    ),
    pytest.param(
        [service(etp="Local", type="NodePort", node_port=30080),
         endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1", ready=False, serving=True, terminating=True),
                                   endpoint(REMOTE_POD)])],
        {(TCP, CIP, 80): REMOTE_ONLY, (TCP, NODE_IP, 30080): LOCAL_ONLY},
        id="terminating fallback applies to the local set alone",
    ),
    pytest.param(
        [service(), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1", zone_hints=["a"]),
                                              endpoint(REMOTE_POD, zone_hints=["b"])]),
         node(labels={"topology.kubernetes.io/zone": "a"})],
        {(TCP, CIP, 80): LOCAL_ONLY},
        id="zone hints narrow the cluster set",
    ),
]  # fmt: skip


@pytest.mark.parametrize("objs,want", RENDER_CASES)
def test_virtual_servers(objs: list[dict], want: dict) -> None:
    assert _vs(objs) == want


def test_nodeport_addresses_skip_loopback_link_local_and_vips() -> None:
    objs = [service(type="NodePort", node_port=30080, external_ips=["192.168.0.9"]), endpoint_slice()]
    hosts = ("127.0.0.1", "192.168.0.2", "192.168.0.9", "::1", "fe80::1", "fd00:192:168::2")
    got = _vs(objs, host_addrs=hosts)
    # 192.168.0.9 is an external IP that happens to be a node address: it keeps its own VS on
    # port 80 and is not bound to the dummy device.
    assert set(got) == {(TCP, CIP, 80), (TCP, "192.168.0.9", 80), (TCP, NODE_IP, 30080), (TCP, "192.168.0.9", 30080)}
    desired, _ = render_ipvs_objects(objs, BASE_CFG, host_addrs=hosts)
    assert desired.addresses == {CIP}
    v6 = render_ipvs_objects(
        [
            service(type="NodePort", node_port=30080, cluster_ip=["fd00:172:30::41"]),
            endpoint_slice(address_type="IPv6", endpoints=[endpoint("fd00:10:2::10")]),
        ],
        V6,
        family=IPFamily.V6,
        host_addrs=hosts,
    )[0]
    assert {k[1] for k in v6.virtual_servers} == {"fd00:172:30::41", "fd00:192:168::2"}


def test_dummy_addresses_are_not_node_ips() -> None:
    ctx = NodeContext(
        IPFamily.V4, "node-1", local_ips=("127.0.0.1", "172.30.0.41", "192.168.0.2"), node_ip="172.30.0.41"
    )
    fixed = pv.without_addresses(ctx, {"172.30.0.41"})
    assert fixed.local_ips == ("127.0.0.1", "192.168.0.2") and fixed.node_ip == "192.168.0.2"


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_every_upstream_scheduler_is_accepted(sched: str) -> None:
    desired, _ = render_ipvs_objects([service(), endpoint_slice()], BASE_CFG, IpvsConfig(scheduler=sched))
    vs = desired.virtual_servers[(TCP, CIP, 80)]
    assert vs.scheduler == sched
    # mh hashes on the port too, as upstream sets IP_VS_SVC_F_SCHED_MH_PORT.
    assert vs.flags == (pv.SVC_F_SCHED2 if sched == "mh" else 0)
    if sched == "mh":
        assert vs.header() == f"TCP  {CIP}:80 mh (mh-port)"


@pytest.mark.parametrize(
    "cfg,message",
    [
        (IpvsConfig(scheduler="fastest"), "--ipvs-scheduler"),
        (IpvsConfig(tcp_timeout=-1), "--ipvs-tcp-timeout"),
        (IpvsConfig(exclude_cidrs=("10.0.0.0/33",)), "--ipvs-exclude-cidrs"),
    ],
)
def test_bad_ipvs_config_is_refused(cfg: IpvsConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_ipvs_config(cfg)


def test_ipset_names_fit_the_kernel_and_are_owned_per_family() -> None:
    for base in pv.SET_TYPES:
        for fam in IPFamily:
            n = pv.set_name(base, fam)
            assert n.startswith("KPROXY-") and len(n) <= names.IPSET_NAME_MAX
            assert pv.owns_set(n, fam) and not pv.owns_set(n, IPFamily.V6 if fam is IPFamily.V4 else IPFamily.V4)
    assert not pv.owns_set("KUBE-CLUSTER-IP", IPFamily.V4)
    assert pv.owns_set(pv.tmp_set_name("KPROXY-6-LOOP-BACK", IPFamily.V6), IPFamily.V6)


def test_sets_hold_what_the_rules_match() -> None:
    objs = [
        service(type="LoadBalancer", node_port=30080, lb_ips=[LB_IP], source_ranges=["192.168.0.0/24", "203.0.113.7/32"],
                hc_node_port=32000, etp="Local"),
        endpoint_slice(endpoints=both_endpoints()),
        service(name="empty", cluster_ip="172.30.0.42"),
        endpoint_slice("empty", endpoints=[]),
    ]  # fmt: skip
    desired, _ = render_ipvs_objects(objs, BASE_CFG)
    s = {n.removeprefix("KPROXY-"): set(v.entries) for n, v in desired.ipsets.items()}
    assert s["CLUSTER-IP"] == {f"{CIP},tcp:80", "172.30.0.42,tcp:80"}
    assert s["EXTERNAL-LOCAL"] == {f"{LB_IP},tcp:80", f"{NODE_IP},tcp:30080"} and s["EXTERNAL"] == set()
    assert s["LOAD-BALANCER-FW"] == {f"{LB_IP},tcp:80"}
    assert s["LB-SOURCE-CIDR"] == {f"{LB_IP},tcp:80,192.168.0.0/24", f"{LB_IP},tcp:80,203.0.113.7"}
    assert s["LB-SOURCE-IP"] == {f"{LB_IP},tcp:80,{LB_IP}"}
    assert s["LOOP-BACK"] == {f"{LOCAL_POD},tcp:80,{LOCAL_POD}", f"{REMOTE_POD},tcp:80,{REMOTE_POD}"}
    assert s["IPVS-IPS"] == {CIP, "172.30.0.42", LB_IP} == set(desired.addresses)
    assert s["NO-ENDPOINTS"] == {"172.30.0.42,tcp:80"} and s["NO-LOCAL-ENDPOINTS"] == set()
    assert s["HEALTH-CHECK-NODE-PORT"] == {"32000"}


GOLDEN_TABLE = """\
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  172.30.0.41:80 rr persistent 10800
  -> 10.0.1.10:8080               Masq    1      0          0         
  -> 10.0.2.10:8080               Masq    1      0          0         
TCP  192.168.0.2:30080 rr persistent 10800
  -> 10.0.1.10:8080               Masq    1      0          0         
  -> 10.0.2.10:8080               Masq    1      0          0         
UDP  172.30.0.53:53 rr
SCTP 172.30.0.54:9000 rr
"""  # noqa: W291 (ipvsadm pads its columns)


def test_dry_run_prints_ipvsadm_form_then_addresses_sets_and_rules() -> None:
    objs = [
        service(type="NodePort", node_port=30080, affinity=10800),
        endpoint_slice(endpoints=both_endpoints(), port=8080),
        service(name="dns", cluster_ip="172.30.0.53", port=53, protocol="UDP"),
        endpoint_slice("dns", endpoints=[], port=53, port_name="p53", protocol="UDP"),
        service(name="sig", cluster_ip="172.30.0.54", port=9000, protocol="SCTP"),
        endpoint_slice("sig", endpoints=[], port=9000, port_name="p9000", protocol="SCTP"),
    ]
    desired, _ = render_ipvs_objects(objs, BASE_CFG)
    text = str(desired)
    assert text.startswith(GOLDEN_TABLE)
    assert "# kproxy-ipvs0 addresses\n172.30.0.41/32\n172.30.0.53/32\n172.30.0.54/32\n" in text
    assert (
        "add KPROXY-NO-ENDPOINTS 172.30.0.53,udp:53" in text and "add KPROXY-NO-ENDPOINTS 172.30.0.54,sctp:9000" in text
    )
    assert "\n*mangle\n" in text and "\n*filter\n" in text and "\n*nat\n" in text
    assert str(render_ipvs_objects(objs, BASE_CFG)[0]) == text, "stable"


def test_canonical_entries_read_back_like_written() -> None:
    assert pv.canonical_entry("hash:ip,port", "172.30.0.41,TCP:80") == "172.30.0.41,tcp:80"
    assert pv.canonical_entry("hash:ip,port,net", "1.2.3.4,tcp:80,5.6.7.8/32") == "1.2.3.4,tcp:80,5.6.7.8"
    assert pv.canonical_entry("hash:ip,port", "fd00:0:0::41,udp:53") == "fd00::41,udp:53"
    assert pv.canonical_entry("bitmap:port", "32000") == "32000"
    assert pv.canonical_entry("bitmap:port", "tcp:32000") == "32000"


# ----------------------------------------------------------------------------------------------
# Plans


def _vsv(ip: str, *rss: tuple[str, int], port: int = 80, proto: Protocol = TCP, **kw) -> pv.VirtualServer:  # type: ignore[no-untyped-def]
    return pv.VirtualServer(proto, ip, port, real_servers=tuple(pv.RealServer(i, p) for i, p in rss), **kw)


def _ks(vs: pv.VirtualServer, *dests: pvp.KernelDest, scheduler: str = "rr", flags: int = 2) -> pvp.KernelService:
    return pvp.KernelService(vs.protocol, vs.ip, vs.port, scheduler, flags, vs.timeout, tuple(dests))


def test_ipvs_plan_writes_only_the_difference() -> None:
    want = _vsv(CIP, ("10.0.1.10", 80), ("10.0.2.11", 80))
    have = _ks(want, pvp.KernelDest("10.0.1.10", 80, 1), pvp.KernelDest("10.0.2.10", 80, 1))
    plan = pvp.ipvs_plan({want.key: want}, {want.key: have}, [want.key])
    assert [str(o) for o in plan.ops] == [
        f"add_dest TCP {CIP}:80 -> 10.0.2.11:80 weight 1",
        f"delete_dest TCP {CIP}:80 -> 10.0.2.10:80 weight 0",
    ]


def test_ipvs_plan_graceful_termination() -> None:
    tcp = _vsv(CIP, ("10.0.1.10", 80))
    udp = _vsv(CIP, ("10.0.1.10", 53), port=53, proto=Protocol.UDP)
    current = {
        tcp.key: _ks(tcp, pvp.KernelDest("10.0.1.10", 80, 1), pvp.KernelDest("10.0.2.10", 80, 1, active=1)),
        udp.key: _ks(udp, pvp.KernelDest("10.0.1.10", 53, 1), pvp.KernelDest("10.0.2.10", 53, 1, inactive=3)),
    }
    plan = pvp.ipvs_plan({tcp.key: tcp, udp.key: udp}, current, list(current))
    assert [str(o) for o in plan.ops] == [
        f"update_dest TCP {CIP}:80 -> 10.0.2.10:80 weight 0",
        f"delete_dest UDP {CIP}:53 -> 10.0.2.10:53 weight 0",
    ]
    assert plan.draining == ((tcp.key, ("10.0.2.10", 80)),)
    # Still draining at weight 0: nothing written. Drained: deleted. Wanted again: weight 1.
    current[tcp.key] = _ks(tcp, pvp.KernelDest("10.0.1.10", 80, 1), pvp.KernelDest("10.0.2.10", 80, 0, inactive=1))
    assert pvp.ipvs_plan({tcp.key: tcp}, {tcp.key: current[tcp.key]}, [tcp.key]).ops == ()
    current[tcp.key] = _ks(tcp, pvp.KernelDest("10.0.1.10", 80, 1), pvp.KernelDest("10.0.2.10", 80, 0))
    assert [o.op for o in pvp.ipvs_plan({tcp.key: tcp}, current, [tcp.key]).ops] == ["delete_dest"]
    back = _vsv(CIP, ("10.0.1.10", 80), ("10.0.2.10", 80))
    ops = pvp.ipvs_plan({tcp.key: back}, {tcp.key: current[tcp.key]}, [tcp.key]).ops
    assert [str(o) for o in ops] == [f"update_dest TCP {CIP}:80 -> 10.0.2.10:80 weight 1"]


def test_ipvs_plan_services_added_changed_and_removed() -> None:
    keep = _vsv(CIP, ("10.0.1.10", 80), scheduler="rr", flags=pv.SVC_F_PERSISTENT, timeout=60)
    new = _vsv("172.30.0.42", ("10.0.1.10", 80))
    gone = _vsv("172.30.0.43")
    theirs = _vsv("10.96.0.1", port=443)
    current = {
        keep.key: _ks(keep, pvp.KernelDest("10.0.1.10", 80, 1), flags=2),  # not persistent yet
        gone.key: _ks(gone),
        theirs.key: _ks(theirs),
    }
    plan = pvp.ipvs_plan({keep.key: keep, new.key: new}, current, [keep.key, gone.key])
    assert [str(o) for o in plan.early] == [
        f"update_service TCP {CIP}:80",
        "add_service TCP 172.30.0.42:80",
        "add_dest TCP 172.30.0.42:80 -> 10.0.1.10:80 weight 1",
    ]
    assert [str(o) for o in plan.late] == ["delete_service TCP 172.30.0.43:80"]


def test_ipvs_plan_leaves_unread_dests_alone() -> None:
    want = _vsv(CIP, ("10.0.1.10", 80))
    have = pvp.KernelService(TCP, CIP, 80, "rr", 2, 0, None)
    assert pvp.ipvs_plan({want.key: want}, {want.key: have}, [want.key]).ops == ()


def _kset(s: pv.IpSet, entries: set[str], maxelem: int | None = None) -> pvp.KernelSet:
    fam = "" if s.type.startswith("bitmap") else "inet"
    return pvp.KernelSet(s.name, s.type, fam, maxelem or s.maxelem, frozenset(entries))


def test_ipset_plan_in_place_swap_and_destroy() -> None:
    many = {f"10.0.0.{i},tcp:80" for i in range(40)}
    want = pv.IpSet("KPROXY-CLUSTER-IP", "hash:ip,port", IPFamily.V4, frozenset(many))
    loop = pv.IpSet("KPROXY-LOOP-BACK", "hash:ip,port,ip", IPFamily.V4, frozenset({"10.0.1.10,tcp:80,10.0.1.10"}))
    existing = {
        want.name: _kset(want, (many - {"10.0.0.1,tcp:80"}) | {"10.0.9.9,tcp:80"}),
        loop.name: _kset(loop, set(), maxelem=1024),
        "KPROXY-OLD": pvp.KernelSet("KPROXY-OLD", "hash:ip", "inet", 65536, frozenset()),
        "KPROXY-6-LOOP-BACK": pvp.KernelSet("KPROXY-6-LOOP-BACK", "hash:ip,port,ip", "inet6", 65536, frozenset()),
    }
    plan = pvp.ipset_plan({want.name: want, loop.name: loop}, existing, IPFamily.V4)
    tmp = pv.tmp_set_name(loop.name, IPFamily.V4)
    assert plan.text.splitlines() == [
        "add KPROXY-CLUSTER-IP 10.0.0.1,tcp:80",
        "del KPROXY-CLUSTER-IP 10.0.9.9,tcp:80",
        f"create {tmp} hash:ip,port,ip family inet hashsize 1024 maxelem 65536",
        f"add {tmp} 10.0.1.10,tcp:80,10.0.1.10",
        f"swap {tmp} KPROXY-LOOP-BACK",
        f"destroy {tmp}",
    ]
    assert plan.destroy == ("KPROXY-OLD",), "the IPv6 proxier's sets are not ours"
    assert plan.rebuilt == ("KPROXY-LOOP-BACK",)
    assert pvp.ipset_plan({want.name: want}, {want.name: _kset(want, set(many))}, IPFamily.V4).empty


def test_ipset_plan_refuses_a_set_of_another_type() -> None:
    want = pv.IpSet("KPROXY-IPVS-IPS", "hash:ip", IPFamily.V4, frozenset())
    with pytest.raises(ValueError, match="cleanup"):
        pvp.ipset_plan(
            {want.name: want},
            {want.name: pvp.KernelSet(want.name, "hash:net", "inet", 65536, frozenset())},
            IPFamily.V4,
        )


def test_iptables_plan_removes_the_iptables_modes_leftovers() -> None:
    desired, _ = render_ipvs_objects([service(), endpoint_slice()], BASE_CFG)
    saved_chains = {"mangle": set(), "filter": {"KPROXY-EXTERNAL-SERVICES", "KPROXY-SERVICES"}, "nat": {"KPROXY-SVC-X"}}
    saved_jumps = {
        "filter": [
            '-A INPUT -m conntrack --ctstate NEW -m comment --comment "x" -j KPROXY-EXTERNAL-SERVICES',
            '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "x" -j KPROXY-SERVICES',
        ],
        "nat": [],
        "mangle": [],
    }
    plan = pv.iptables_plan(desired.iptables, None, saved_chains, saved_jumps)
    lines = plan.text.splitlines()
    assert '-D INPUT -m conntrack --ctstate NEW -m comment --comment "x" -j KPROXY-EXTERNAL-SERVICES' in lines
    assert '-D FORWARD -m conntrack --ctstate NEW -m comment --comment "x" -j KPROXY-SERVICES' in lines
    assert "-X KPROXY-EXTERNAL-SERVICES" in lines and "-X KPROXY-SVC-X" in lines
    assert plan.deleted == {"mangle": 0, "filter": 1, "nat": 1}
    again = pv.iptables_plan(
        desired.iptables,
        desired.iptables.tables,
        {t: set(c) for t, c in desired.iptables.tables.items()},
        {"mangle": [], "filter": [], "nat": []},
    )
    assert all(line.startswith(("*", "-I", "COMMIT")) for line in again.text.splitlines()), "only the missing jumps"


# ----------------------------------------------------------------------------------------------
# The proxier over fakes


def _jumps(ipt: FakeIptables, table: str) -> list[tuple[str, str]]:
    builtin = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "OUTPUT", "POSTROUTING"),
               "mangle": ("PREROUTING", "OUTPUT")}[table]  # fmt: skip
    return [(b, r.rsplit("-j ", 1)[1].split(" ", 1)[0]) for b in builtin for r in ipt.rules(table, b)]


@pytest.fixture
def rig():  # type: ignore[no-untyped-def]
    ipt = FakeIptables()
    rig = dict(ipvs=FakeIpvs(), ipset=FakeIpset(ipt), iptables=ipt, device=FakeDummy(), sysctls={})
    return rig


def _proxier(rig, cfg: IpvsConfig = pv.DEFAULT_CONFIG, kernel=(6, 1)) -> IpvsProxier:  # type: ignore[no-untyped-def]
    sysctls = rig["sysctls"]
    return IpvsProxier(
        IPFamily.V4, cfg, ipvs=rig["ipvs"], ipset=rig["ipset"], iptables=rig["iptables"], device=rig["device"],
        sysctl=lambda k, v: sysctls.__setitem__(k, v) is None, kernel=kernel,
    )  # fmt: skip


def _inputs(objs: list[dict], cfg: ProxyConfig = BASE_CFG):  # type: ignore[no-untyped-def]
    state, rejected = build_state(objs)
    assert not rejected
    ctx = node_context(validate(cfg), IPFamily.V4, state.nodes.get("node-1"), ("127.0.0.1", NODE_IP))
    return family_view(state, IPFamily.V4), ctx


def _np(*eps: dict) -> list[dict]:
    return [service(type="NodePort", node_port=30080), endpoint_slice(endpoints=list(eps))]


def test_first_sync_programs_everything_and_a_repeat_writes_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    r = p.sync(*_inputs(_np(*both_endpoints())))
    assert r.full and rig["ipvs"].writes == {"add_service": 2, "add_dest": 4}
    assert rig["device"].addrs == {CIP}
    assert ("INPUT", names.SERVICES) in _jumps(rig["iptables"], "filter")
    assert ("PREROUTING", pv.PROXY_FIREWALL) in _jumps(rig["iptables"], "mangle")
    assert rig["ipset"].sets["KPROXY-CLUSTER-IP"].entries == {f"{CIP},tcp:80"}
    restores = (len(rig["iptables"].transactions), len(rig["ipset"].restores))
    r = p.sync(*_inputs(_np(*both_endpoints())))
    assert not r.full and r.ipvs_ops == () and r.ipset_lines == 0
    assert (len(rig["iptables"].transactions), len(rig["ipset"].restores)) == restores
    assert rig["ipvs"].reads["dests"] == 0, "a partial sync reads the real servers of changed VSs only"
    p.sync(*_inputs(_np(*both_endpoints())), full=True)
    assert rig["ipvs"].reads["dests"] == 2, "a full sync reads them all"


def test_one_endpoint_change_touches_only_that_real_server(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    objs = [service(), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1"), endpoint(LOCAL_POD2, "node-1")])]
    p.sync(*_inputs(objs))
    before = rig["ipvs"].writes.copy()
    iptables_restores = len(rig["iptables"].transactions)
    objs = [service(), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1"), endpoint(REMOTE_POD)])]
    r = p.sync(*_inputs(objs))
    assert rig["ipvs"].writes - before == {"add_dest": 1, "delete_dest": 1}
    assert r.ipvs_ops == (
        f"add_dest TCP {CIP}:80 -> {REMOTE_POD}:80 weight 1",
        f"delete_dest TCP {CIP}:80 -> {LOCAL_POD2}:80 weight 0",
    )
    assert len(rig["iptables"].transactions) == iptables_restores, "no rule changed: no iptables-restore"
    assert rig["ipset"].restores[-1].splitlines() == [
        f"add KPROXY-LOOP-BACK {REMOTE_POD},tcp:80,{REMOTE_POD}",
        f"del KPROXY-LOOP-BACK {LOCAL_POD2},tcp:80,{LOCAL_POD2}",
    ]
    assert rig["device"].writes == {"add_link": 1, "add_address": 1}


def test_graceful_termination_across_syncs_and_drain(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    key = (TCP, CIP, 80)
    p.sync(*_inputs([service(), endpoint_slice(endpoints=both_endpoints())]))
    rig["ipvs"].set_connections(key, (REMOTE_POD, 80), active=1)
    r = p.sync(*_inputs([service(), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1")])]))
    assert r.draining == 1 and rig["ipvs"].real_servers(key) == {(LOCAL_POD, 80): 1, (REMOTE_POD, 80): 0}
    assert p.drain() == 1, "still connected"
    rig["ipvs"].set_connections(key, (REMOTE_POD, 80), active=0, inactive=1)
    r = p.sync(*_inputs([service(), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1")])]))
    assert r.ipvs_ops == () and r.draining == 1, "a later sync keeps checking it"
    rig["ipvs"].set_connections(key, (REMOTE_POD, 80), active=0, inactive=0)
    assert p.drain() == 0 and rig["ipvs"].real_servers(key) == {(LOCAL_POD, 80): 1}


def test_udp_real_servers_go_at_once(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    key = (Protocol.UDP, CIP, 53)

    def objs(*e: dict) -> list[dict]:
        return [
            service(protocol="UDP", port=53),
            endpoint_slice(endpoints=list(e), protocol="UDP", port=53, port_name="p53"),
        ]

    p.sync(*_inputs(objs(*both_endpoints())))
    rig["ipvs"].set_connections(key, (REMOTE_POD, 53), active=0, inactive=5)
    r = p.sync(*_inputs(objs(endpoint(LOCAL_POD, "node-1"))))
    assert r.draining == 0 and rig["ipvs"].real_servers(key) == {(LOCAL_POD, 53): 1}


def test_removed_services_leave_no_trace(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    p.sync(
        *_inputs(
            _np(*both_endpoints())
            + [
                service(
                    name="lb",
                    type="LoadBalancer",
                    cluster_ip="172.30.0.42",
                    lb_ips=[LB_IP],
                    node_port=30081,
                    etp="Local",
                ),
                endpoint_slice("lb", endpoints=both_endpoints()),
            ]
        )
    )
    assert rig["device"].addrs == {CIP, "172.30.0.42", LB_IP}
    assert any(c.startswith("KPROXY-EXT-") for c in rig["iptables"].tables["nat"])
    p.sync(*_inputs(_np(*both_endpoints())))
    assert set(rig["ipvs"].table) == {(TCP, CIP, 80), (TCP, NODE_IP, 30080)}
    assert rig["device"].addrs == {CIP}
    assert not any(c.startswith("KPROXY-EXT-") for c in rig["iptables"].tables["nat"])


def test_virtual_servers_in_exclude_cidrs_are_someone_elses(rig) -> None:  # type: ignore[no-untyped-def]
    rig["ipvs"].add_service(TCP, "10.96.7.7", 443, "rr", 0, 0)
    rig["ipvs"].add_service(TCP, "10.97.7.7", 443, "rr", 0, 0)
    p = _proxier(rig, IpvsConfig(exclude_cidrs=("10.96.0.0/16",)))
    p.sync(*_inputs([]))
    assert set(rig["ipvs"].table) == {(TCP, "10.96.7.7", 443)}


def test_a_refused_write_makes_the_next_sync_full(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    p.sync(*_inputs(_np(*both_endpoints())))
    rig["ipvs"].delete_service(TCP, CIP, 80)  # someone else removes it behind our back
    rig["ipvs"].add_service(TCP, CIP, 80, "wlc", 0, 0)
    rig["ipvs"].add_dest(TCP, CIP, 80, "10.9.9.9", 80)
    r = p.sync(*_inputs(_np(*both_endpoints())))
    assert not r.full
    # The partial sync saw the settings change (the service list is always read) but not the
    # dests; a full sync repairs those too.
    assert rig["ipvs"].table[(TCP, CIP, 80)].scheduler == "rr"
    r = p.sync(*_inputs(_np(*both_endpoints())), full=True)
    assert set(rig["ipvs"].real_servers((TCP, CIP, 80))) == {(LOCAL_POD, 80), (REMOTE_POD, 80)}
    rig["iptables"].restore("*filter\n:KPROXY-SERVICES - [0:0]\nCOMMIT\n")
    broken = rig["ipset"]
    broken.restore = lambda text: (_ for _ in ()).throw(BackendError("ipset restore refused"))  # type: ignore[method-assign]
    with pytest.raises(BackendError):
        p.sync(*_inputs(_np(endpoint(LOCAL_POD, "node-1"))))
    assert p._last is None, "the next sync is full"


@pytest.mark.parametrize("kernel,reuse", [((4, 19), True), ((5, 9), False), ((6, 1), False), ((3, 10), False)])
def test_setup_sysctls_as_upstream(rig, kernel: tuple[int, int], reuse: bool) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig, IpvsConfig(strict_arp=True, tcp_timeout=900, udp_timeout=30), kernel=kernel)
    p.sync(*_inputs([]))
    s = rig["sysctls"]
    assert {k: s[k] for k in ("net/ipv4/vs/conntrack", "net/ipv4/vs/expire_nodest_conn",
            "net/ipv4/vs/expire_quiescent_template", "net/ipv4/ip_forward")} == dict.fromkeys(
        ("net/ipv4/vs/conntrack", "net/ipv4/vs/expire_nodest_conn", "net/ipv4/vs/expire_quiescent_template",
         "net/ipv4/ip_forward"), "1")  # fmt: skip
    assert ("net/ipv4/vs/conn_reuse_mode" in s) is reuse
    assert s["net/ipv4/conf/all/arp_ignore"] == "1" and s["net/ipv4/conf/all/arp_announce"] == "2"
    assert rig["ipvs"].timeouts == (900, 120, 30)


def test_dry_run_touches_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    r = p.sync(*_inputs(_np(*both_endpoints())), dry_run=True)
    assert r.payload.startswith(pv.IPVSADM_TITLE)
    assert not rig["ipvs"].table and not rig["ipset"].sets and not rig["device"].present and not rig["sysctls"]


def test_unchanged_sets_are_not_read_back_on_a_partial_sync(rig) -> None:  # type: ignore[no-untyped-def]
    p = _proxier(rig)
    reads = []
    save = rig["ipset"].save
    rig["ipset"].save = lambda owned: reads.append(1) or save(owned)  # type: ignore[method-assign]
    p.sync(*_inputs(_np(*both_endpoints())))
    p.sync(*_inputs(_np(*both_endpoints())))
    assert len(reads) == 1
    p.sync(*_inputs(_np(*both_endpoints())), full=True)
    assert len(reads) == 2


def test_switching_modes_both_ways_in_one_namespace(rig) -> None:  # type: ignore[no-untyped-def]
    from kproxy.proxier.iptables.proxier import IptablesProxier

    objs = [*_np(*both_endpoints()), service(name="lb", cluster_ip="172.30.0.42", type="LoadBalancer",
            lb_ips=[LB_IP], node_port=30081, etp="Local", source_ranges=["203.0.113.0/25"]),
            endpoint_slice("lb", endpoints=both_endpoints())]  # fmt: skip
    ipt_mode = IptablesProxier(rig["iptables"])  # type: ignore[arg-type]
    ipt_mode.sync(*_inputs(objs))
    _proxier(rig).sync(*_inputs(objs))  # the iptables mode's chains and jumps are cleared away
    assert not any(c.startswith(("KPROXY-SVC-", "KPROXY-SEP-")) for c in rig["iptables"].tables["nat"])
    assert ("INPUT", names.EXTERNAL_SERVICES) not in _jumps(rig["iptables"], "filter")
    # And back: the iptables mode meets no jump of ours to a chain it deletes.
    IptablesProxier(rig["iptables"]).sync(*_inputs(objs))  # type: ignore[arg-type]
    assert any(c.startswith("KPROXY-SEP-") for c in rig["iptables"].tables["nat"])


def test_only_the_service_proxiers_chains_are_collected(rig) -> None:  # type: ignore[no-untyped-def]
    from kproxy.testing.fakeiptables import ensure_canary

    ipt = rig["iptables"]
    ensure_canary(ipt)
    ipt.restore(
        "*nat\n:KPROXY-HOSTPORT-DNAT - [0:0]\n-I PREROUTING 1 -j KPROXY-HOSTPORT-DNAT\n"
        "-A KPROXY-HOSTPORT-DNAT -j RETURN\nCOMMIT\n"
    )
    _proxier(rig).sync(*_inputs(_np(*both_endpoints())))
    assert ipt.rules("nat", "KPROXY-HOSTPORT-DNAT") == ["-j RETURN"]
    assert ("PREROUTING", "KPROXY-HOSTPORT-DNAT") in _jumps(ipt, "nat")
    assert all(ipt.rules(t, "KPROXY-PROXY-CANARY") for t in ("mangle", "nat", "filter"))
