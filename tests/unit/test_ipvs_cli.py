"""`kproxy sync|trace --mode ipvs` as a user runs them, without changing anything (dry run, trace)."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from kproxy.cli.main import main
from kproxy.testing.builders import endpoint, endpoint_slice, node, service

OBJECTS = [
    node(addresses=["192.168.0.2"]),
    service(type="NodePort", node_port=30080, affinity=10800),
    endpoint_slice(endpoints=[endpoint("10.0.1.10", "node-1"), endpoint("10.0.2.10")], port=8080),
]


def _state(tmp_path: Path) -> str:
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": OBJECTS}))
    return str(path)


def test_dry_run_prints_the_table_in_ipvsadm_form(tmp_path: Path) -> None:
    args = ["sync", "--mode", "ipvs", "--node", "node-1", "--state", _state(tmp_path), "--dry-run"]
    res = CliRunner().invoke(main, [*args, "--cluster-cidr", "10.0.0.0/8"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.startswith("# IPv4: IPVS table in ipvsadm -Ln form")
    assert "TCP  172.30.0.41:80 rr persistent 10800\n  -> 10.0.1.10:8080               Masq    1      0" in out
    assert "add KPROXY-CLUSTER-IP 172.30.0.41,tcp:80" in out and "*nat\n" in out
    # On this node or not, NodePorts are on node-1's address (here: the Node object's).
    assert "TCP  192.168.0.2:30080 rr persistent 10800" in out


def test_scheduler_and_timeouts_are_validated(tmp_path: Path) -> None:
    base = ["sync", "--mode", "ipvs", "--node", "node-1", "--state", _state(tmp_path), "--dry-run"]
    res = CliRunner().invoke(main, [*base, "--ipvs-scheduler", "fastest"])
    assert res.exit_code == 2 and "--ipvs-scheduler" in res.output
    res = CliRunner().invoke(main, [*base, "--ipvs-udp-timeout", "soon"])
    assert res.exit_code == 2 and "--ipvs-udp-timeout" in res.output
    res = CliRunner().invoke(main, [*base, "--ipvs-scheduler", "mh", "--ipvs-tcp-timeout", "15m"])
    assert res.exit_code == 0 and "TCP  172.30.0.41:80 mh (mh-port) persistent 10800" in res.output


def test_trace_names_the_virtual_server(tmp_path: Path) -> None:
    args = ["trace", "--mode", "ipvs", "--node", "node-1", "--state", _state(tmp_path), "--cluster-cidr", "10.0.0.0/8"]
    res = CliRunner().invoke(main, [*args, "--src", "203.0.113.10", "--dst", "192.168.0.2:30080"])
    assert res.exit_code == 0, res.output
    assert "=> DNAT to 10.0.1.10:8080, masqueraded" in res.output
    assert "=> DNAT to 10.0.2.10:8080, masqueraded" in res.output
    assert "ipvs: TCP  192.168.0.2:30080 rr persistent 10800 -> 10.0.1.10:8080 Masq" in res.output
    res = CliRunner().invoke(main, [*args, "--src", "10.0.1.20", "--dst", "172.30.0.41:81"])
    assert res.exit_code == 0 and res.output.startswith("=> REJECT")


def test_unknown_modes_are_refused(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["sync", "--mode", "kernelspace", "--node", "n", "--state", _state(tmp_path)])
    assert res.exit_code == 2
