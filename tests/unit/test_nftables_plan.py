"""The nftables plan over the fake nft: full and partial syncs leave the same table, a partial
sync writes only the changed Service's objects, and the fake refuses what nft refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kproxy.config import ProxyConfig, validate
from kproxy.errors import BackendError
from kproxy.model import IPFamily
from kproxy.proxier.nftables import render as nft
from kproxy.proxier.nftables.proxier import NftablesProxier
from kproxy.proxier.nftables.trace import Tracer
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, service
from kproxy.testing.fakenft import FakeNft
from kproxy.testing.flows import BASE_CFG, LB_IP, LOCAL_POD, OTHER_POD, REMOTE_POD
from kproxy.view import FamilyView, family_view, node_context

HOST = ("127.0.0.1", "192.168.0.2")


def view_of(objects: list[dict[str, Any]]) -> tuple[FamilyView, Any]:
    state, rejected = build_state(objects, service_proxy_name="")
    assert not rejected
    ctx = node_context(validate(BASE_CFG), IPFamily.V4, None, HOST)
    return family_view(state, IPFamily.V4), ctx


def cluster(svc2_eps: list[str], *, affinity: int | None = None, with_svc3: bool = True) -> list[dict[str, Any]]:
    objs = [
        service(),
        endpoint_slice(endpoints=[endpoint(LOCAL_POD, "node-1"), endpoint(REMOTE_POD, "node-2")]),
        service(
            "svc2",
            cluster_ip="172.30.0.42",
            type="LoadBalancer",
            node_port=30082,
            lb_ips=[LB_IP],
            source_ranges=["203.0.113.0/25"],
            affinity=affinity,
        ),
        endpoint_slice("svc2", endpoints=[endpoint(ip, "node-2") for ip in svc2_eps]),
    ]
    if with_svc3:
        objs += [
            service("svc3", cluster_ip="172.30.0.43", etp="Local", type="NodePort", node_port=30083),
            endpoint_slice("svc3", endpoints=[endpoint("10.0.2.30", "node-2")]),
        ]
    return objs


def state_of(fake: FakeNft) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, str]]]:
    tb = fake.table(IPFamily.V4)
    return {n: tuple(r) for n, r in tb.chains.items()}, {n: dict(e) for n, e in tb.elements.items()}


@pytest.mark.parametrize("affinity", [None, 600])
def test_partial_syncs_leave_what_a_full_sync_leaves(affinity: int | None) -> None:
    steps = [
        cluster(["10.0.2.20", "10.0.2.21"], affinity=affinity),
        cluster(["10.0.2.20", "10.0.2.22"], affinity=affinity),  # one endpoint replaced
        cluster([], affinity=affinity),  # no endpoints: REJECT
        cluster(["10.0.2.23"], affinity=affinity, with_svc3=False),  # a Service gone
        cluster(["10.0.2.23", "10.0.1.10"], affinity=affinity),  # back, and an endpoint shared
    ]
    incremental, proxier = FakeNft(), None
    proxier = NftablesProxier(incremental)
    for objs in steps:
        view, ctx = view_of(objs)
        proxier.sync(view, ctx)
        fresh = FakeNft()
        NftablesProxier(fresh).sync(view, ctx)
        assert state_of(incremental) == state_of(fresh)
    assert sum(1 for s in incremental.scripts if "delete table" in s) == 1, "only the first sync is full"


def plain(*svc4_eps: str) -> list[dict[str, Any]]:
    """svc4, a plain NodePort Service (the shared layout: elements only), beside `cluster`'s."""
    return [
        *cluster(["10.0.2.20"]),
        service("svc4", cluster_ip="172.30.0.44", type="NodePort", node_port=30084),
        endpoint_slice("svc4", endpoints=[endpoint(ip, "node-2") for ip in svc4_eps]),
    ]


@pytest.mark.parametrize("told", [False, True], ids=["compared", "told-what-changed"])
def test_endpoint_counts_coming_and_going_leave_what_a_full_sync_leaves(told: bool) -> None:
    """Told which ports changed (as the daemon's incremental view does), the render takes over
    the last render's dicts in place; either way the table is what a full sync writes."""
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    for eps in (["10.0.2.40", "10.0.2.41"], ["10.0.2.40", "10.0.2.41", "10.0.2.42"], ["10.0.2.42"], [], ["10.0.2.43"]):
        view, ctx = view_of(plain(*eps))
        if told:
            view = FamilyView(view.ports, view.endpoints, frozenset(n for n in view.ports if n.name == "svc4"))
        result = proxier.sync(view, ctx)
        tb = fake.table(IPFamily.V4)
        # The object counts the metrics export are kept up to date, not recounted.
        assert result.objects == {
            "chain": len(tb.chains),
            "rule": sum(len(r) for r in tb.chains.values()),
            "element": sum(len(e) for e in tb.elements.values()),
        }
        fresh = FakeNft()
        NftablesProxier(fresh).sync(view, ctx)
        assert state_of(fake) == state_of(fresh)
        tr = Tracer(fake.table(IPFamily.V4).view(), HOST)
        want = {f"{ip}:80" for ip in eps}
        assert tr.trace(OTHER_POD, "172.30.0.44", 80).endpoints == want
        assert tr.trace("203.0.113.10", "192.168.0.2", 30084).endpoints == want
    chains, _ = state_of(fake)
    # Only the counts in use keep a balancing chain: svc1 (2 endpoints), svc2 and svc4 (1).
    assert sorted(c for c in chains if "lb-" in c) == ["lb-1", "lb-2", "nodeport-lb-1"]


def test_a_plain_services_endpoint_change_writes_its_elements_only() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    proxier.sync(*view_of(plain("10.0.2.40", "10.0.2.41")))
    result = proxier.sync(*view_of(plain("10.0.2.40", "10.0.2.49")))
    assert fake.scripts[-1].splitlines() == [
        "delete element ip kproxy backends-tcp { 172.30.0.44 . 80 . 1 }",
        "delete element ip kproxy hairpin-ips { 10.0.2.41 . 10.0.2.41 }",
        "delete element ip kproxy nodeport-backends-tcp { 30084 . 1 }",
        "add element ip kproxy backends-tcp { 172.30.0.44 . 80 . 1 : 10.0.2.49 . 80 }",
        "add element ip kproxy hairpin-ips { 10.0.2.49 . 10.0.2.49 }",
        "add element ip kproxy nodeport-backends-tcp { 30084 . 1 : 10.0.2.49 . 80 }",
    ]
    assert not result.full and result.chains_written == 0


def test_one_endpoint_change_writes_only_that_services_objects() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    proxier.sync(*view_of(cluster(["10.0.2.20", "10.0.2.21"])))
    result = proxier.sync(*view_of(cluster(["10.0.2.20", "10.0.2.22"])))
    script = fake.scripts[-1]
    assert not result.full
    assert all("ns1/svc2/" in line or "10.0.2.2" in line for line in script.splitlines()), script
    assert "svc1" not in script and "svc3" not in script and "service-ips" not in script
    assert result.chains_written == 1 and result.chains_deleted == 0
    # The hairpin pair of the old endpoint goes, the new one's comes.
    assert "delete element ip kproxy hairpin-ips { 10.0.2.21 . 10.0.2.21 }" in script
    assert "add element ip kproxy hairpin-ips { 10.0.2.22 . 10.0.2.22 }" in script


def test_nothing_changed_writes_nothing() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    proxier.sync(*view_of(cluster(["10.0.2.20"])))
    result = proxier.sync(*view_of(cluster(["10.0.2.20"])))
    assert result.payload == "" and len(fake.scripts) == 1


def test_a_refused_transaction_keeps_the_table_and_makes_the_next_sync_full() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    proxier.sync(*view_of(cluster(["10.0.2.20"])))
    before = state_of(fake)
    fake.fail_next = "injected"
    with pytest.raises(BackendError):
        proxier.sync(*view_of(cluster(["10.0.2.21"])))
    assert state_of(fake) == before
    result = proxier.sync(*view_of(cluster(["10.0.2.21"])))
    assert result.full


def test_a_deleted_table_is_back_after_a_full_sync() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    view, ctx = view_of(cluster(["10.0.2.20"]))
    proxier.sync(view, ctx)
    fake.delete_table("ip")
    # A partial sync that does not verify meets the missing table and is refused; the retry is full.
    with pytest.raises(BackendError):
        proxier.sync(*view_of(cluster(["10.0.2.21"])), verify=False)
    proxier.sync(view, ctx)
    tr = Tracer(fake.table(IPFamily.V4).view(), HOST)
    assert tr.trace(OTHER_POD, "172.30.0.41", 80).endpoints == {f"{LOCAL_POD}:80", f"{REMOTE_POD}:80"}


def test_a_verifying_sync_finds_a_deleted_table_and_writes_it_whole() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    view, ctx = view_of(cluster(["10.0.2.20"]))
    proxier.sync(view, ctx)
    fake.delete_table("ip")
    result = proxier.sync(*view_of(cluster(["10.0.2.21"])))
    assert result.full
    assert [r.what for r in result.repairs] == ["table ip kproxy deleted"]
    tr = Tracer(fake.table(IPFamily.V4).view(), HOST)
    assert tr.trace(OTHER_POD, "172.30.0.41", 80).endpoints == {f"{LOCAL_POD}:80", f"{REMOTE_POD}:80"}


@pytest.mark.parametrize(
    ("change", "name", "found"),
    [
        ("flush table", "", "table ip kproxy flushed"),
        ("flush chain", "services", "chain services: 0 rules"),
        ("flush map", "service-ips", "map service-ips: 0 elements"),
    ],
)
def test_a_verifying_sync_finds_what_was_flushed(change: str, name: str, found: str) -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    view, ctx = view_of(cluster(["10.0.2.20"]))
    proxier.sync(view, ctx)
    fake.tamper(IPFamily.V4, change, name)
    result = proxier.sync(view, ctx)
    assert result.full
    assert [r.what for r in result.repairs if r.what.startswith(found)], result.repairs
    assert not proxier.sync(view, ctx).repairs


def test_an_untouched_table_is_checked_by_its_generation_alone() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    view, ctx = view_of(cluster(["10.0.2.20"]))
    proxier.sync(view, ctx)
    proxier.sync(*view_of(cluster(["10.0.2.21"])))
    assert fake.probes == 0
    fake.apply("add table ip other")  # someone else's transaction: our counts are read once
    assert not proxier.sync(*view_of(cluster(["10.0.2.21"]))).repairs
    assert not proxier.sync(*view_of(cluster(["10.0.2.21"]))).repairs
    assert fake.probes == 1


def test_traced_kernel_state_after_partial_syncs() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(fake)
    proxier.sync(*view_of(cluster(["10.0.2.20"])))
    proxier.sync(*view_of(cluster(["10.0.2.21", "10.0.2.22"])))
    tr = Tracer(fake.table(IPFamily.V4).view(), HOST)
    assert tr.trace("203.0.113.10", LB_IP, 80).endpoints == {"10.0.2.21:80", "10.0.2.22:80"}
    assert tr.trace("203.0.113.200", LB_IP, 80).verdicts == {"drop"}


@pytest.mark.parametrize(
    "script,refusal",
    [
        ("add table ip kproxy\nadd chain ip kproxy a\nadd rule ip kproxy a jump b\n", "chain b"),
        ("add table ip kproxy\nadd element ip kproxy m { 1 }\n", "set m"),
        (
            "add table ip kproxy\nadd chain ip kproxy a\nadd chain ip kproxy b\n"
            "add map ip kproxy m { type inet_service : verdict ; }\n"
            "add element ip kproxy m { 80 : goto a }\nadd element ip kproxy m { 80 : goto b }\n",
            "File exists",
        ),
        ("add table ip kproxy\nadd set ip kproxy s { type inet_service ; }\ndelete element ip kproxy s { 80 }\n", "80"),
        (
            "add table ip kproxy\nadd chain ip kproxy a\nadd chain ip kproxy b\nadd rule ip kproxy a goto b\n"
            "delete chain ip kproxy b\n",
            "busy",
        ),
        ("delete table ip kproxy\n", "No such file"),
    ],
    ids=[
        "jump to a missing chain",
        "element of a missing map",
        "duplicate key",
        "missing element",
        "referenced chain",
        "missing table",
    ],
)
def test_the_fake_refuses_what_nft_refuses(script: str, refusal: str) -> None:
    fake = FakeNft()
    with pytest.raises(BackendError) as e:
        fake.apply(script)
    assert refusal in str(e.value)
    assert fake.tables == {}


def test_the_fake_accepts_an_identical_element_twice() -> None:
    fake = FakeNft()
    fake.apply(
        "add table ip kproxy\nadd chain ip kproxy a\nadd map ip kproxy m { type inet_service : verdict ; }\n"
        "add element ip kproxy m { 80 : goto a }\nadd element ip kproxy m { 80 : goto a }\n"
    )
    assert fake.table(IPFamily.V4).elements["m"] == {"80": "goto a"}


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("family", [IPFamily.V4, IPFamily.V6])
def test_golden_reference_layout(family: IPFamily) -> None:
    """Upstream's reference example rendered as one full nft transaction (both families)."""
    objs = [
        service("svc1", "ns1", cluster_ip=["172.30.0.41", "fd00:172:30::41"], affinity=10800),
        endpoint_slice("svc1", "ns1", endpoints=[endpoint("10.180.0.1"), endpoint("10.180.0.2")]),
        endpoint_slice("svc1-v6", "ns1", address_type="IPv6", endpoints=[endpoint("fd00:10:180::1")]),
        service("svc2", "ns2", type="NodePort", cluster_ip="172.30.0.42", node_port=3001),
        endpoint_slice("svc2", "ns2", endpoints=[endpoint("10.180.0.3")]),
        service(
            "svc3",
            "ns3",
            type="LoadBalancer",
            cluster_ip="172.30.0.43",
            node_port=3003,
            etp="Local",
            hc_node_port=30000,
            lb_ips=["1.2.3.4"],
            source_ranges=["203.0.113.0/25"],
        ),
        endpoint_slice("svc3", "ns3", endpoints=[endpoint("10.180.0.4", "test-node"), endpoint("10.180.2.1")]),
    ]
    state, _ = build_state(objs, service_proxy_name="")
    cfg = validate(ProxyConfig(node_name="test-node", cluster_cidrs=("10.0.0.0/8", "fd00:10::/32")))
    ctx = node_context(cfg, family, None, ("192.168.0.2", "fd00:192:168::2"))
    view = family_view(state, family)
    text = str(nft.render(view.ports, view.endpoints, ctx))
    golden = GOLDEN / f"reference.nft{'' if family is IPFamily.V4 else '6'}"
    if os.environ.get("KPROXY_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    if family is IPFamily.V4:
        # Upstream's name for ns1/svc1's Service chain (its hash, recomputed by hand).
        assert "add chain ip kproxy service-ULMVA6XW-ns1/svc1/tcp/p80\n" in text


def test_the_fake_refuses_a_lookup_of_a_committed_typeof_th_map_as_nft_1_0_6_does() -> None:
    fake = FakeNft()
    fake.apply(
        "add table ip kproxy\nadd chain ip kproxy a\n"
        "add map ip kproxy m { typeof ip daddr . th dport . numgen random mod 1 : ip daddr . th dport ; }\n"
        "add rule ip kproxy a dnat ip addr . port to ip daddr . th dport . numgen random mod 2 map @m\n"
    )
    with pytest.raises(BackendError, match="conflicting protocols"):
        fake.apply("add rule ip kproxy a dnat ip addr . port to ip daddr . th dport . numgen random mod 3 map @m\n")
