"""`kproxy status` over the shared packet-flow scenarios, in every mode: which endpoints serve
which traffic and why (every selection rule and every reason for not using an endpoint in some
case), agreement with where the tracer sends packets, the JSON shape, text within 100 columns,
`--check`'s comparison, and the daemon's hand-over costing what changed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest

from kproxy import modes as registry
from kproxy.config import ProxyConfig, load_run_config, validate
from kproxy.daemon.services import ServiceTableFeed
from kproxy.model import IPFamily, ServicePortName
from kproxy.proxier.iptables import render as ipt
from kproxy.proxier.iptables.status import differences as ipt_differences
from kproxy.proxier.iptables.trace import Tracer
from kproxy.proxier.nftables.status import differences as nft_differences
from kproxy.state import build_state
from kproxy.status import WIDTH, KernelObject, ServiceTable, expected_objects, only_service, service_table, text
from kproxy.testing.builders import endpoint, endpoint_slice, service
from kproxy.testing.flows import BASE_CFG, EXT_IP, LOCAL_POD, NODE_IP, REMOTE_POD, SCENARIOS, ZONE_A, Scenario, spread
from kproxy.view import FamilyView, family_view, node_context

HOST = ("127.0.0.1", "192.168.0.2")
MODES = list(registry.MODES)
CFG = load_run_config({}).config

# Reasons no shared scenario needs for its packets, but that `status` must be able to give.
EXTRA = [
    Scenario(
        "itp local, only a terminating endpoint here",
        [
            service(itp="Local"),
            endpoint_slice(
                endpoints=[
                    endpoint(LOCAL_POD, "node-1", ready=False, serving=True, terminating=True),
                    endpoint(REMOTE_POD),
                ]
            ),
        ],
        [],
    ),
    Scenario(
        "zone hints for another zone only",
        [ZONE_A, service(), endpoint_slice(endpoints=[endpoint(REMOTE_POD, zone="zone-b", zone_hints=["zone-b"])])],
        [],
    ),
    Scenario(
        "a terminating endpoint beside ready ones",
        [
            service(),
            endpoint_slice(
                endpoints=[
                    endpoint(LOCAL_POD, "node-1"),
                    endpoint(REMOTE_POD, ready=False, serving=True, terminating=True),
                ]
            ),
        ],
        [],
    ),
    Scenario(
        "etp local: a terminating local endpoint beside a ready remote one",
        [
            service(type="NodePort", node_port=30080, etp="Local"),
            endpoint_slice(
                endpoints=[
                    endpoint(LOCAL_POD, "node-1", ready=False, serving=True, terminating=True),
                    endpoint(REMOTE_POD),
                ]
            ),
        ],
        [],
    ),
]


def table_of(scenario: Scenario, mode: str, family: IPFamily = IPFamily.V4) -> ServiceTable:
    state, rejected = build_state(scenario.objects, service_proxy_name=scenario.cfg.service_proxy_name)
    assert not rejected
    cfg = validate(scenario.cfg)
    ctx = node_context(cfg, family, state.nodes.get(cfg.node_name), HOST)
    implementation = registry.MODES[mode].load()
    return service_table(
        {family: (family_view(state, family), ctx)},
        lambda view, c: implementation.describe(CFG, view, c),
        mode=mode,
        source="state",
    )


ALL = [*SCENARIOS, *EXTRA]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", ALL, ids=[s.name for s in ALL])
def test_every_scenario_renders_in_every_mode_within_100_columns(scenario: Scenario, mode: str) -> None:
    table = table_of(scenario, mode).to_json()
    assert json.loads(json.dumps(table)) == table
    out = text(table)
    assert all(len(line) <= WIDTH for line in out.splitlines()), out
    for port in table["servicePorts"]:
        assert port["kernelObjects"], port["name"]  # every Service port is something in the kernel
        assert f"{port['namespace']}/{port['name']}" in out


def test_every_selection_rule_and_reason_appears_in_some_case() -> None:
    seen: set[str] = set()
    for scenario in ALL:
        for p in table_of(scenario, "iptables").ports:
            seen.update((p.cluster_rule, p.local_rule, *p.hints_skipped))
            seen.update(part for e in p.endpoints for part in e.why.split(", "))
    from kproxy.status import Unused
    from kproxy.topology import HintsSkipped, Selection

    wanted = {s.value for s in Selection} | {h.value for h in HintsSkipped} | {u.value for u in Unused}
    assert wanted - seen == set()


def _port(table: ServiceTable, name: str = "svc1") -> Any:
    return next(p for p in table.ports if p.name.name == name)


def test_prefer_same_node_says_which_endpoint_and_why_the_others_are_not_used() -> None:
    scenario = Scenario("psn", [ZONE_A, service(), endpoint_slice(endpoints=spread("PreferSameNode"))], [])
    p = _port(table_of(scenario, "nftables"))
    assert (p.cluster_rule, p.internal) == ("node-hints", "forward")
    used = {(e.ip, e.cluster, e.why) for e in p.endpoints}
    assert used == {
        (LOCAL_POD, True, "node-hints"),
        (REMOTE_POD, False, "hinted-for-other-node"),
        ("10.0.3.10", False, "hinted-for-other-node"),
    }
    missing = Scenario(
        "psn-missing", [ZONE_A, service(), endpoint_slice(endpoints=spread("PreferSameNode", unhinted=REMOTE_POD))], []
    )
    p = _port(table_of(missing, "nftables"))
    assert (p.cluster_rule, p.hints_skipped) == ("ready", ("node-hint-missing", "zone-hint-missing"))
    assert all(e.cluster for e in p.endpoints)


def test_reject_and_drop_are_told_apart() -> None:
    reject = _port(table_of(next(s for s in SCENARIOS if s.name == "no endpoints reject"), "iptables"))
    assert (reject.internal, reject.external) == ("REJECT", "REJECT")
    local = Scenario(
        "etp local none here",
        [service(type="NodePort", node_port=30080, etp="Local"), endpoint_slice(endpoints=[endpoint(REMOTE_POD)])],
        [],
    )
    p = _port(table_of(local, "iptables"))
    assert (p.internal, p.external, p.external_policy) == ("forward", "DROP", "Local")
    assert "DROP" in text(table_of(local, "iptables").to_json())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_status_agrees_with_where_packets_to_the_cluster_ip_go(scenario: Scenario) -> None:
    """The endpoints status says the ClusterIP uses are the ones the tracer's packets reach."""
    state, _ = build_state(scenario.objects, service_proxy_name=scenario.cfg.service_proxy_name)
    cfg = validate(scenario.cfg)
    ctx = node_context(cfg, IPFamily.V4, state.nodes.get(cfg.node_name), HOST)
    view = family_view(state, IPFamily.V4)
    tracer = Tracer(ipt.render(view.ports, view.endpoints, ctx), ctx.local_ips)
    table = table_of(scenario, "iptables")
    for flow in scenario.flows:
        port = next(
            (
                p
                for p in table.ports
                if flow.dst in p.cluster_ips and flow.port == p.port and p.name.protocol.lowercase == flow.proto
            ),
            None,
        )
        if port is None or flow.src == "192.168.0.2":
            continue
        got = tracer.trace(flow.src, flow.dst, flow.port, flow.proto, flow.iface)
        which = "local" if port.internal_policy == "Local" else "cluster"
        if port.internal == "forward":
            want = {f"{e.ip}:{e.port}" for e in port.endpoints if (e.local if which == "local" else e.cluster)}
            assert got.endpoints == want, flow.name
        else:
            assert got.verdicts == {port.internal.lower()}, flow.name


def test_json_shape() -> None:
    table = table_of(next(s for s in SCENARIOS if s.name == "etp local with a local endpoint"), "nftables").to_json()
    assert set(table) == {"node", "zone", "mode", "source", "lastSync", "families", "servicePorts"}
    port = table["servicePorts"][0]
    assert set(port) >= {
        "family", "namespace", "name", "portName", "protocol", "port", "clusterIPs", "externalIPs",
        "loadBalancerIPs", "nodePort", "internalTrafficPolicy", "externalTrafficPolicy", "trafficDistribution",
        "sessionAffinityTimeoutSeconds", "clusterRule", "localRule", "hintsSkipped", "internal", "external",
        "endpoints", "kernelObjects",
    }  # fmt: skip
    ep = port["endpoints"][0]
    assert set(ep) == {"ip", "port", "ready", "serving", "terminating", "node", "zone", "hints", "usedFor", "why"}
    assert set(ep["hints"]) == {"forZones", "forNodes"}
    assert only_service(table, ("ns1", "other"))["servicePorts"] == []
    assert only_service(table, ("ns1", "svc1"))["servicePorts"] == table["servicePorts"]
    objects = expected_objects(table)[4]
    assert [o.to_json() for o in objects] == port["kernelObjects"]


def test_nftables_objects_come_from_the_shared_layout_render() -> None:
    table = table_of(next(s for s in SCENARIOS if s.name == "clusterip"), "nftables")
    objs = {str(o) for o in _port(table).objects}
    assert "element service-ips-2: 172.30.0.41 . tcp . 80" in objs
    assert "element backends-tcp: 172.30.0.41 . 80 . 0 : 10.0.1.10 . 80" in objs
    assert not any(o.startswith("chain kproxy/service-") for o in objs)  # no chain of its own
    affinity = Scenario("aff", [service(affinity=600), endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1")])], [])
    kinds = {o.kind for o in _port(table_of(affinity, "nftables")).objects}
    assert {"chain", "set", "element"} <= kinds


def test_iptables_check_names_a_missing_chain_a_count_and_a_stale_chain() -> None:
    expected = [KernelObject("chain", "nat", "KPROXY-SVC-A", 2), KernelObject("chain", "nat", "KPROXY-SEP-B", 2)]
    chains = {"nat": {"KPROXY-SVC-A", "KPROXY-SEP-C", "KPROXY-SERVICES"}}
    counts = {"nat": {"KPROXY-SVC-A": 1}}
    assert ipt_differences(expected, chains, counts, complete=True) == [
        "differs: chain nat/KPROXY-SVC-A holds 1 rules, 2 expected",
        "missing: chain nat/KPROXY-SEP-B",
        "unexpected: chain nat/KPROXY-SEP-C",
    ]
    assert ipt_differences(expected[:1], chains, {"nat": {"KPROXY-SVC-A": 2}}, complete=False) == []


def test_nftables_check_reads_nft_json() -> None:
    listed: list[dict[str, Any]] = [
        {"chain": {"name": "lb-1"}},
        {"rule": {"chain": "lb-1"}},
        {"set": {"name": "service-ips-1", "elem": [{"concat": ["172.30.0.41", "tcp", 80]}]}},
        {
            "map": {
                "name": "backends-tcp",
                "elem": [[{"concat": ["172.30.0.9", 80, 0]}, {"concat": ["10.0.1.10", 80]}]],
            }
        },
        {"set": {"name": "firewall-allow", "elem": [{"concat": ["198.51.100.10", "tcp", 80, "10.0.0.1"]}]}},
    ]
    expected = [
        KernelObject("chain", "kproxy", "lb-1"),
        KernelObject("element", "service-ips-1", "172.30.0.41 . tcp . 80"),
        KernelObject("element", "backends-tcp", "172.30.0.41 . 80 . 0", value="10.0.1.10 . 80"),
        KernelObject("element", "firewall-allow", "198.51.100.10 . tcp . 80 . 10.0.0.1/32"),
    ]
    assert nft_differences(expected, listed, True, "ip kproxy") == [
        "missing: element backends-tcp: 172.30.0.41 . 80 . 0",
        "unexpected: element backends-tcp: 172.30.0.9 . 80 . 0",
    ]
    assert nft_differences(expected, None, False, "ip kproxy") == ["missing: table ip kproxy"]


# -- the daemon's hand-over ----------------------------------------------------------------------


class Counted(dict[ServicePortName, Any]):
    """A view's dict that counts walks over it: a partial hand-over must not walk it."""

    walks = 0

    def __iter__(self) -> Iterator[ServicePortName]:
        Counted.walks += 1
        return super().__iter__()

    def items(self) -> Any:
        Counted.walks += 1
        return super().items()

    def keys(self) -> Any:
        Counted.walks += 1
        return super().keys()

    def values(self) -> Any:
        Counted.walks += 1
        return super().values()


def _views(n: int, changed: Iterable[ServicePortName] | None) -> tuple[Mapping[IPFamily, FamilyView], Any]:
    objects = [service(f"s{i}", cluster_ip=f"172.30.{i // 250}.{i % 250 + 1}") for i in range(n)]
    state, _ = build_state(objects)
    view = family_view(state, IPFamily.V4)
    ctx = node_context(validate(BASE_CFG), IPFamily.V4, None, HOST)
    fv = FamilyView(Counted(view.ports), Counted(view.endpoints), None if changed is None else frozenset(changed))
    return {IPFamily.V4: fv}, {IPFamily.V4: ctx}


def test_the_daemon_hands_over_only_what_changed_and_nothing_a_failed_sync_staged() -> None:
    feed = ServiceTableFeed("iptables", lambda view, ctx: {})
    views, contexts = _views(300, None)
    feed.staged(views)
    feed.synced(views, contexts, 1_700_000_000.0)
    assert len(feed.to_json()["servicePorts"]) == 300  # type: ignore[arg-type]
    name = next(iter(dict.keys(views[IPFamily.V4].ports)))
    one = ServicePortName(name.namespace, "s0", name.port, name.protocol)
    # A partial sync: the view says one Service changed (it was deleted); the rest is not walked.
    partial, _ = _views(300, [one])
    dict.pop(partial[IPFamily.V4].ports, one)
    Counted.walks = 0
    feed.staged(partial)
    feed.synced(partial, contexts, 1_700_000_001.0)
    assert Counted.walks == 0
    table = feed.to_json()
    assert len(table["servicePorts"]) == 299  # type: ignore[arg-type]
    assert table["lastSync"] == "2023-11-14T22:13:21Z"
    # Staged but never synced (the sync failed): still shown as last programmed.
    again, _ = _views(300, [one])
    feed.staged(again)
    assert len(feed.to_json()["servicePorts"]) == 299  # type: ignore[arg-type]
    feed.synced(again, contexts, 1_700_000_002.0)  # the retry succeeded: the staged change is handed over
    assert len(feed.to_json()["servicePorts"]) == 300  # type: ignore[arg-type]


def test_the_daemons_answer_is_kept_until_the_next_hand_over_and_one_service_is_described_alone() -> None:
    described: list[int] = []  # the size of each view `describe` was given

    def describe(view: FamilyView, ctx: Any) -> dict[ServicePortName, tuple[KernelObject, ...]]:
        described.append(len(view.ports))
        return {}

    feed = ServiceTableFeed("iptables", describe)
    views, contexts = _views(300, None)
    feed.staged(views)
    feed.synced(views, contexts, 1_700_000_000.0)
    first = feed.response({})
    assert first.status == 200 and len(json.loads(first.body)["servicePorts"]) == 300
    assert feed.response({}).body == first.body and described == [300]  # kept: not rendered again
    one = feed.response({"service": ["ns1/s7"]})
    assert [p["name"] for p in json.loads(one.body)["servicePorts"]] == ["s7"] and described == [300, 1]
    feed.staged(views)
    feed.synced(views, contexts, 1_700_000_001.0)  # a hand-over: the kept answer is stale
    assert json.loads(feed.response({}).body)["lastSync"] == "2023-11-14T22:13:21Z" and described[-1] == 300
    for bad in (["s7"], ["ns1/s7", "ns1/s8"], ["ns1/s7/x"]):
        assert feed.response({"service": bad}).status == 400


def test_v6_and_unused_config_fields() -> None:
    cfg = ProxyConfig(node_name="node-1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"))
    objs = [
        service(cluster_ip=["172.30.0.41", "fd00:172:30::41"]),
        endpoint_slice(name="v6", address_type="IPv6", endpoints=[endpoint("fd00:10:1::10", "node-1")]),
    ]
    table = table_of(Scenario("v6", objs, [], cfg), "nftables", IPFamily.V6)
    out = text(table.to_json())
    assert "[fd00:172:30::41]:80 (cluster)" in out and "[fd00:10:1::10]:80" in out


# -- the IPVS mode: what status describes is what the proxier programs -------------------------


def _ipvs_node(objs: list[dict[str, Any]]) -> tuple[Any, FamilyView, Any]:
    """A proxier over fakes after two syncs of `objs` (the second sees the VIPs it bound), the
    view, and the node context as the daemon builds it: every address of the namespace, those
    on kproxy-ipvs0 included (`local_addresses` does not tell them apart)."""
    from kproxy.proxier.ipvs.proxier import IpvsProxier
    from kproxy.testing.fakeiptables import FakeIptables
    from kproxy.testing.ipvs_fakes import FakeDummy, FakeIpset, FakeIpvs

    fake_ipt = FakeIptables()
    proxier = IpvsProxier(
        IPFamily.V4, CFG.ipvs, ipvs=FakeIpvs(), ipset=FakeIpset(fake_ipt), iptables=fake_ipt, device=FakeDummy(),
        sysctl=lambda k, v: False, kernel=(6, 1),
    )  # fmt: skip
    state, rejected = build_state(objs)
    assert not rejected
    view = family_view(state, IPFamily.V4)
    for _ in range(2):
        proxier.sync(view, node_context(validate(BASE_CFG), IPFamily.V4, None, HOST))
    host = (*HOST, *sorted(proxier.device.addresses()))
    return proxier, view, node_context(validate(BASE_CFG), IPFamily.V4, None, host)


def _ipvs_servers(proxier: Any) -> set[str]:
    from kproxy.proxier.ipvs import render as pv
    from kproxy.proxier.ipvs.status import vs_name

    return {vs_name(s.protocol.value, pv.fmt_addr(s.ip, s.port)) for s in proxier.ipvs.services()}


def _ipvs_check(proxier: Any, objects: list[KernelObject], host: Iterable[str]) -> list[str]:
    from kproxy.proxier.ipvs.status import check

    ours = set(host) | proxier.device.addresses()
    return check(objects, IPFamily.V4, ours, proxier.ipvs, proxier.ipset, proxier.iptables, complete=True)


def test_ipvs_status_leaves_the_dummy_device_addresses_out_of_the_node_addresses() -> None:
    """A NodePort's virtual servers go on node addresses; the VIPs the IPVS mode binds to
    kproxy-ipvs0 (an external IP here) are local addresses too, but the proxier renders without
    them. Status must as well, or it lists a NodePort virtual server on the external IP that no
    sync writes, and `--check` calls it missing on a healthy node."""
    from kproxy.proxier.ipvs.status import VS, describe

    objs = [
        service(type="NodePort", node_port=30080),
        endpoint_slice(),
        service("ext", cluster_ip="172.30.0.42", external_ips=[EXT_IP]),
        endpoint_slice("ext"),
    ]
    proxier, view, ctx = _ipvs_node(objs)
    assert EXT_IP in ctx.local_ips
    bound = proxier.device.addresses()
    objects = [o for objs_ in describe(CFG.ipvs, view, ctx, bound).values() for o in objs_]
    assert {o.name for o in objects if o.kind == VS} == _ipvs_servers(proxier)
    assert _ipvs_check(proxier, objects, ctx.local_ips) == []
    # Narrowed to one Service (`--service`), the other Services' ClusterIPs stay out too.
    one = {n: p for n, p in view.ports.items() if n.name == "svc1"}
    narrowed = describe(CFG.ipvs, FamilyView(one, view.endpoints), ctx, bound)
    assert {o.name for objs_ in narrowed.values() for o in objs_ if o.kind == VS} == {
        "TCP 172.30.0.41:80",
        f"TCP {NODE_IP}:30080",
    }


def test_the_ipvs_mode_reads_the_dummy_devices_addresses_for_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from kproxy.backends.dummy import DummyDevice

    proxier, view, ctx = _ipvs_node([service(type="NodePort", node_port=30080), endpoint_slice(),
                                     service("ext", cluster_ip="172.30.0.42", external_ips=[EXT_IP])])  # fmt: skip
    monkeypatch.setattr(DummyDevice, "addresses", lambda self, family=None: proxier.device.addresses(family))
    described = registry.MODES["ipvs"].load().describe(CFG, view, ctx)
    names = {o.name for objs_ in described.values() for o in objs_ if o.kind == "virtual-server"}
    assert names == _ipvs_servers(proxier)


def test_ipvs_check_names_a_real_server_and_an_ipset_entry_removed_by_hand() -> None:
    from kproxy.model import Protocol
    from kproxy.proxier.ipvs.status import describe

    proxier, view, ctx = _ipvs_node([service(), endpoint_slice()])
    objects = [o for objs_ in describe(CFG.ipvs, view, ctx, proxier.device.addresses()).values() for o in objs_]
    assert _ipvs_check(proxier, objects, ctx.local_ips) == []
    proxier.ipvs.delete_dest(Protocol.TCP, "172.30.0.41", 80, "10.0.2.10", 80)
    proxier.ipset.restore("del KPROXY-CLUSTER-IP 172.30.0.41,tcp:80\n")
    assert _ipvs_check(proxier, objects, ctx.local_ips) == [
        "missing: real server 10.0.2.10:80 of TCP 172.30.0.41:80",
        "missing: ipset entry KPROXY-CLUSTER-IP: 172.30.0.41,tcp:80",
    ]
    proxier.ipvs.delete_service(Protocol.TCP, "172.30.0.41", 80)
    assert _ipvs_check(proxier, objects, ctx.local_ips)[0] == "missing: virtual server TCP 172.30.0.41:80"
