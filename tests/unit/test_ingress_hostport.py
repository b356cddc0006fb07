"""hostPort, pure: pods → claims → conflicts → mappings → rules → restore plans; label selectors."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.errors import ConfigError, InvalidObject
from kproxy.hostport import rules as hr
from kproxy.hostport.syncer import is_edge, pods_of_node
from kproxy.ingress.selector import parse_selector
from kproxy.model import IPFamily, Protocol

NODE_IP = "192.168.0.2"
ADDRS4 = (NODE_IP, "127.0.0.0/8")


def pod(
    name: str = "web",
    *ports: dict[str, Any],
    ns: str = "default",
    created: str | None = "2024-01-01T00:00:00Z",
    ips: tuple[str, ...] = ("10.0.1.11",),
    phase: str = "Running",
    host_network: bool = False,
    node: str = "node-1",
    init_ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{name}"}
    if created is not None:
        meta["creationTimestamp"] = created
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "c", "ports": list(ports)}]}
    if host_network:
        spec["hostNetwork"] = True
    if init_ports is not None:
        spec["initContainers"] = [{"name": "side", "restartPolicy": "Always", "ports": init_ports}]
    return {
        "kind": "Pod",
        "metadata": meta,
        "spec": spec,
        "status": {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]},
    }


def hp(
    host_port: int, proto: str | None = None, host_ip: str | None = None, container_port: int = 80
) -> dict[str, Any]:
    out: dict[str, Any] = {"containerPort": container_port, "hostPort": host_port}
    if proto:
        out["protocol"] = proto
    if host_ip is not None:
        out["hostIP"] = host_ip
    return out


def resolve(*pods: dict[str, Any]) -> hr.Resolved:
    parsed = [p for p in (hr.parse_pod(o) for o in pods) if p is not None]
    return hr.resolve(parsed)


# --- claims ----------------------------------------------------------------------------------


def test_claim_defaults_tcp_and_every_address() -> None:
    p = hr.parse_pod(pod("web", hp(8080), {"containerPort": 9000}))
    assert p is not None
    (c,) = p.claims
    assert (c.host_ip, c.host_port, c.protocol, c.container_port) == ("", 8080, Protocol.TCP, 80)
    assert c.field == "spec.containers[0].ports[0]"


def test_pods_without_host_ports_or_finished_claim_nothing() -> None:
    assert hr.parse_pod(pod("web", {"containerPort": 80})) is None
    assert hr.parse_pod(pod("done", hp(80), phase="Succeeded")) is None
    assert hr.parse_pod(pod("dead", hp(80), phase="Failed")) is None


def test_sidecar_init_container_ports_claim_too() -> None:
    p = hr.parse_pod(pod("web", hp(80), init_ports=[hp(9100)]))
    assert p is not None
    assert [(c.field, c.host_port) for c in p.claims] == [
        ("spec.initContainers[0].ports[0]", 9100),
        ("spec.containers[0].ports[0]", 80),
    ]


@pytest.mark.parametrize(
    ("port", "field"),
    [
        pytest.param(hp(70000), "spec.containers[0].ports[0].hostPort", id="host-port-range"),
        pytest.param(hp(80, "ICMP"), "spec.containers[0].ports[0].protocol", id="protocol"),
        pytest.param(hp(80, host_ip="not-an-ip"), "spec.containers[0].ports[0].hostIP", id="host-ip"),
        pytest.param({"hostPort": 80}, "spec.containers[0].ports[0].containerPort", id="no-container-port"),
    ],
)
def test_malformed_host_port_entries_reject_the_pod_with_the_field(port: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as e:
        hr.parse_pod(pod("web", port))
    assert e.value.field == field and e.value.ref == "Pod default/web"


def test_host_network_pod_defaults_container_port_and_maps_nothing() -> None:
    r = resolve(pod("hn", {"hostPort": 80}, host_network=True), pod("later", hp(80), created="2025-01-01T00:00:00Z"))
    assert r.mappings == ()
    assert len(r.conflicts) == 1 and r.conflicts[0].loser.pod.name == "later"


# --- conflicts -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [pytest.param(1, id="older-first"), pytest.param(-1, id="older-last")])
def test_the_oldest_pod_wins_a_conflict_whatever_the_order(order: int) -> None:
    older = pod("old", hp(80), created="2023-01-01T00:00:00Z", ips=("10.0.1.11",))
    newer = pod("new", hp(80), hp(81), created="2024-01-01T00:00:00Z", ips=("10.0.1.12",))
    r = resolve(*[older, newer][::order])
    assert {(m.host_port, m.pod.name) for m in r.mappings} == {(80, "old"), (81, "new")}
    (c,) = r.conflicts
    assert (c.loser.pod.name, c.winner.pod.name) == ("new", "old")
    assert str(c) == (
        "Pod default/new: spec.containers[0].ports[0]: hostPort 80/TCP on every address is already claimed "
        "by the older Pod default/old (hostPort 80/TCP on every address); not programmed"
    )


def test_age_ties_break_on_namespace_then_name_and_missing_timestamps_count_as_newest() -> None:
    a = pod("a", hp(80), ips=("10.0.1.11",))
    b = pod("b", hp(80), ips=("10.0.1.12",))
    assert resolve(b, a).conflicts[0].loser.pod.name == "b"
    undated = pod("aa", hp(80), created=None, ips=("10.0.1.13",))
    assert resolve(undated, b).conflicts[0].loser.pod.name == "aa"


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [
        pytest.param(hp(80), hp(80), True, id="both-wildcard"),
        pytest.param(hp(80), hp(80, host_ip=NODE_IP), True, id="wildcard-covers-an-ip"),
        pytest.param(hp(80, host_ip="0.0.0.0"), hp(80, host_ip="127.0.0.1"), True, id="explicit-wildcard"),
        pytest.param(hp(80, host_ip=NODE_IP), hp(80, host_ip=NODE_IP), True, id="same-ip"),
        pytest.param(hp(80, host_ip="127.0.0.1"), hp(80, host_ip=NODE_IP), False, id="different-ips"),
        pytest.param(hp(80, "TCP"), hp(80, "UDP"), False, id="different-protocols"),
        pytest.param(hp(80, "UDP"), hp(80, "SCTP"), False, id="udp-sctp"),
        pytest.param(hp(80), hp(81), False, id="different-ports"),
    ],
)
def test_which_claims_overlap(first: dict[str, Any], second: dict[str, Any], conflict: bool) -> None:
    r = resolve(pod("a", first), pod("b", second, created="2025-01-01T00:00:00Z", ips=("10.0.1.12",)))
    assert bool(r.conflicts) is conflict


def test_conformance_same_port_different_host_ips_and_protocols() -> None:
    r = resolve(
        pod("p1", hp(54323, "TCP", "127.0.0.1"), ips=("10.0.1.11",)),
        pod("p2", hp(54323, "TCP", NODE_IP), ips=("10.0.1.12",)),
        pod("p3", hp(54323, "UDP", NODE_IP), ips=("10.0.1.13",)),
    )
    assert r.conflicts == ()
    assert {(m.host_ip, m.protocol, m.pod_ip) for m in r.mappings} == {
        ("127.0.0.1", Protocol.TCP, "10.0.1.11"),
        (NODE_IP, Protocol.TCP, "10.0.1.12"),
        (NODE_IP, Protocol.UDP, "10.0.1.13"),
    }


def test_a_duplicate_inside_one_pod_keeps_the_first() -> None:
    r = resolve(pod("web", hp(80), hp(80, container_port=81)))
    assert [m.container_port for m in r.mappings] == [80]
    assert "of this pod" in str(r.conflicts[0])


# --- mappings per family ---------------------------------------------------------------------


def test_families_follow_the_pod_ips_and_the_host_ip() -> None:
    dual = ("10.0.1.11", "fd00:10:1::11")
    r = resolve(
        pod("any", hp(80), ips=dual),
        pod("v4", hp(81, host_ip="0.0.0.0"), ips=dual),
        pod("v6", hp(82, host_ip="::"), ips=dual),
        pod("ip", hp(83, host_ip=NODE_IP), ips=dual),
    )
    got = {(m.host_port, int(m.family), m.host_ip) for m in r.mappings}
    assert got == {(80, 4, ""), (80, 6, ""), (81, 4, ""), (82, 6, ""), (83, 4, NODE_IP)}


def test_pods_without_an_ip_or_of_the_other_family_are_reported_not_mapped() -> None:
    r = resolve(pod("pending", hp(80), ips=()), pod("v6only", hp(81, host_ip=NODE_IP), ips=("fd00::11",)))
    assert r.mappings == ()
    assert r.unmapped == (
        "Pod default/pending: spec.containers[0].ports[0]: no pod IP yet",
        f"Pod default/v6only: spec.containers[0].ports[0]: hostIP {NODE_IP} has no pod IP of its family",
    )


def test_only_this_nodes_pods() -> None:
    pods = [pod("a", hp(80)), pod("b", hp(80), node="node-2"), {"kind": "Service", "spec": {"nodeName": "node-1"}}]
    assert [p["metadata"]["name"] for p in pods_of_node(pods, "node-1")] == ["a"]


# --- node addresses --------------------------------------------------------------------------


def test_node_addresses_leave_out_vip_devices_and_link_local() -> None:
    by_dev = {
        "eth0": ("192.168.0.2", "fd00:192:168::2", "fe80::1"),
        "cbr0": ("10.0.1.1",),
        "lo": ("127.0.0.1", "::1"),
        "kproxy-ipvs0": ("172.30.0.10", "fd00:172:30::10"),
        "kube-ipvs0": ("172.30.0.1",),
        "eth1": ("169.254.1.1",),
    }
    assert hr.node_addresses(by_dev, IPFamily.V4) == ("10.0.1.1", "192.168.0.2", "127.0.0.0/8")
    assert hr.node_addresses(by_dev, IPFamily.V6) == ("fd00:192:168::2",)


# --- rules -----------------------------------------------------------------------------------


def render(*pods: dict[str, Any], family: IPFamily = IPFamily.V4, addrs: tuple[str, ...] = ADDRS4) -> hr.HostPortRules:
    return hr.render(resolve(*pods).mappings, family, addrs)


def test_no_mappings_render_nothing() -> None:
    rules = render()
    assert rules.empty and rules.tables == {} and str(rules) == ""


def test_chain_names_are_stable_short_and_per_pod_instance() -> None:
    a = hr.pod_chain("default", "web", "uid-1")
    assert a == hr.pod_chain("default", "web", "uid-1")
    assert a != hr.pod_chain("default", "web", "uid-2")  # recreated pod: new chain
    assert a.startswith("KPROXY-HP-") and len(a) <= hr.CHAIN_MAX
    for name in (hr.DNAT_CHAIN, hr.PODS_CHAIN, hr.MASQ_CHAIN, hr.LOCALNET_CHAIN):
        assert name.startswith("KPROXY-") and len(name) <= hr.CHAIN_MAX


def test_rendered_rules_for_one_pod() -> None:
    rules = render(pod("web", hp(8080), hp(8080, "UDP"), hp(9090, host_ip=NODE_IP, container_port=90)))
    chain = hr.pod_chain("default", "web", "uid-web")
    nat = rules.tables["nat"]
    assert nat[hr.DNAT_CHAIN] == (
        f"-A {hr.DNAT_CHAIN} -d 192.168.0.2/32 -j {hr.PODS_CHAIN}",
        f"-A {hr.DNAT_CHAIN} -d 127.0.0.0/8 -j {hr.PODS_CHAIN}",
    )
    assert nat[hr.PODS_CHAIN] == (
        f'-A {hr.PODS_CHAIN} -m comment --comment "default/web hostports" -p tcp -m multiport --dports 8080,9090 '
        f"-j {chain}",
        f'-A {hr.PODS_CHAIN} -m comment --comment "default/web hostports" -p udp -m multiport --dports 8080 -j {chain}',
    )
    mark = "-j MARK --set-xmark 0x2000/0x2000"
    assert nat[chain] == (
        f"-A {chain} -s 10.0.1.11/32 -p tcp -m tcp --dport 8080 {mark}",
        f"-A {chain} -s 127.0.0.0/8 -p tcp -m tcp --dport 8080 {mark}",
        f"-A {chain} -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.1.11:80",
        f"-A {chain} -d 192.168.0.2/32 -s 10.0.1.11/32 -p tcp -m tcp --dport 9090 {mark}",
        f"-A {chain} -d 192.168.0.2/32 -p tcp -m tcp --dport 9090 -j DNAT --to-destination 10.0.1.11:90",
        f"-A {chain} -s 10.0.1.11/32 -p udp -m udp --dport 8080 {mark}",
        f"-A {chain} -s 127.0.0.0/8 -p udp -m udp --dport 8080 {mark}",
        f"-A {chain} -p udp -m udp --dport 8080 -j DNAT --to-destination 10.0.1.11:80",
    )
    assert [(j.table, j.chain, j.target, j.after_services) for j in rules.jumps] == [
        ("nat", "PREROUTING", hr.DNAT_CHAIN, True),
        ("nat", "OUTPUT", hr.DNAT_CHAIN, True),
        ("nat", "POSTROUTING", hr.MASQ_CHAIN, False),
        ("filter", "INPUT", hr.LOCALNET_CHAIN, False),
    ]
    assert "--dst-type LOCAL" in rules.jumps[0].spec


def test_loopback_host_ip_has_no_hairpin_rule_and_node_ip_no_localhost_rule() -> None:
    rules = render(pod("lo", hp(80, host_ip="127.0.0.1")), pod("ip", hp(81, host_ip=NODE_IP), ips=("10.0.1.12",)))
    text = str(rules)
    assert "-d 127.0.0.1/32 -s 127.0.0.0/8 -p tcp -m tcp --dport 80 -j MARK" in text
    assert "-s 10.0.1.11/32" not in text
    assert "-d 192.168.0.2/32 -s 127.0.0.0/8" not in text


def test_ipv6_has_no_localhost_rules_and_no_localnet_guard() -> None:
    rules = render(pod("web", hp(80), ips=("fd00:10:1::11",)), family=IPFamily.V6, addrs=("fd00:192:168::2",))
    text = str(rules)
    assert "DNAT --to-destination [fd00:10:1::11]:80" in text
    assert "127.0.0.0/8" not in text and "filter" not in rules.tables
    assert "-s fd00:10:1::11/128" in text


def test_multiport_groups_hold_at_most_15_ports() -> None:
    rules = render(pod("many", *[hp(p) for p in range(10000, 10020)]))
    lines = rules.tables["nat"][hr.PODS_CHAIN]
    assert len(lines) == 2
    assert lines[0].count(",") == 14 and lines[1].count(",") == 4


def test_comments_cannot_carry_anything_but_names() -> None:
    evil = pod('x"; -j ACCEPT', hp(80))
    text = str(render(evil))
    assert '"default/x -j ACCEPT hostports"' in text and '";' not in text


# --- plans -----------------------------------------------------------------------------------


def _jump_lines(rules: hr.HostPortRules, table: str) -> list[str]:
    return [j.rule for j in rules.jumps if j.table == table]


def test_first_plan_writes_chains_and_jumps() -> None:
    rules = render(pod("web", hp(80)))
    p = hr.plan(rules, hr.KernelView({}, {}), None)
    assert (
        '-A PREROUTING -m comment --comment "kproxy hostports" -m addrtype --dst-type LOCAL -j '
        "KPROXY-HOSTPORT-DNAT" in p.text
    )
    assert '-I POSTROUTING 1 -m comment --comment "kproxy hostport masquerade" -j KPROXY-HOSTPORT-MASQ' in p.text
    assert "-I INPUT 1 -j KPROXY-HOSTPORT-LOCALNET" in p.text
    assert p.text.count("COMMIT") == 2


def _kernel_after(
    rules: hr.HostPortRules, services_first: bool = True, extra: dict[str, list[str]] | None = None
) -> hr.KernelView:
    chains = {t: set(c) for t, c in rules.tables.items()}
    jumps: dict[str, list[str]] = {t: [] for t in rules.tables}
    if services_first:
        jumps["nat"] += ["-A PREROUTING -j KPROXY-SERVICES", "-A OUTPUT -j KPROXY-SERVICES"]
    for t in rules.tables:
        jumps[t] += _jump_lines(rules, t)
    for t, lines in (extra or {}).items():
        jumps[t] = jumps.get(t, []) + lines
    return hr.KernelView(chains, jumps)


def test_nothing_to_do_when_the_kernel_holds_what_was_applied() -> None:
    rules = render(pod("web", hp(80)))
    assert hr.plan(rules, _kernel_after(rules), rules).text == ""


def test_changed_rules_rewrite_our_chains_only() -> None:
    before = render(pod("web", hp(80)))
    after = render(pod("web", hp(80), hp(81)))
    p = hr.plan(after, _kernel_after(before), before)
    assert ":KPROXY-HOSTPORT-DNAT - [0:0]" in p.text and "KPROXY-SERVICES" not in p.text
    assert "-A PREROUTING" not in p.text  # the jumps are in place


def test_a_chain_someone_deleted_is_written_again() -> None:
    rules = render(pod("web", hp(80)))
    kernel = _kernel_after(rules)
    kernel.chains["nat"].discard(hr.MASQ_CHAIN)
    assert ":KPROXY-HOSTPORT-MASQ - [0:0]" in hr.plan(rules, kernel, rules).text


def test_stale_pod_chains_and_unwanted_jumps_are_deleted() -> None:
    before = render(pod("web", hp(80)), pod("gone", hp(81), ips=("10.0.1.12",)))
    after = render(pod("web", hp(80, host_ip=NODE_IP)))  # no localhost mapping: no localnet guard
    p = hr.plan(after, _kernel_after(before), before)
    gone = hr.pod_chain("default", "gone", "uid-gone")
    assert f":{gone} - [0:0]" in p.text and f"-X {gone}" in p.text
    assert "-D INPUT -j KPROXY-HOSTPORT-LOCALNET" in p.text and "-X KPROXY-HOSTPORT-LOCALNET" in p.text
    assert p.text.index("-D INPUT") < p.text.index("-X KPROXY-HOSTPORT-LOCALNET")


def test_everything_goes_when_nothing_is_mapped() -> None:
    before = render(pod("web", hp(80)))
    p = hr.plan(render(), _kernel_after(before), before)
    for chain in (hr.DNAT_CHAIN, hr.PODS_CHAIN, hr.MASQ_CHAIN, hr.LOCALNET_CHAIN):
        assert f"-X {chain}" in p.text
    assert "-D PREROUTING" in p.text and "-D OUTPUT" in p.text and "-D POSTROUTING" in p.text
    assert "-A " not in p.text and "-I " not in p.text


def test_other_owners_chains_are_never_touched() -> None:
    rules = render(pod("web", hp(80)))
    kernel = _kernel_after(rules)
    kernel.chains["nat"].update({"KPROXY-SERVICES", "KPROXY-SVC-ABC", "KUBE-SERVICES", "CNI-HOSTPORT-DNAT"})
    p = hr.plan(rules, kernel, None)
    assert "KPROXY-SVC-ABC" not in p.text and "KUBE-SERVICES" not in p.text and "CNI-" not in p.text


def test_dnat_jump_before_the_service_jump_is_moved_after_it() -> None:
    rules = render(pod("web", hp(80)))
    kernel = _kernel_after(rules, services_first=False)
    kernel.jump_rules["nat"].insert(len(kernel.jump_rules["nat"]), "-A PREROUTING -j KUBE-SERVICES")
    p = hr.plan(rules, kernel, rules)
    dnat_jump = [j for j in rules.jumps if j.chain == "PREROUTING"][0]
    assert "-D " + dnat_jump.rule[3:] in p.text and dnat_jump.rule in p.text
    # OUTPUT has no service jump at all here: left as it is.
    assert "-D OUTPUT" not in p.text


def test_duplicated_jumps_are_collapsed_to_one() -> None:
    rules = render(pod("web", hp(80)))
    masq = [j for j in rules.jumps if j.chain == "POSTROUTING"][0]
    kernel = _kernel_after(rules, extra={"nat": [masq.rule]})
    p = hr.plan(rules, kernel, rules)
    assert p.text.count("-D POSTROUTING") == 2 and p.text.count("-I POSTROUTING 1") == 1


def test_udp_ports_to_flush_are_new_or_retargeted_udp_mappings() -> None:
    before = resolve(pod("a", hp(53, "UDP"), hp(80))).mappings
    after = resolve(pod("a", hp(53, "UDP"), hp(80), hp(5353, "UDP"))).mappings
    assert hr.udp_ports_to_flush(before, after) == (5353,)
    moved = resolve(pod("b", hp(53, "UDP"), ips=("10.0.1.99",))).mappings
    assert hr.udp_ports_to_flush(before, moved) == (53,)
    assert hr.udp_ports_to_flush(after, after) == ()


# --- edge selection --------------------------------------------------------------------------


def node(labels: dict[str, str]) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": "node-1", "labels": labels}}


@pytest.mark.parametrize(
    ("selector", "labels", "match"),
    [
        ("node-role.kubernetes.io/edge", {"node-role.kubernetes.io/edge": ""}, True),
        ("node-role.kubernetes.io/edge", {}, False),
        ("!node-role.kubernetes.io/control-plane", {}, True),
        ("tier=edge", {"tier": "edge"}, True),
        ("tier==edge", {"tier": "core"}, False),
        ("tier!=core", {}, True),
        ("tier in (edge, dmz)", {"tier": "dmz"}, True),
        ("tier notin (edge,dmz)", {"tier": "dmz"}, False),
        ("tier in (edge),zone=a", {"tier": "edge", "zone": "b"}, False),
        ("", {}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], match: bool) -> None:
    sel = parse_selector(selector)
    assert sel.matches(labels) is match
    assert is_edge(node(labels), sel) is match


def test_without_the_node_object_only_the_empty_selector_matches() -> None:
    assert is_edge(None, parse_selector("")) is True
    assert is_edge(None, parse_selector("node-role.kubernetes.io/edge")) is False


@pytest.mark.parametrize("bad", ["a b", "tier in edge", "=x", "tier=ba d", "-x", "a/b/c"])
def test_bad_selectors_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_selector(bad)
