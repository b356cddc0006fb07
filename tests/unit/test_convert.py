"""Conversion: what a user can get wrong is caught with the object and field named."""

from __future__ import annotations

import pytest

from kproxy.convert import convert_node, convert_service, convert_slice
from kproxy.endpointslices import endpoints_by_port
from kproxy.errors import InvalidObject
from kproxy.model import IPFamily, Protocol, TrafficDistribution
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, node, service

BAD_SERVICES = [
    ("malformed cluster IP", service(cluster_ip="172.30.0.300"), "spec.clusterIPs[0]"),
    ("two IPv4 cluster IPs", service(cluster_ip=["172.30.0.1", "172.30.0.2"]), "spec.clusterIPs"),
    ("family mismatch", service(cluster_ip="172.30.0.1", ipFamilies=["IPv6"]), "spec.clusterIPs[0]"),
    ("port out of range", service(port=70000), "spec.ports[0].port"),
    ("port zero", service(port=0), "spec.ports[0].port"),
    ("node port out of range", service(type="NodePort", node_port=65536), "spec.ports[0].nodePort"),
    ("unknown protocol", service(protocol="ICMP"), "spec.ports[0].protocol"),
    (
        "bad source range",
        service(type="LoadBalancer", source_ranges=["203.0.113.0/33"]),
        "spec.loadBalancerSourceRanges[0]",
    ),
    (
        "source range not a CIDR",
        service(type="LoadBalancer", source_ranges=["nonsense"]),
        "spec.loadBalancerSourceRanges[0]",
    ),
    ("affinity timeout zero", service(affinity=0), "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ("affinity timeout too long", service(affinity=86401), "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    (
        "duplicate port",
        service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
        "spec.ports[1].port",
    ),
    (
        "duplicate port name",
        service(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
        "spec.ports[1].name",
    ),
    ("bad external IP", service(external_ips=["203.0.113.x"]), "spec.externalIPs[0]"),
    ("bad policy", service(type="NodePort", etp="Sometimes"), "spec.externalTrafficPolicy"),
    ("no ports", service(ports=[]), "spec.ports"),
]


@pytest.mark.parametrize("case,obj,field", BAD_SERVICES, ids=[c[0] for c in BAD_SERVICES])
def test_bad_service_names_object_and_field(case: str, obj: dict, field: str) -> None:
    with pytest.raises(InvalidObject) as exc:
        convert_service(obj)
    assert exc.value.field == field
    assert exc.value.ref == "Service ns1/svc1"
    assert "ns1/svc1" in str(exc.value) and field in str(exc.value)


@pytest.mark.parametrize(
    "case,obj",
    [
        ("headless", service(cluster_ip="None")),
        ("external name", service(type="ExternalName")),
        ("another proxy's service", service(labels={"service.kubernetes.io/service-proxy-name": "other"})),
    ],
)
def test_services_not_proxied(case: str, obj: dict) -> None:
    assert convert_service(obj) is None


def test_one_bad_service_does_not_stop_the_others() -> None:
    state, rejected = build_state([service(name="bad", port=0), service(name="good")])
    assert list(state.services) == [("ns1", "good")]
    assert [e.ref for e in rejected] == ["Service ns1/bad"]


def test_sloppy_ips_normalised_as_upstream() -> None:
    svc = convert_service(service(type="LoadBalancer", cluster_ip="172.30.0.041", source_ranges=["203.0.113.000/025"]))
    assert svc is not None
    assert svc.ports[0].cluster_ips == ("172.30.0.41",)
    assert svc.ports[0].lb_source_ranges == ("203.0.113.0/25",)


def test_lb_ingress_ip_mode_proxy_gets_no_lb_ip() -> None:
    obj = service(type="LoadBalancer", node_port=30001)
    obj["status"] = {
        "loadBalancer": {
            "ingress": [{"ip": "198.51.100.1", "ipMode": "Proxy"}, {"ip": "198.51.100.2"}, {"hostname": "lb.example"}]
        }
    }
    svc = convert_service(obj)
    assert svc is not None and svc.ports[0].lb_ips == ("198.51.100.2",)


def test_source_ranges_from_annotation() -> None:
    obj = service(type="LoadBalancer")
    obj["metadata"]["annotations"] = {
        "service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/25, 198.51.100.0/24"
    }
    svc = convert_service(obj)
    assert svc is not None and svc.ports[0].lb_source_ranges == ("203.0.113.0/25", "198.51.100.0/24")


def test_etp_local_only_counts_for_externally_accessible_services() -> None:
    svc = convert_service(service(etp="Local"))
    assert svc is not None and not svc.ports[0].external_policy_local
    svc = convert_service(service(type="NodePort", node_port=30001, etp="Local"))
    assert svc is not None and svc.ports[0].external_policy_local


def test_dual_stack_service_splits_by_family() -> None:
    svc = convert_service(
        service(cluster_ip=["172.30.0.41", "fd00:172:30::41"], external_ips=["203.0.113.5", "2001:db8::5"])
    )
    assert svc is not None
    v6 = svc.ports[0].for_family(IPFamily.V6)
    assert v6 is not None and v6.cluster_ips == ("fd00:172:30::41",) and v6.external_ips == ("2001:db8::5",)


def test_slice_conditions_and_families() -> None:
    es = convert_slice(
        endpoint_slice(
            endpoints=[endpoint("10.0.2.10"), endpoint("10.0.2.11", ready=False, serving=True, terminating=True)]
        )
    )
    assert es is not None and es.family is IPFamily.V4 and es.ports[0].protocol is Protocol.TCP
    assert [(e.ready, e.serving, e.terminating) for e in es.endpoints] == [(True, True, False), (False, True, True)]
    assert convert_slice({**endpoint_slice(), "addressType": "FQDN"}) is None


@pytest.mark.parametrize(
    "case,obj,field",
    [
        ("wrong family address", endpoint_slice(endpoints=[endpoint("fd00::1")]), "endpoints[0].addresses[0]"),
        ("malformed address", endpoint_slice(endpoints=[endpoint("10.0.0.256")]), "endpoints[0].addresses[0]"),
        (
            "no owning service",
            {**endpoint_slice(), "metadata": {"name": "x", "namespace": "ns1"}},
            "metadata.labels[kubernetes.io/service-name]",
        ),
    ],
)
def test_bad_slices(case: str, obj: dict, field: str) -> None:
    with pytest.raises(InvalidObject) as exc:
        convert_slice(obj)
    assert exc.value.field == field


def test_node() -> None:
    n = convert_node(node(addresses=["192.168.0.2", "fd00:192:168::2"], labels={"topology.kubernetes.io/zone": "a"}))
    assert n.addresses_of(IPFamily.V6) == ("fd00:192:168::2",) and n.zone == "a" and not n.being_deleted


@pytest.mark.parametrize(
    "value,kept",
    [
        ("PreferSameNode", TrafficDistribution.PREFER_SAME_NODE),
        ("PreferSameZone", TrafficDistribution.PREFER_SAME_ZONE),
        ("PreferClose", TrafficDistribution.PREFER_SAME_ZONE),
        ("PreferSomewhereNice", TrafficDistribution.DEFAULT),
        ("prefersamenode", TrafficDistribution.DEFAULT),
        (7, TrafficDistribution.DEFAULT),
        (None, TrafficDistribution.DEFAULT),
    ],
)
def test_traffic_distribution_known_values_kept_others_ignored(value: object, kept: TrafficDistribution) -> None:
    # The Service is proxied either way: an unknown value only means no preference, as the
    # EndpointSlice controller treats it; PreferClose is PreferSameZone's older name.
    svc = convert_service(service(trafficDistribution=value))
    assert svc is not None and svc.ports[0].traffic_distribution is kept
    v4 = svc.ports[0].for_family(IPFamily.V4)
    assert v4 is not None and v4.traffic_distribution is kept


def test_node_and_zone_hints() -> None:
    raw = endpoint("10.0.1.10", "node-1", zone="zone-a", zone_hints=["zone-a"], node_hints=["node-1", "node-9"])
    no_name = endpoint("10.0.2.10", zone_hints=["zone-b"])
    no_name["hints"]["forNodes"] = [{}, {"name": ""}, {"name": 5}, "node-2"]  # the API server refuses these
    es = convert_slice(endpoint_slice(endpoints=[raw, no_name, endpoint("10.0.2.11")]))
    assert es is not None
    first, second, third = es.endpoints
    assert (first.zone, first.zone_hints, first.node_hints) == ("zone-a", {"zone-a"}, {"node-1", "node-9"})
    assert (second.zone_hints, second.node_hints) == ({"zone-b"}, frozenset()), "nameless node hints dropped"
    assert not third.zone_hints and not third.node_hints
    (eps,) = endpoints_by_port([es], IPFamily.V4).values()
    assert eps[0].node_hints == {"node-1", "node-9"} and eps[0].zone_hints == {"zone-a"}, "carried to endpoints"
