"""`kproxy sync` and `kproxy trace` take `kproxy run`'s flags and --config through the same code.

One node's command line or KubeProxyConfiguration can be replayed, traced and dry-run: the same
flags parse the same way, an invalid one gets the same message and exit status from the three
commands, and settings from a file reach the rules sync would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from kproxy.cli.main import main
from kproxy.testing.builders import endpoint, endpoint_slice, node, service

OBJECTS = [
    node(addresses=["192.168.0.2"]),
    service(type="NodePort", node_port=30080),
    endpoint_slice(endpoints=[endpoint("10.0.1.10", "node-1"), endpoint("10.0.2.10")], port=8080),
]
NODEPORTS_RULE = '-A KPROXY-SERVICES -m comment --comment "kproxy service nodeports'
CLUSTER_IP_RULE = '-A KPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP"'


@pytest.fixture
def state(tmp_path: Path) -> str:
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": OBJECTS}))
    return str(path)


def kpc(tmp_path: Path, **fields: Any) -> str:
    path = tmp_path / "config.conf"
    path.write_text(
        yaml.safe_dump({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", **fields})
    )
    return str(path)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def sync(state: str, *flags: str) -> Result:
    return invoke("sync", "--node", "node-1", "--state", state, "--dry-run", *flags)


def ipv4(res: Result) -> list[str]:
    """The IPv4 payload of a dry run, one line per rule."""
    assert res.exit_code == 0, res.output
    text = res.stdout.split("# IPv6:")[0]
    assert text.startswith("# IPv4: iptables-restore --noflush input")
    return text.splitlines()


def rule(lines: list[str], prefix: str) -> str:
    (found,) = [line for line in lines if line.startswith(prefix)]
    return found


# -- one validation for run, sync and trace ----------------------------------------------------

INVALID = [
    pytest.param(["--iptables-sync-period=soon"], "--iptables-sync-period: not a duration", id="bad-duration"),
    pytest.param(["--ipvs-tcp-timeout", "900"], "--ipvs-tcp-timeout: not a duration", id="duration-without-unit"),
    pytest.param(["--cluster-cidr=10.0.0.0/33"], "--cluster-cidr: '10.0.0.0/33' is not a CIDR", id="bad-cidr"),
    pytest.param(["--nodeport-addresses", "primary,10.0.0.0/8"], "--nodeport-addresses:", id="primary-and-cidrs"),
    pytest.param(
        ["--detect-local-mode=BridgeInterface"],
        "detectLocal.bridgeInterface: required with detectLocalMode BridgeInterface",
        id="bridge-without-interface",
    ),
    pytest.param(["--proxy-mode=userspace"], "--proxy-mode: 'userspace' is not iptables", id="unknown-mode"),
    pytest.param(["--masquerade-all=maybe"], "--masquerade-all: 'maybe' is not true or false", id="bad-bool"),
    pytest.param(["--iptables-masquerade-bit=32"], "--iptables-masquerade-bit: 32 is not in 0-31", id="bad-bit"),
    pytest.param(["--ipvs-scheduler=fastest"], "--ipvs-scheduler: 'fastest' is not one of", id="bad-scheduler"),
    pytest.param(["--iptables-backend=iptables"], "--iptables-backend: 'iptables' is not nft or legacy", id="backend"),
    # Only the daemon uses it, but a node's value is still checked as run checks it.
    pytest.param(["--healthz-bind-address=bogus"], "--healthz-bind-address: 'bogus'", id="daemon-only-flag"),
    pytest.param(["--config=/nonexistent/kube-proxy.conf"], "--config /nonexistent/kube-proxy.conf:", id="no-file"),
]


@pytest.mark.parametrize(("flags", "message"), INVALID)
def test_run_sync_and_trace_refuse_an_invalid_flag_alike(state: str, flags: list[str], message: str) -> None:
    results = {
        "run": invoke("run", "--hostname-override=node-1", *flags),
        "sync": sync(state, *flags),
        "trace": invoke(
            "trace", "--node", "node-1", "--state", state, "--src", "10.0.1.20", "--dst", "172.30.0.41:80", *flags
        ),
    }
    for command, res in results.items():
        assert res.exit_code == 2, (command, res.output)
        assert res.stdout == "", command
        assert message in res.stderr, (command, res.stderr)
    assert len({res.stderr for res in results.values()}) == 1, {c: r.stderr for c, r in results.items()}


def test_a_bad_value_in_the_file_is_named_alike(tmp_path: Path, state: str) -> None:
    conf = kpc(tmp_path, iptables={"syncPeriod": "often"})
    run, dry = invoke("run", "--hostname-override=node-1", "--config", conf), sync(state, "--config", conf)
    assert run.exit_code == dry.exit_code == 2
    assert run.stderr == dry.stderr and "iptables.syncPeriod (in " in dry.stderr


# -- settings reach the rules ------------------------------------------------------------------


def test_localhost_node_ports_can_be_turned_off(state: str) -> None:
    default = rule(ipv4(sync(state, "--cluster-cidr", "10.0.0.0/8")), NODEPORTS_RULE)
    assert default.endswith("-m addrtype --dst-type LOCAL -j KPROXY-NODEPORTS")
    res = sync(state, "--cluster-cidr", "10.0.0.0/8", "--iptables-localhost-nodeports=false")
    assert res.stderr == ""
    lines = ipv4(res)
    off = rule(lines, NODEPORTS_RULE)
    assert off.endswith("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KPROXY-NODEPORTS")
    # Nor the route_localnet guard that only localhost NodePorts need.
    assert not any("KPROXY-FIREWALL" in line for line in lines)


def test_go_boolean_syntax(state: str) -> None:
    off = rule(ipv4(sync(state, "--iptables-localhost-nodeports", "false")), NODEPORTS_RULE)
    assert "! -d 127.0.0.0/8" in off
    # A bare boolean flag is true, also when another option follows it.
    bare = rule(ipv4(sync(state, "--masquerade-all", "--cluster-cidr", "10.0.0.0/8")), CLUSTER_IP_RULE)
    assert bare.endswith("--dport 80 -j KPROXY-MARK-MASQ") and "! -s" not in bare


def test_config_file_settings_are_used_and_flags_override_them(tmp_path: Path, state: str) -> None:
    conf = kpc(tmp_path, clusterCIDR="10.244.0.0/16", iptables={"localhostNodePorts": False})
    lines = ipv4(sync(state, "--config", conf))
    assert rule(lines, CLUSTER_IP_RULE).endswith("! -s 10.244.0.0/16 -j KPROXY-MARK-MASQ")
    assert "! -d 127.0.0.0/8" in rule(lines, NODEPORTS_RULE)

    conf = kpc(tmp_path, clusterCIDR="10.244.0.0/16", iptables={"masqueradeAll": True})
    masq = rule(ipv4(sync(state, "--config", conf)), CLUSTER_IP_RULE)
    assert masq.endswith("--dport 80 -j KPROXY-MARK-MASQ") and "! -s" not in masq

    res = sync(state, "--config", conf, "--masquerade-all=false", "--cluster-cidr", "10.0.0.0/8")
    assert rule(ipv4(res), CLUSTER_IP_RULE).endswith("! -s 10.0.0.0/8 -j KPROXY-MARK-MASQ")


def test_a_configmap_as_kubectl_prints_it_is_taken_too(tmp_path: Path, state: str) -> None:
    cm = tmp_path / "cm.yaml"
    cm.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
                "data": {"config.conf": Path(kpc(tmp_path, clusterCIDR="10.244.0.0/16")).read_text()},
            }
        )
    )
    assert rule(ipv4(sync(state, "--config", str(cm))), CLUSTER_IP_RULE).endswith(
        "! -s 10.244.0.0/16 -j KPROXY-MARK-MASQ"
    )


def test_trace_follows_the_file(tmp_path: Path, state: str) -> None:
    args = ["trace", "--node", "node-1", "--state", state, "--src", "10.0.1.20", "--dst", "172.30.0.41:80"]
    pod_cidr = invoke(*args, "--config", kpc(tmp_path, clusterCIDR="10.0.0.0/8"))
    assert pod_cidr.exit_code == 0, pod_cidr.output
    assert "=> DNAT to 10.0.1.10:8080\n" in pod_cidr.stdout + "\n", "a pod's traffic keeps its source"
    masq_all = invoke(*args, "--config", kpc(tmp_path, clusterCIDR="10.0.0.0/8", iptables={"masqueradeAll": True}))
    assert masq_all.exit_code == 0, masq_all.output
    assert "=> DNAT to 10.0.1.10:8080, masqueraded" in masq_all.stdout


# -- what sync and trace add, and what they leave to the daemon -------------------------------


def test_the_node_name_must_be_given(tmp_path: Path, state: str) -> None:
    res = invoke("sync", "--state", state, "--dry-run")
    assert res.exit_code == 2 and "--node: required" in res.stderr, "never this host's name, unlike run"
    # --hostname-override (run's name for it) and the file's hostnameOverride do as well.
    out = tmp_path / "effective.yaml"
    for flags in (["--hostname-override=Node-1"], ["--config", kpc(tmp_path, hostnameOverride="node-1")]):
        res = invoke("sync", "--state", state, f"--write-config-to={out}", *flags)
        assert res.exit_code == 0, res.output
        assert yaml.safe_load(out.read_text())["hostnameOverride"].lower() == "node-1"
    res = invoke("sync", "--state", state, "--dry-run", "--node", "node-1", "--hostname-override", "node-2")
    assert res.exit_code == 2 and "name different nodes" in res.stderr
    res = invoke("sync", "--state", state, "--dry-run", "--node", " ")
    assert res.exit_code == 2 and "--node: empty" in res.stderr


def test_daemon_only_settings_are_accepted_silently(state: str) -> None:
    daemon_only = [
        "--healthz-bind-address=0.0.0.0:10256",
        "--metrics-bind-address=127.0.0.1:10249",
        "--bind-address-hard-fail",
        "--oom-score-adj=-999",
        "--iptables-sync-period=1m",
        "--min-sync-period=2s",
        "--conntrack-tcp-timeout-established=24h",
        "--v=4",
        "--logging-format=json",
    ]
    res = sync(state, *daemon_only)
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert rule(ipv4(res), NODEPORTS_RULE) == rule(ipv4(sync(state)), NODEPORTS_RULE)


def test_settings_kproxy_never_acts_on_are_named_once(tmp_path: Path, state: str) -> None:
    conf = kpc(tmp_path, clusterCIDR="10.0.0.0/8", enableProfiling=True, someFutureField=1)
    res = sync(state, "--config", conf, "--conntrack-max-per-core=0", "--ipvs-scheduler=wrr")
    assert res.exit_code == 0, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith("kproxy: kproxy does not act on these settings: ")
    for named in ("enableProfiling (in ", "--conntrack-max-per-core=0", "--ipvs-scheduler=wrr", "someFutureField"):
        assert named in line


@pytest.mark.parametrize("action", ["--cleanup", "--init-only=true"])
def test_runs_actions_are_refused(state: str, action: str) -> None:
    res = sync(state, action)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith(f"kproxy: {action.split('=')[0]}: kproxy sync ")
    assert sync(state, f"{action.split('=')[0]}=false").exit_code == 0


def test_write_config_to_writes_the_effective_configuration(tmp_path: Path, state: str) -> None:
    out = tmp_path / "effective.yaml"
    conf = kpc(tmp_path, clusterCIDR="10.244.0.0/16", mode="ipvs")
    res = sync(state, "--config", conf, "--masquerade-all", f"--write-config-to={out}")
    assert res.exit_code == 0 and res.stdout == "", res.output
    effective = yaml.safe_load(out.read_text())
    assert effective["hostnameOverride"] == "node-1"
    assert effective["clusterCIDR"] == "10.244.0.0/16" and effective["mode"] == "ipvs"
    assert effective["iptables"]["masqueradeAll"] is True
