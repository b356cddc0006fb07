"""`kproxy run` configuration: kube-proxy's flags and KubeProxyConfiguration files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kproxy.cli.main import main
from kproxy.config import ConntrackConfig, format_duration, load_run_config, parse_duration
from kproxy.errors import ConfigError

# What `kubeadm init` writes into the kube-proxy ConfigMap (config.conf), verbatim in shape:
# every field present, most of them zero or null.
KUBEADM = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def write(tmp_path: Path, text: str, name: str = "config.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def kpc(**fields: Any) -> str:
    return str(
        yaml.safe_dump({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", **fields})
    )


def load(flags: dict[str, Any]) -> Any:
    return load_run_config(flags, hostname="Host-A")


# -- files -------------------------------------------------------------------------------------


def test_kubeadm_config_gives_upstream_defaults_and_no_warning(tmp_path: Path) -> None:
    loaded = load({"config": write(tmp_path, KUBEADM)})
    cfg = loaded.config
    assert loaded.ignored == () and loaded.unknown == () and loaded.overriding == ()
    assert cfg.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert cfg.proxy.node_name == "host-a"  # the hostname, lowercased as upstream
    assert cfg.proxy.cluster_cidrs == ("10.244.0.0/16",)
    assert (cfg.proxy.sync_period, cfg.proxy.min_sync_period) == (30.0, 1.0)
    assert (cfg.proxy.masquerade_bit, cfg.proxy.localhost_nodeports, cfg.proxy.masquerade_all) == (14, True, False)
    assert cfg.proxy.detect_local_mode == "ClusterCIDR"
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.oom_score_adj == -999
    assert cfg.conntrack == ConntrackConfig(86400.0, 3600.0, False, None, None)


def test_a_configmap_as_kubectl_prints_it_works_unchanged(tmp_path: Path) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
        "data": {
            "config.conf": KUBEADM.replace("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.0.0.0/8"),
            "kubeconfig.conf": "apiVersion: v1\nkind: Config\n",
        },
    }
    cfg = load({"config": write(tmp_path, yaml.safe_dump(cm))}).config
    assert cfg.proxy.cluster_cidrs == ("10.0.0.0/8",)


def test_file_values_are_used(tmp_path: Path) -> None:
    text = kpc(
        hostnameOverride="Node-7",
        mode="iptables",
        clusterCIDR="10.0.0.0/8,fd00:10::/32",
        nodePortAddresses=["192.168.0.0/24"],
        iptables={
            "syncPeriod": "1m30s",
            "minSyncPeriod": "500ms",
            "masqueradeBit": 0,
            "masqueradeAll": True,
            "localhostNodePorts": False,
        },
        conntrack={"tcpEstablishedTimeout": "0s", "udpTimeout": "30s", "tcpBeLiberal": True},
        detectLocalMode="BridgeInterface",
        detectLocal={"bridgeInterface": "cbr0"},
        healthzBindAddress="127.0.0.1",
        metricsBindAddress="0.0.0.0:9999",
        oomScoreAdj=0,
        logging={"format": "json", "verbosity": 4},
    )
    cfg = load({"config": write(tmp_path, text)}).config
    p = cfg.proxy
    assert p.node_name == "node-7"
    assert p.cluster_cidrs == ("10.0.0.0/8", "fd00:10::/32")
    assert p.nodeport_addresses == ("192.168.0.0/24",)
    assert (p.sync_period, p.min_sync_period) == (90.0, 0.5)
    assert (p.masquerade_bit, p.masquerade_all, p.localhost_nodeports) == (0, True, False)  # null-able: 0 is a value
    assert (p.detect_local_mode, p.bridge_interface) == ("BridgeInterface", "cbr0")
    assert p.conntrack_tcp_liberal is True
    assert cfg.conntrack.tcp_established_timeout is None  # 0: leave the kernel's value
    assert cfg.conntrack.udp_timeout == 30.0
    assert cfg.healthz_bind_address == "127.0.0.1:10256"  # the port appended, as upstream
    assert cfg.metrics_bind_address == "0.0.0.0:9999"
    assert cfg.oom_score_adj == 0
    assert (cfg.log_format, cfg.log_level) == ("json", "debug")


def test_ipv6_bind_address_moves_the_default_servers(tmp_path: Path) -> None:
    cfg = load({"config": write(tmp_path, kpc(bindAddress="fd00:192:168::2"))}).config
    assert (cfg.healthz_bind_address, cfg.metrics_bind_address) == ("[::]:10256", "[::1]:10249")
    assert cfg.bind_address == "fd00:192:168::2"


def test_unknown_and_ignored_fields_are_collected_for_one_warning(tmp_path: Path) -> None:
    text = kpc(
        ipvs={"scheduler": "lc"},
        conntrack={"maxPerCore": 0},
        surprise=1,
        iptables={"bogus": True},
        featureGates={"SomeGate": True},
    )
    loaded = load({"config": write(tmp_path, text)})
    assert set(loaded.unknown) == {"surprise", "iptables.bogus"}
    assert {i.split(" ")[0] for i in loaded.ignored} == {"ipvs.scheduler", "conntrack.maxPerCore", "featureGates"}


def test_ipvs_mode_reads_the_ipvs_section_and_ignores_the_iptables_periods(tmp_path: Path) -> None:
    text = kpc(
        mode="ipvs",
        ipvs={
            "scheduler": "wrr",
            "syncPeriod": "5s",
            "minSyncPeriod": "250ms",
            "strictARP": True,
            "tcpTimeout": "15m",
            "tcpFinTimeout": "2s",
            "udpTimeout": "30s",
            "excludeCIDRs": ["10.1.0.0/16"],
        },
        iptables={"syncPeriod": "7s", "masqueradeAll": True},
    )
    loaded = load({"config": write(tmp_path, text)})
    cfg = loaded.config
    assert cfg.proxy.mode == "ipvs"
    assert (cfg.proxy.sync_period, cfg.proxy.min_sync_period) == (5.0, 0.25)
    assert cfg.proxy.masquerade_all  # the iptables section's masquerading applies in both modes
    ipvs = cfg.ipvs
    assert (ipvs.scheduler, ipvs.strict_arp, ipvs.exclude_cidrs) == ("wrr", True, ("10.1.0.0/16",))
    assert (ipvs.tcp_timeout, ipvs.tcp_fin_timeout, ipvs.udp_timeout) == (900.0, 2.0, 30.0)
    assert [i.split(" ")[0] for i in loaded.ignored] == ["iptables.syncPeriod"]


def test_the_mode_neutral_sync_period_flags_set_the_running_modes_period() -> None:
    cfg = load({"proxy-mode": "ipvs", "sync-period": "3s", "min-sync-period": "1s"}).config
    assert (cfg.proxy.sync_period, cfg.proxy.min_sync_period) == (3.0, 1.0)
    cfg = load({"proxy-mode": "ipvs", "ipvs-sync-period": "4s", "iptables-sync-period": "9s"}).config
    assert (cfg.proxy.sync_period, cfg.proxy.min_sync_period) == (4.0, 0.0)  # ipvs' own default minimum
    cfg = load({"sync-period": "3s"}).config
    assert (cfg.proxy.mode, cfg.proxy.sync_period) == ("iptables", 3.0)


def test_ipvs_settings_are_reported_ignored_in_the_iptables_mode() -> None:
    loaded = load({"ipvs-scheduler": "lc", "ipvs-sync-period": "30s"})  # the second is the default
    assert loaded.ignored == ("--ipvs-scheduler=lc",)
    assert loaded.config.ipvs.scheduler == "lc"  # kept, for a mode change by flag


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("bad duration", {"iptables": {"syncPeriod": "soon"}}, "iptables.syncPeriod (in "),
        ("number as duration", {"iptables": {"minSyncPeriod": 5}}, "iptables.minSyncPeriod (in "),
        ("masquerade bit", {"iptables": {"masqueradeBit": 32}}, "iptables.masqueradeBit (in "),
        ("negative sync", {"iptables": {"syncPeriod": "-1s"}}, "iptables.syncPeriod (in "),
        ("mode", {"mode": "userspace"}, "mode (in "),
        ("unknown mode", {"mode": "kernelspace"}, "is not iptables, ipvs or nftables"),
        ("ipvs scheduler", {"mode": "ipvs", "ipvs": {"scheduler": "fastest"}}, "ipvs.scheduler (in "),
        ("ipvs exclude", {"ipvs": {"excludeCIDRs": ["10.0.0.0/33"]}}, "ipvs.excludeCIDRs (in "),
        ("ipvs timeout", {"ipvs": {"tcpTimeout": "-1s"}}, "ipvs.tcpTimeout (in "),
        ("ipvs sync", {"mode": "ipvs", "ipvs": {"syncPeriod": "-1s"}}, "ipvs.syncPeriod (in "),
        ("cluster cidr", {"clusterCIDR": "10.0.0.0/33"}, "clusterCIDR (in "),
        ("two v4 cidrs", {"clusterCIDR": "10.0.0.0/8,11.0.0.0/8"}, "clusterCIDR (in "),
        ("healthz", {"healthzBindAddress": "localhost:1"}, "healthzBindAddress (in "),
        ("detect mode", {"detectLocalMode": "Magic"}, "detectLocalMode (in "),
        ("bridge missing", {"detectLocalMode": "BridgeInterface"}, "detectLocal.bridgeInterface: required"),
        ("oom", {"oomScoreAdj": 1001}, "oomScoreAdj (in "),
        ("nodeport addresses", {"nodePortAddresses": ["primary", "10.0.0.0/8"]}, "nodePortAddresses (in "),
        ("type", {"iptables": {"masqueradeAll": "yes"}}, "iptables.masqueradeAll (in "),
        ("log format", {"logging": {"format": "xml"}}, "logging.format (in "),
    ],
)
def test_invalid_file_values_name_the_field(tmp_path: Path, name: str, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load({"config": write(tmp_path, kpc(**fields))})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("not yaml", "a: [", "not YAML"),
        (
            "wrong kind",
            "apiVersion: v1\nkind: Pod\n",
            "expected kubeproxy.config.k8s.io/v1alpha1/KubeProxyConfiguration",
        ),
        ("list", "- a\n", "not a KubeProxyConfiguration"),
    ],
)
def test_unusable_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load({"config": write(tmp_path, text)})
    with pytest.raises(ConfigError, match="No such file"):
        load({"config": str(tmp_path / "missing.yaml")})


# -- flags -------------------------------------------------------------------------------------


def test_flags_override_the_file_and_are_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path, kpc(clusterCIDR="10.244.0.0/16", hostnameOverride="from-file", iptables={"syncPeriod": "10s"})
    )
    loaded = load({"config": path, "cluster-cidr": "10.0.0.0/8", "hostname-override": "Node-1", "sync-period": "5s"})
    assert loaded.config.proxy.cluster_cidrs == ("10.0.0.0/8",)
    assert loaded.config.proxy.node_name == "node-1"
    assert loaded.config.proxy.sync_period == 5.0
    # kube-proxy would ignore these two with --config; --hostname-override it applies too.
    assert set(loaded.overriding) == {"--cluster-cidr", "--sync-period"}


@pytest.mark.parametrize(
    ("name", "flags", "check"),
    [
        ("bare bool", {"masquerade-all": True}, lambda c: c.proxy.masquerade_all is True),
        ("bool=false", {"iptables-localhost-nodeports": "false"}, lambda c: c.proxy.localhost_nodeports is False),
        (
            "go durations",
            {"iptables-sync-period": "1m30s", "iptables-min-sync-period": "0"},
            lambda c: (c.proxy.sync_period, c.proxy.min_sync_period) == (90.0, 0.0),
        ),
        (
            "kproxy aliases",
            {"sync-period": "2s", "min-sync-period": "100ms"},
            lambda c: (c.proxy.sync_period, c.proxy.min_sync_period) == (2.0, 0.1),
        ),
        ("mode alias", {"mode": "iptables"}, lambda c: c.proxy.mode == "iptables"),
        (
            "repeated list",
            {"nodeport-addresses": ("192.168.0.0/24", "10.0.0.0/8,fd00::/8")},
            lambda c: c.proxy.nodeport_addresses == ("192.168.0.0/24", "10.0.0.0/8", "fd00::/8"),
        ),
        (
            "nodeport keyword",
            {"nodeport-addresses": ("localhost",)},
            lambda c: c.proxy.nodeport_addresses == ("127.0.0.0/8", "::1/128"),
        ),
        ("metrics disabled", {"metrics-bind-address": ""}, lambda c: c.metrics_bind_address == ""),
        (
            "deprecated port",
            {"healthz-port": "0", "metrics-port": "9000"},
            lambda c: (c.healthz_bind_address, c.metrics_bind_address) == ("", "127.0.0.1:9000"),
        ),
        ("klog -v=", {"v": "=5"}, lambda c: c.log_level == "debug"),
        (
            "conntrack",
            {"conntrack-tcp-timeout-close-wait": "0s", "conntrack-udp-timeout-stream": "2m"},
            lambda c: (c.conntrack.tcp_close_wait_timeout, c.conntrack.udp_stream_timeout) == (None, 120.0),
        ),
        ("master", {"master": "https://10.0.0.1:6443"}, lambda c: c.master == "https://10.0.0.1:6443"),
        ("iptables backend", {"iptables-backend": "legacy"}, lambda c: c.proxy.iptables_backend == "legacy"),
    ],
)
def test_flag_forms(name: str, flags: dict[str, Any], check: Any) -> None:
    assert check(load(flags).config), name


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("bool", {"masquerade-all": "maybe"}, "--masquerade-all"),
        ("duration", {"iptables-sync-period": "30"}, "--iptables-sync-period"),
        ("zero sync", {"iptables-sync-period": "0s"}, "--iptables-sync-period"),
        ("int", {"iptables-masquerade-bit": "x"}, "--iptables-masquerade-bit"),
        ("range", {"iptables-masquerade-bit": "40"}, "--iptables-masquerade-bit"),
        ("cidr", {"cluster-cidr": "10.0.0.0"}, "--cluster-cidr"),
        ("address", {"metrics-bind-address": "127.0.0.1:99999"}, "--metrics-bind-address"),
        ("empty hostname", {"hostname-override": "  "}, "--hostname-override"),
        ("feature gate", {"feature-gates": ("A=maybe",)}, "--feature-gates"),
        ("mode", {"proxy-mode": "kernelspace"}, "--proxy-mode"),
    ],
)
def test_invalid_flags_name_the_flag(name: str, flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(flags)


def test_flags_kproxy_ignores_are_collected() -> None:
    loaded = load(
        {
            "ipvs-scheduler": "lc",
            "log-file": "/var/log/kube-proxy.log",
            "logtostderr": "false",
            "conntrack-max-per-core": "0",
            "profiling": True,
            "alsologtostderr": "false",
        }
    )
    assert set(loaded.ignored) == {
        "--ipvs-scheduler=lc",
        "--log-file=/var/log/kube-proxy.log",
        "--logtostderr=false",
        "--conntrack-max-per-core=0",
        "--profiling=True",
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("2h22m", 8520.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("-1s", -1.0),
        ("100us", 0.0001),
        ("1h0m0s", 3600.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "1d", "s", "1m30"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (0.0, 0.5, 1.0, 30.0, 90.0, 900.0, 86400.0):
        assert parse_duration(format_duration(seconds)) == seconds


# -- the command -------------------------------------------------------------------------------


def test_run_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, kpc(iptables={"syncPeriod": "soon"}))
    result = CliRunner().invoke(main, ["run", f"--config={path}"])
    assert result.exit_code == 2
    assert "iptables.syncPeriod" in result.output


def test_run_exits_2_on_a_bad_flag_value() -> None:
    result = CliRunner().invoke(main, ["run", "--iptables-min-sync-period", "fast"])
    assert result.exit_code == 2
    assert "--iptables-min-sync-period" in result.output


def test_write_config_to_round_trips_and_warns_once(tmp_path: Path) -> None:
    out = tmp_path / "effective.yaml"
    args = [
        "run",
        "--config",
        write(tmp_path, KUBEADM),
        "--hostname-override=node-9",
        "--masquerade-all",
        "--ipvs-scheduler=lc",
        "--log-dir=/tmp",
        "--logging-format=json",
        f"--write-config-to={out}",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line["level"] == "warning"]
    assert [w["event"] for w in warnings] == ["config_ignored"]
    assert set(warnings[0]["ignored"]) == {"--ipvs-scheduler=lc", "--log-dir=/tmp"}
    again = load({"config": str(out)})
    assert again.config.proxy.masquerade_all is True
    assert again.config.proxy.node_name == "node-9"
    assert again.config.proxy.cluster_cidrs == ("10.244.0.0/16",)
    assert set(again.ignored) == {"ipvs.scheduler (in " + str(out) + ")=lc"}


def test_every_kube_proxy_flag_parses() -> None:
    """A kube-proxy DaemonSet's arguments (kubeadm's, kops', and the rarer ones) are accepted."""
    args = [
        "--config=/nonexistent",
        "--hostname-override=n",
        "--v=2",
        "--cluster-cidr=10.0.0.0/8",
        "--conntrack-max-per-core=131072",
        "--conntrack-min=0",
        "--conntrack-tcp-timeout-established=24h",
        "--conntrack-tcp-timeout-close-wait=1h",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=30s",
        "--conntrack-udp-timeout-stream=2m",
        "--iptables-masquerade-bit=14",
        "--iptables-sync-period=30s",
        "--iptables-min-sync-period=1s",
        "--iptables-localhost-nodeports=true",
        "--ipvs-sync-period=30s",
        "--ipvs-min-sync-period=0s",
        "--ipvs-scheduler=rr",
        "--ipvs-exclude-cidrs=10.1.0.0/16",
        "--ipvs-strict-arp=false",
        "--ipvs-tcp-timeout=0s",
        "--ipvs-tcpfin-timeout=0s",
        "--ipvs-udp-timeout=0s",
        "--kubeconfig=/k",
        "--master=https://m",
        "--kube-api-qps=5",
        "--kube-api-burst=10",
        "--kube-api-content-type=application/json",
        "--bind-address=0.0.0.0",
        "--healthz-bind-address=0.0.0.0:10256",
        "--metrics-bind-address=127.0.0.1:10249",
        "--bind-address-hard-fail=false",
        "--profiling=false",
        "--proxy-mode=iptables",
        "--detect-local-mode=ClusterCIDR",
        "--pod-bridge-interface=cbr0",
        "--pod-interface-name-prefix=veth",
        "--nodeport-addresses=primary",
        "--oom-score-adj=-998",
        "--config-sync-period=15m",
        "--feature-gates=A=true",
        "--proxy-port-range=",
        "--cleanup=false",
        "--init-only=false",
        "--logtostderr=false",
        "--alsologtostderr",
        "--log-file=/var/log/kube-proxy.log",
        "--log-flush-frequency=5s",
        "--vmodule=x=2",
        "--show-hidden-metrics-for-version=1.30",
    ]
    result = CliRunner().invoke(main, ["run", *args])
    # Every flag parsed; the run then stops at the missing --config file, naming it.
    assert result.exit_code == 2
    assert "--config /nonexistent" in result.output


def test_iptables_settings_the_nftables_mode_does_not_read_are_reported_ignored(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n"
        "iptables: {masqueradeAll: true, localhostNodePorts: false}\nnftables: {masqueradeBit: 13}\n"
    )
    loaded = load({"config": str(path)})
    where = f" (in {path})"
    assert sorted(loaded.ignored) == [
        f"iptables.localhostNodePorts{where}=False",
        f"iptables.masqueradeAll{where}=True",
    ]
    assert loaded.config.proxy.masquerade_bit == 13
    flagged = load({"config": str(path), "masquerade-all": True})  # the flag wins, as upstream's
    assert flagged.ignored == (f"iptables.localhostNodePorts{where}=False",)
    assert flagged.config.proxy.masquerade_all is True
