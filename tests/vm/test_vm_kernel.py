"""Smoke tests: the VM's kernel and tools can do what kproxy's IPVS mode needs, with real packets.

If one of these fails, the IPVS suite cannot mean anything: fix the VM (tests/vm/run_in_vm.sh)
first. Addresses follow the shared test IP plan (DESIGN.md §5).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path

import pytest
from pyroute2 import IPVSDest, IPVSService

pytestmark = pytest.mark.vm

CLUSTER_IP = "172.30.0.41"
DUMMY = "kproxy-ipvs0"
# IP_VS_CONN_F_* forwarding methods (include/uapi/linux/ip_vs.h); pyroute2's IPVSDest defaults to
# 3, direct routing, which kube-proxy never uses.
IP_VS_CONN_F_MASQ = 0

# Modules kproxy's modes may need: IPVS and every scheduler kube-proxy accepts, conntrack, the
# devices tests build, ipset, and the iptables/nftables pieces the IPVS mode's rules use.
MODULES = [
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_lblc", "ip_vs_lblcr",
    "ip_vs_dh", "ip_vs_sh", "ip_vs_sed", "ip_vs_nq", "ip_vs_mh",
    "nf_conntrack", "nf_conntrack_netlink", "nf_nat",
    "dummy", "veth", "bridge", "br_netfilter", "sctp",
    "ip_set", "ip_set_hash_ip", "ip_set_hash_ipport", "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet", "ip_set_hash_net", "ip_set_bitmap_port",
    "iptable_nat", "iptable_filter", "iptable_mangle", "ip6table_nat",
    "xt_set", "xt_ipvs", "xt_MASQUERADE", "xt_mark", "xt_comment", "xt_conntrack",
    "xt_addrtype", "xt_multiport", "xt_statistic", "xt_physdev",
    "nf_tables", "nft_chain_nat", "nft_ct", "nft_nat", "nft_masq", "nft_compat",
]  # fmt: skip


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_guest_runs_the_selected_debian_kernel() -> None:
    assert platform.release() == os.environ["KPROXY_VM_KERNEL_VERSION"]
    assert "Debian" in platform.version(), platform.version()


@pytest.mark.parametrize("module", MODULES)
def test_module_loads(module: str) -> None:
    done = _run("modprobe", module)
    assert done.returncode == 0, done.stderr


# Each tool changes something and reads it back, in a throwaway namespace so that no table or
# set is left in the VM's own namespace for later tests (iptables-nft warns about legacy tables).
# name: (command that changes, command that shows, text the show prints on stdout or stderr)
TOOL_CASES = {
    **{
        iptables: ([iptables, "-t", "nat", "-N", "KPROXY-T"], [f"{iptables}-save", "-t", "nat"], ":KPROXY-T")
        for iptables in ("iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
    },
    "nft": (["nft", "add table ip kproxy; add chain ip kproxy KPROXY-T"], ["nft", "list ruleset"], "KPROXY-T"),
    "ipset": (["ipset", "create", "KPROXY-T", "hash:ip,port"], ["ipset", "list", "-n"], "KPROXY-T"),
    "ipvsadm": (["ipvsadm", "-A", "-t", f"{CLUSTER_IP}:80", "-s", "rr"], ["ipvsadm", "-Ln"], "TCP  172.30.0.41:80 rr"),
    "conntrack": (["conntrack", "-F"], ["conntrack", "-L"], "0 flow entries have been shown"),
}


@pytest.mark.parametrize("tool", sorted(TOOL_CASES))
def test_tool_works_in_a_namespace(make_netns, tool: str) -> None:
    ns = make_netns("tools")
    change, show, expected = TOOL_CASES[tool]
    ns.run(*change)
    done = ns.run(*show)
    assert expected in done.stdout + done.stderr, done


# What kube-proxy's IPVS proxier sets (pkg/proxy/ipvs/proxier.go); all per namespace.
IPVS_SYSCTLS = {
    "net.ipv4.vs.conntrack": "1",
    "net.ipv4.vs.conn_reuse_mode": "0",
    "net.ipv4.vs.expire_nodest_conn": "1",
    "net.ipv4.vs.expire_quiescent_template": "1",
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
    "net.ipv4.conf.all.route_localnet": "1",
    "net.ipv4.ip_forward": "1",
}


def test_ipvs_sysctls_are_settable_per_namespace(make_netns) -> None:
    vm_conntrack = Path("/proc/sys/net/ipv4/vs/conntrack")
    before = vm_conntrack.read_text()
    node = make_netns("node")
    assert {key: node.sysctl(key, value) for key, value in IPVS_SYSCTLS.items()} == IPVS_SYSCTLS
    assert vm_conntrack.read_text() == before, "written in the VM's own namespace, not the node's"


def test_ipset_hash_ip(make_netns) -> None:
    node = make_netns("node")
    node.run("ipset", "create", "x", "hash:ip")
    node.run("ipset", "add", "x", CLUSTER_IP)
    node.run("ipset", "test", "x", CLUSTER_IP)
    assert node.run("ipset", "test", "x", "172.30.0.42", check=False).returncode != 0


def test_sctp_association_on_loopback(make_netns, echo_server, send) -> None:
    node = make_netns("node")
    echo_server(node, 9000, socket.IPPROTO_SCTP, host="127.0.0.1")
    assert send(node, "127.0.0.1", 9000, b"sctp", socket.IPPROTO_SCTP) == b"127.0.0.1 sctp\n"


@pytest.fixture
def ipvs_clusterip(lab):
    """What kproxy's IPVS mode programs for one ClusterIP service, built by hand through pyroute2:
    the ClusterIP on the dummy device (left down, as kube-proxy leaves kube-ipvs0: its addresses
    are local all the same) and a round-robin virtual service with the pod as a masquerading real
    server. Yields the IPVS handle (use it in this thread only) and the service."""
    with lab.node.iproute() as ipr:
        ipr.link("add", ifname=DUMMY, kind="dummy")
        (index,) = ipr.link_lookup(ifname=DUMMY)
        ipr.addr("add", index=index, address=CLUSTER_IP, prefixlen=32)
    with lab.node.ipvs() as ipvs:
        service = IPVSService(addr=CLUSTER_IP, port=80, protocol=socket.IPPROTO_TCP, sched_name="rr")
        ipvs.service("add", service=service)
        dest = IPVSDest(addr=lab.pod_ip, port=8080, fwd_method=IP_VS_CONN_F_MASQ, weight=1)
        ipvs.dest("add", service=service, dest=dest)
        yield ipvs, service


def test_ipvs_service_is_programmed_as_masquerade(lab, ipvs_clusterip) -> None:
    ipvs, service = ipvs_clusterip
    (dest,) = [IPVSDest.from_message(msg) for msg in ipvs.dest("dump", service=service)]
    # from_message() fills the short names only for addr/port/protocol/...; "fwd_method" there
    # is IPVSDest's default (3, direct routing), not the kernel's answer: read the raw attribute.
    assert (dest["addr"], dest["port"]) == (lab.pod_ip, 8080)
    assert dest["IPVS_DEST_ATTR_FWD_METHOD"] == IP_VS_CONN_F_MASQ, dict(dest)
    # The device is down (as kube-ipvs0 is) and the ClusterIP is still local: the kernel adds
    # local-table routes for every address, whatever the link state.
    routes = lab.node.run("ip", "route", "show", "table", "local", "dev", DUMMY).stdout
    assert f"local {CLUSTER_IP} " in routes, routes
    assert "state DOWN" in lab.node.run("ip", "link", "show", DUMMY).stdout
    table = lab.node.run("ipvsadm", "-Ln").stdout
    assert f"TCP  {CLUSTER_IP}:80 rr" in table, table
    assert f"-> {lab.pod_ip}:8080" in table and "Masq" in table, table


def test_clusterip_from_an_external_client_keeps_its_source(lab, ipvs_clusterip, echo_server, send) -> None:
    server = echo_server(lab.pod, 8080)
    answer = send(lab.client, CLUSTER_IP, 80, b"hello")
    # NAT mode rewrites only the destination: the pod sees the real client.
    assert answer == f"{lab.client_ip} hello\n".encode()
    assert server.peers == [lab.client_ip]


def test_clusterip_from_the_node(lab, ipvs_clusterip, echo_server, send) -> None:
    server = echo_server(lab.pod, 8080)
    answer = send(lab.node, CLUSTER_IP, 80, b"hello")
    # A local route's preferred source is the address itself, so the node's socket is bound to
    # the ClusterIP and IPVS (LOCAL_OUT hook) leaves it; kube-proxy masquerades such traffic to
    # the node IP with iptables rules, which this smoke test does not install.
    assert answer == f"{CLUSTER_IP} hello\n".encode()
    assert server.peers == [CLUSTER_IP]


def test_clusterip_round_trips_repeatedly(lab, ipvs_clusterip, echo_server, send) -> None:
    echo_server(lab.pod, 8080)
    for i in range(20):
        assert send(lab.client, CLUSTER_IP, 80, b"n%d" % i) == f"{lab.client_ip} n{i}\n".encode()
