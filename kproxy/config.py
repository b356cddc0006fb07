"""kproxy's configuration: one frozen value, with kube-proxy's names and defaults.

`ProxyConfig` is what every mode reads. `RunConfig` adds what the `kproxy run` daemon needs, and
`load_run_config` builds it from kube-proxy's flags and a KubeProxyConfiguration file (see the
guarantees above `load_run_config`).
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import yaml

from kproxy.convert import parse_cidr
from kproxy.errors import ConfigError, InvalidObject
from kproxy.model import IPFamily
from kproxy.proxier.context import DETECT_CLUSTER_CIDR, DETECT_MODES

MODES = ("iptables", "ipvs", "nftables")
RUN_MODES = ("iptables", "ipvs")  # what `kproxy run` can run


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    mode: str = "iptables"
    node_name: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    # Empty: every local address. "primary": the node's primary IPs. Else CIDRs.
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    detect_local_mode: str = DETECT_CLUSTER_CIDR
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    conntrack_tcp_liberal: bool = False
    service_proxy_name: str = ""
    iptables_backend: str = ""  # "", "nft" or "legacy": empty detects the node's
    min_sync_period: float = 1.0
    sync_period: float = 30.0

    def cluster_cidr(self, family: IPFamily) -> str:
        return next((c for c in self.cluster_cidrs if (":" in c) == (family is IPFamily.V6)), "")


# kube-proxy's IPVS schedulers (ipvsadm's names); rr is upstream's default.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")
DEFAULT_SCHEDULER = "rr"


@dataclass(frozen=True, slots=True)
class IpvsConfig:
    """kube-proxy's `ipvs` section (flags --ipvs-*)."""

    scheduler: str = DEFAULT_SCHEDULER
    strict_arp: bool = False
    # Seconds; 0 leaves the kernel's value, as `ipvsadm --set` with 0.
    tcp_timeout: float = 0.0
    tcp_fin_timeout: float = 0.0
    udp_timeout: float = 0.0
    # Virtual servers inside these CIDRs are never deleted by a sync (someone else's).
    exclude_cidrs: tuple[str, ...] = ()


# The --ipvs-* flag of each `ipvs` field, named in errors when no other origin is known.
IPVS_FLAGS = {
    "ipvs.scheduler": "--ipvs-scheduler",
    "ipvs.tcpTimeout": "--ipvs-tcp-timeout",
    "ipvs.tcpFinTimeout": "--ipvs-tcpfin-timeout",
    "ipvs.udpTimeout": "--ipvs-udp-timeout",
    "ipvs.excludeCIDRs": "--ipvs-exclude-cidrs",
}


def validate_ipvs_config(cfg: IpvsConfig, where: Callable[[str], str] = IPVS_FLAGS.__getitem__) -> IpvsConfig:
    """`cfg` with the default scheduler filled in; errors name `where(field path)`."""
    sched = cfg.scheduler or DEFAULT_SCHEDULER
    if sched not in SCHEDULERS:
        raise ConfigError(f"{where('ipvs.scheduler')}: {cfg.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    for path, value in (
        ("ipvs.tcpTimeout", cfg.tcp_timeout),
        ("ipvs.tcpFinTimeout", cfg.tcp_fin_timeout),
        ("ipvs.udpTimeout", cfg.udp_timeout),
    ):
        if value < 0:
            raise ConfigError(f"{where(path)}: must be 0 or more")
    for cidr in cfg.exclude_cidrs:
        try:
            ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{where('ipvs.excludeCIDRs')}: {cidr!r} is not a CIDR") from None
    return cfg if sched == cfg.scheduler else replace(cfg, scheduler=sched)


def parse_cidr_list(text: str, flag: str) -> tuple[str, ...]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(parse_cidr(item, flag, "value"))
        except InvalidObject:
            raise ConfigError(f"{flag}: {item!r} is not a CIDR") from None
    return tuple(out)


def parse_nodeport_addresses(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["primary"]:
        return ("primary",)
    if "primary" in items:
        raise ConfigError("--nodeport-addresses: 'primary' cannot be combined with CIDRs")
    return parse_cidr_list(text, "--nodeport-addresses")


def validate(cfg: ProxyConfig) -> ProxyConfig:
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: {cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.detect_local_mode not in DETECT_MODES:
        raise ConfigError(f"detectLocalMode: {cfg.detect_local_mode!r} is not one of {', '.join(DETECT_MODES)}")
    if not 0 <= cfg.masquerade_bit <= 31:
        raise ConfigError(f"masqueradeBit: {cfg.masquerade_bit} is not in 0-31")
    if cfg.iptables_backend not in ("", "nft", "legacy"):
        raise ConfigError(f"iptables backend: {cfg.iptables_backend!r} is not nft or legacy")
    if cfg.min_sync_period < 0 or cfg.sync_period <= 0:
        raise ConfigError("syncPeriod must be positive and minSyncPeriod not negative")
    return cfg


# ----------------------------------------------------------------------------------------------
# `kproxy run`: kube-proxy's KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) and flags.
#
# Guarantees:
# - Every field of a v1alpha1 KubeProxyConfiguration (any release since 1.20) and every kube-proxy
#   flag is accepted; values are typed and validated here, and an invalid one stops start-up with
#   a ConfigError naming the flag or the file field.
# - Defaulting follows upstream's v1alpha1 defaults: in the file, a zero value (`0s`, `""`, `0`)
#   of a defaulted field means the default, `null` means the default for pointer fields; a flag's
#   value is taken literally (`--iptables-min-sync-period=0s` means no minimum).
# - Precedence: defaults < file < flags given on the command line. (kube-proxy itself ignores
#   most flags once --config is given; kproxy applies them and logs which ones it applied.)
# - What kproxy does not act on is collected in `LoadedConfig.ignored` (set to a non-default
#   value) and `LoadedConfig.unknown` (file fields no release knows), for one warning.

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
DEFAULT_OOM_SCORE_ADJ = -999

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (`30s`, `1m30s`, `500ms`, `2h22m`, `0`), as metav1.Duration takes."""
    s = text.strip()
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"not a duration like '30s' or '1m30s': {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """The Go form of a whole-millisecond duration (`30s`, `1m0s`, `24h0m0s`, `500ms`)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    s_text = f"{s:g}s"
    if h:
        return f"{int(h)}h{int(m)}m{s_text}"
    if m:
        return f"{int(m)}m{s_text}"
    return s_text


# -- the schema --------------------------------------------------------------------------------

# Value kinds. "any" is a sub-object kproxy keeps opaque (logging.options, say).
KINDS = ("str", "bool", "int", "float", "duration", "list", "map", "any")


@dataclass(frozen=True, slots=True)
class Field:
    """One KubeProxyConfiguration field (dotted camelCase path) and how kproxy treats it."""

    path: str
    kind: str
    default: Any
    acted: bool
    # Go non-pointer fields that upstream defaults when zero: a zero in the file means default.
    zero_is_default: bool = True


def _f(path: str, kind: str, default: Any, acted: bool, zero_is_default: bool = True) -> Field:
    return Field(path, kind, default, acted, zero_is_default)


FIELDS: dict[str, Field] = {
    f.path: f
    for f in (
        _f("featureGates", "map", {}, False),
        _f("clientConnection.kubeconfig", "str", "", True),
        _f("clientConnection.acceptContentTypes", "str", "", False),
        _f("clientConnection.contentType", "str", "application/vnd.kubernetes.protobuf", False),
        _f("clientConnection.qps", "float", 5.0, False),
        _f("clientConnection.burst", "int", 10, False),
        _f("logging.format", "str", "text", True),
        _f("logging.verbosity", "int", 0, True),
        _f("logging.flushFrequency", "any", None, False),
        _f("logging.vmodule", "any", None, False),
        _f("logging.options", "any", None, False),
        _f("hostnameOverride", "str", "", True),
        _f("bindAddress", "str", "0.0.0.0", True),
        _f("healthzBindAddress", "str", f"0.0.0.0:{HEALTHZ_PORT}", True),
        _f("metricsBindAddress", "str", f"127.0.0.1:{METRICS_PORT}", True),
        _f("bindAddressHardFail", "bool", False, True),
        _f("enableProfiling", "bool", False, False),
        _f("showHiddenMetricsForVersion", "str", "", False),
        _f("mode", "str", "iptables", True),
        _f("iptables.masqueradeBit", "int", 14, True, zero_is_default=False),
        _f("iptables.masqueradeAll", "bool", False, True),
        _f("iptables.localhostNodePorts", "bool", True, True, zero_is_default=False),
        _f("iptables.snatNodeInternalIP", "bool", False, False, zero_is_default=False),
        _f("iptables.syncPeriod", "duration", 30.0, True),
        _f("iptables.minSyncPeriod", "duration", 1.0, True),
        _f("ipvs.syncPeriod", "duration", 30.0, True),
        _f("ipvs.minSyncPeriod", "duration", 0.0, True),
        _f("ipvs.scheduler", "str", "", True),
        _f("ipvs.excludeCIDRs", "list", [], True),
        _f("ipvs.strictARP", "bool", False, True),
        _f("ipvs.tcpTimeout", "duration", 0.0, True),
        _f("ipvs.tcpFinTimeout", "duration", 0.0, True),
        _f("ipvs.udpTimeout", "duration", 0.0, True),
        _f("nftables.masqueradeBit", "int", 14, False, zero_is_default=False),
        _f("nftables.masqueradeAll", "bool", False, False),
        _f("nftables.syncPeriod", "duration", 30.0, False),
        _f("nftables.minSyncPeriod", "duration", 1.0, False),
        _f("winkernel.networkName", "str", "", False),
        _f("winkernel.sourceVip", "str", "", False),
        _f("winkernel.enableDSR", "bool", False, False),
        _f("winkernel.rootHnsEndpointName", "str", "", False),
        _f("winkernel.forwardHealthCheckVip", "bool", False, False),
        _f("detectLocalMode", "str", DETECT_CLUSTER_CIDR, True),
        _f("detectLocal.bridgeInterface", "str", "", True),
        _f("detectLocal.interfaceNamePrefix", "str", "", True),
        _f("clusterCIDR", "str", "", True),
        _f("nodePortAddresses", "list", [], True),
        _f("oomScoreAdj", "int", DEFAULT_OOM_SCORE_ADJ, True, zero_is_default=False),
        _f("conntrack.maxPerCore", "int", 32768, False, zero_is_default=False),
        _f("conntrack.min", "int", 131072, False, zero_is_default=False),
        _f("conntrack.tcpEstablishedTimeout", "duration", 86400.0, True, zero_is_default=False),
        _f("conntrack.tcpCloseWaitTimeout", "duration", 3600.0, True, zero_is_default=False),
        _f("conntrack.tcpBeLiberal", "bool", False, True),
        _f("conntrack.udpTimeout", "duration", 0.0, True),
        _f("conntrack.udpStreamTimeout", "duration", 0.0, True),
        _f("configSyncPeriod", "duration", 900.0, False),
        _f("portRange", "str", "", False),
        _f("windowsRunAsService", "bool", False, False),
        # Removed from the API in 1.26 (userspace mode), still in old ConfigMaps.
        _f("udpIdleTimeout", "duration", 0.0, False),
        _f("resourceContainer", "str", "", False),
        # kproxy's own: the iptables backend ("" detects the node's).
        _f("kproxy.iptablesBackend", "str", "", True),
    )
}
_OBJECTS = {p.rsplit(".", 1)[0] for p in FIELDS if "." in p}


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag: kube-proxy's name, the field it sets, and its value kind.

    `path` None: a flag that lives outside the configuration (`--config`, `--cleanup`, legacy
    klog flags); `acted` says whether kproxy does something with it.
    """

    name: str
    kind: str
    path: str | None = None
    acted: bool = True
    default: Any = None
    help: str = ""
    # Flags kube-proxy keeps applying on top of --config (all others it ignores then).
    applies_with_config: bool = False


def _flag(name: str, path: str, help: str = "", kind: str | None = None) -> Flag:
    fld = FIELDS[path]
    kinds = {"list": "list", "map": "map"}
    return Flag(name, kind or kinds.get(fld.kind, fld.kind), path, fld.acted, fld.default, help)


def _only(name: str, kind: str, acted: bool, default: Any, help: str = "", with_config: bool = False) -> Flag:
    return Flag(name, kind, None, acted, default, help, with_config)


FLAGS: tuple[Flag, ...] = (
    _only("config", "str", True, "", "A KubeProxyConfiguration file (or a kube-proxy ConfigMap).", True),
    _only("write-config-to", "str", True, "", "Write the effective configuration here and exit.", True),
    _only("cleanup", "bool", True, False, "Remove every rule kproxy created and exit.", True),
    _only("init-only", "bool", True, False, "Apply the privileged set-up (sysctls) and exit.", True),
    _only("master", "str", True, "", "The API server's address (overrides the kubeconfig's).", True),
    _flag("kubeconfig", "clientConnection.kubeconfig", "Path to a kubeconfig file (default: in-cluster)."),
    _flag("kube-api-content-type", "clientConnection.contentType"),
    _flag("kube-api-burst", "clientConnection.burst"),
    _flag("kube-api-qps", "clientConnection.qps"),
    Flag("hostname-override", "str", "hostnameOverride", True, "", "This node's name [hostname].", True),
    _flag("bind-address", "bindAddress", "Override of the node's primary IP (no socket is bound)."),
    _flag("healthz-bind-address", "healthzBindAddress", "IP:port of /healthz and /livez; empty disables."),
    _flag("metrics-bind-address", "metricsBindAddress", "IP:port of /metrics; empty disables."),
    _flag("bind-address-hard-fail", "bindAddressHardFail", "Exit if healthz or metrics cannot bind."),
    _flag("profiling", "enableProfiling"),
    _flag("show-hidden-metrics-for-version", "showHiddenMetricsForVersion"),
    _flag("proxy-mode", "mode", "iptables or ipvs [iptables]."),
    _flag("mode", "mode", "Alias of --proxy-mode."),
    _flag("iptables-masquerade-bit", "iptables.masqueradeBit", "fwmark bit for SNAT, 0-31."),
    _flag("masquerade-all", "iptables.masqueradeAll", "SNAT all traffic sent to Service cluster IPs."),
    _flag("iptables-localhost-nodeports", "iptables.localhostNodePorts", "IPv4 NodePorts on 127.0.0.1."),
    _flag("iptables-sync-period", "iptables.syncPeriod", "Resync and check our rules at least this often."),
    _flag("sync-period", "iptables.syncPeriod", "The running mode's sync period, whichever mode."),
    _flag("iptables-min-sync-period", "iptables.minSyncPeriod", "Minimum time between syncs."),
    _flag("min-sync-period", "iptables.minSyncPeriod", "The running mode's minimum sync interval."),
    _flag("ipvs-sync-period", "ipvs.syncPeriod", "IPVS mode: resync at least this often."),
    _flag("ipvs-min-sync-period", "ipvs.minSyncPeriod", "IPVS mode: minimum time between syncs."),
    _flag("ipvs-scheduler", "ipvs.scheduler", "IPVS mode: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh [rr]."),
    _flag("ipvs-exclude-cidrs", "ipvs.excludeCIDRs", "IPVS mode: CIDRs whose virtual servers are not ours."),
    _flag("ipvs-strict-arp", "ipvs.strictARP", "IPVS mode: arp_ignore=1, arp_announce=2."),
    _flag("ipvs-tcp-timeout", "ipvs.tcpTimeout", "IPVS mode: idle TCP timeout; 0 leaves it."),
    _flag("ipvs-tcpfin-timeout", "ipvs.tcpFinTimeout", "IPVS mode: TCP FIN_WAIT timeout; 0 leaves it."),
    _flag("ipvs-udp-timeout", "ipvs.udpTimeout", "IPVS mode: UDP timeout; 0 leaves it."),
    _flag("detect-local-mode", "detectLocalMode", "ClusterCIDR|NodeCIDR|BridgeInterface|InterfaceNamePrefix"),
    _flag("pod-bridge-interface", "detectLocal.bridgeInterface", "Pods' bridge (BridgeInterface mode)."),
    _flag("pod-interface-name-prefix", "detectLocal.interfaceNamePrefix", "Pods' interface prefix."),
    _flag("cluster-cidr", "clusterCIDR", "Pod CIDRs, comma-separated (one per family)."),
    _flag("nodeport-addresses", "nodePortAddresses", "CIDRs, comma-separated, or 'primary'."),
    _flag("oom-score-adj", "oomScoreAdj", "oom_score_adj of the process, -1000..1000 [-999]."),
    _flag("conntrack-max-per-core", "conntrack.maxPerCore"),
    _flag("conntrack-min", "conntrack.min"),
    _flag("conntrack-tcp-timeout-established", "conntrack.tcpEstablishedTimeout", "0 leaves it [24h]."),
    _flag("conntrack-tcp-timeout-close-wait", "conntrack.tcpCloseWaitTimeout", "0 leaves it [1h]."),
    _flag("conntrack-tcp-be-liberal", "conntrack.tcpBeLiberal", "Set nf_conntrack_tcp_be_liberal."),
    _flag("conntrack-udp-timeout", "conntrack.udpTimeout", "UNREPLIED UDP; 0 leaves it."),
    _flag("conntrack-udp-timeout-stream", "conntrack.udpStreamTimeout", "ASSURED UDP; 0 leaves it."),
    _flag("config-sync-period", "configSyncPeriod"),
    _flag("feature-gates", "featureGates", kind="map"),
    _flag("proxy-port-range", "portRange"),
    _flag("udp-timeout", "udpIdleTimeout"),
    _flag("resource-container", "resourceContainer"),
    _flag("iptables-backend", "kproxy.iptablesBackend", "kproxy: nft or legacy (default: the node's)."),
    # Windows-only (winkernel), accepted so shared argument lists parse.
    _flag("network-name", "winkernel.networkName"),
    _flag("source-vip", "winkernel.sourceVip"),
    _flag("enable-dsr", "winkernel.enableDSR"),
    _flag("root-hns-endpoint-name", "winkernel.rootHnsEndpointName"),
    _flag("forward-healthcheck-vip", "winkernel.forwardHealthCheckVip"),
    _flag("windows-service", "windowsRunAsService"),
    # Logging (component-base logs API); kube-proxy applies them on top of --config.
    Flag("v", "int", "logging.verbosity", True, 0, "Log verbosity; 4 and above logs debug events.", True),
    Flag("logging-format", "str", "logging.format", True, "text", "text or json [json if not a tty].", True),
    Flag("vmodule", "str", "logging.vmodule", False, None, "", True),
    Flag("log-flush-frequency", "str", "logging.flushFrequency", False, None, "", True),
    _only("log-json-split-stream", "bool", False, False, with_config=True),
    _only("log-json-info-buffer-size", "str", False, "0", with_config=True),
    _only("log-text-split-stream", "bool", False, False, with_config=True),
    _only("log-text-info-buffer-size", "str", False, "0", with_config=True),
    # klog's own flags, removed from kube-proxy in 1.26 but still in older DaemonSets.
    _only("logtostderr", "bool", False, True, with_config=True),
    _only("alsologtostderr", "bool", False, False, with_config=True),
    _only("log-dir", "str", False, "", with_config=True),
    _only("log-file", "str", False, "", with_config=True),
    _only("log-file-max-size", "str", False, "1800", with_config=True),
    _only("log-backtrace-at", "str", False, ":0", with_config=True),
    _only("one-output", "bool", False, False, with_config=True),
    _only("skip-headers", "bool", False, False, with_config=True),
    _only("skip-log-headers", "bool", False, False, with_config=True),
    _only("add-dir-header", "bool", False, False, with_config=True),
    _only("stderrthreshold", "str", False, "2", with_config=True),
    # Deprecated in kube-proxy, still honoured there without --config.
    _only("healthz-port", "int", True, HEALTHZ_PORT, "Deprecated: use --healthz-bind-address; 0 disables."),
    _only("metrics-port", "int", True, METRICS_PORT, "Deprecated: use --metrics-bind-address; 0 disables."),
)
FLAGS_BY_NAME = {f.name: f for f in FLAGS}


# -- the result --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    """Per-namespace conntrack sysctls, in seconds; None leaves the kernel's value alone."""

    tcp_established_timeout: float | None = 86400.0
    tcp_close_wait_timeout: float | None = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float | None = None
    udp_stream_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything `kproxy run` needs, validated."""

    proxy: ProxyConfig
    kubeconfig: str = ""  # empty: in-cluster, then $KUBECONFIG / ~/.kube/config
    master: str = ""
    healthz_bind_address: str = f"0.0.0.0:{HEALTHZ_PORT}"  # empty: disabled
    metrics_bind_address: str = f"127.0.0.1:{METRICS_PORT}"  # empty: disabled
    bind_address: str = ""  # the node's primary IP override; empty or unspecified: none
    bind_address_hard_fail: bool = False
    oom_score_adj: int | None = DEFAULT_OOM_SCORE_ADJ
    conntrack: ConntrackConfig = ConntrackConfig()
    log_format: str = ""  # "", "text" or "json"; empty: JSON when stderr is not a terminal
    verbosity: int = 0
    config_file: str = ""
    write_config_to: str = ""
    cleanup: bool = False
    init_only: bool = False
    ipvs: IpvsConfig = IpvsConfig()

    @property
    def log_level(self) -> str:
        return "debug" if self.verbosity >= 4 else "info"


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: RunConfig
    # "--flag=value" or "field=value (file)" for everything set that kproxy does not act on.
    ignored: tuple[str, ...] = ()
    # File fields that no KubeProxyConfiguration release has.
    unknown: tuple[str, ...] = ()
    # Flags applied over the file that kube-proxy would have ignored because of --config.
    overriding: tuple[str, ...] = ()
    # The effective values by field path, for --write-config-to.
    values: Mapping[str, Any] = field(default_factory=dict)


# -- loading -----------------------------------------------------------------------------------


def load_run_config(flags: Mapping[str, Any], *, hostname: str | None = None) -> LoadedConfig:
    """Resolve defaults, `--config` FILE and the flags given into a validated RunConfig.

    `flags` maps flag names (without dashes) to the values given on the command line: strings,
    True for a bare boolean flag, or tuples for repeatable flags. Flags not given are absent.
    """
    for name in flags:
        if name not in FLAGS_BY_NAME:
            raise ConfigError(f"--{name}: unknown flag")
    values: dict[str, Any] = {p: f.default for p, f in FIELDS.items()}
    origin: dict[str, str] = {p: p for p in FIELDS}
    ignored: list[str] = []
    unknown: list[str] = []

    config_file = str(flags.get("config") or "")
    if config_file:
        for path, value, where in _read_config_file(config_file, unknown):
            values[path] = value
            origin[path] = where

    overriding = []
    flag_only: dict[str, Any] = {}
    for name, raw in flags.items():
        flag = FLAGS_BY_NAME[name]
        where = f"--{name}"
        value = _parse_flag(flag, raw)
        if flag.path is None:
            flag_only[name] = value
            if not flag.acted and value != flag.default:
                ignored.append(f"--{name}={raw if not isinstance(raw, tuple) else ','.join(raw)}")
            continue
        if config_file and not flag.applies_with_config:
            overriding.append(where)
        values[flag.path] = value
        origin[flag.path] = where

    if not config_file:
        # kube-proxy's deprecated port flags apply only without a config file.
        if "healthz-port" in flag_only:
            values["healthzBindAddress"] = _with_port(values["healthzBindAddress"], flag_only["healthz-port"])
            origin["healthzBindAddress"] = "--healthz-port"
        if "metrics-port" in flag_only:
            values["metricsBindAddress"] = _with_port(values["metricsBindAddress"], flag_only["metrics-port"])
            origin["metricsBindAddress"] = "--metrics-port"

    for path, fld in FIELDS.items():
        if not fld.acted and _differs(fld, values[path]):
            ignored.append(f"{origin[path]}={_show(values[path], fld.kind)}")

    config = _build(values, origin, flag_only, config_file, hostname)
    ignored += _other_mode_fields(config.proxy.mode, values, origin)
    return LoadedConfig(
        config=config,
        ignored=tuple(ignored),
        unknown=tuple(unknown),
        overriding=tuple(overriding),
        values=values,
    )


# Fields only one mode reads (kube-proxy ignores them silently in the other).
MODE_FIELDS = {
    "iptables": ("iptables.syncPeriod", "iptables.minSyncPeriod"),
    "ipvs": tuple(p for p in FIELDS if p.startswith("ipvs.")),
}


def acted_on(path: str) -> str:
    """For the reference: "yes", "no", or the one mode that reads the field."""
    if not FIELDS[path].acted:
        return "no"
    return next((f"{mode} mode" for mode, paths in MODE_FIELDS.items() if path in paths), "yes")


def _other_mode_fields(mode: str, values: Mapping[str, Any], origin: Mapping[str, str]) -> list[str]:
    read = set(_sync_period_fields(mode, origin))
    return [
        f"{origin[path]}={_show(values[path], FIELDS[path].kind)}"
        for other, paths in MODE_FIELDS.items()
        if other != mode
        for path in paths
        if path not in read and _differs(FIELDS[path], values[path])
    ]


def _is_set(value: Any) -> bool:
    return value not in (None, "", 0, 0.0, False, [], {}, ())


def _differs(fld: Field, value: Any) -> bool:
    """Whether a value changes behaviour from the default (what an ignored field is warned for)."""
    if value is None or value == fld.default:
        return False
    if fld.kind == "any":
        return _any_set(value)
    return _is_set(value) or not fld.zero_is_default


def _any_set(value: Any) -> bool:
    # kubeadm writes logging.options with quantities of "0": zero is not a choice.
    if isinstance(value, dict):
        return any(_any_set(v) for v in value.values())
    if isinstance(value, list):
        return bool(value)
    return value not in (None, "", "0", 0, 0.0, False)


def _show(value: Any, kind: str = "") -> str:
    if kind == "duration" and isinstance(value, (int, float)):
        return format_duration(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _with_port(address: str, port: int) -> str:
    if port == 0:
        return ""
    host = split_host_port(address)[0] if address else "0.0.0.0"
    return join_host_port(host, port)


def _read_config_file(path: str, unknown: list[str]) -> list[tuple[str, Any, str]]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not YAML: {e}") from None
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        doc = _from_config_map(doc, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: not a KubeProxyConfiguration object")
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if kind != KIND or api_version != API_VERSION:
        raise ConfigError(f"--config {path}: apiVersion/kind is {api_version}/{kind}, expected {API_VERSION}/{KIND}")
    found: list[tuple[str, Any, str]] = []
    _walk(doc, "", path, found, unknown)
    return found


def _from_config_map(doc: dict[str, Any], path: str) -> Any:
    """A kube-proxy ConfigMap as `kubectl get -o yaml` prints it: its KubeProxyConfiguration key."""
    data = doc.get("data") or {}
    for key in ("config.conf", *sorted(data)):
        text = data.get(key)
        if isinstance(text, str) and KIND in text:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: data[{key}] is not YAML: {e}") from None
    raise ConfigError(f"--config {path}: the ConfigMap holds no {KIND}")


def _walk(obj: dict[str, Any], prefix: str, path: str, found: list[tuple[str, Any, str]], unknown: list[str]) -> None:
    for key, value in obj.items():
        full = f"{prefix}{key}"
        if not prefix and key in ("apiVersion", "kind"):
            continue
        fld = FIELDS.get(full)
        if fld is not None:
            where = f"{full} (in {path})"
            parsed = _parse_file_value(fld, value, where)
            if parsed is not None:
                found.append((full, parsed, where))
        elif full in _OBJECTS and isinstance(value, dict):
            _walk(value, f"{full}.", path, found, unknown)
        elif full in _OBJECTS and value is None:
            continue
        else:
            unknown.append(full)


def _parse_file_value(fld: Field, value: Any, where: str) -> Any:
    """The typed value, or None when the file leaves the default in place."""
    if value is None:
        return None
    parsed = _typed(fld.kind, value, where)
    if fld.zero_is_default and not _is_set(parsed) and fld.kind != "bool":
        return None  # upstream's v1alpha1 defaulting: a zero value means the default
    return parsed


def _typed(kind: str, value: Any, where: str) -> Any:
    if kind == "any":
        return value
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} is not a string")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not true or false")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not a whole number")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {value!r} is not a number")
    if kind == "duration":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} is not a duration like '30s' or '1m30s'")
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if kind == "list":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: {value!r} is not a list of strings")
    if kind == "map":
        if isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{where}: {value!r} is not a map of names to true/false")
    raise AssertionError(kind)


_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_FALSE = ("0", "f", "F", "false", "FALSE", "False")


def _parse_flag(flag: Flag, raw: Any) -> Any:
    """A flag's value as Go's pflag would parse it."""
    where = f"--{flag.name}"
    if flag.kind == "list":
        items = raw if isinstance(raw, tuple | list) else (raw,)
        return [v.strip() for item in items for v in str(item).split(",") if v.strip()]
    text = str(raw)
    if flag.name == "v":
        text = text.lstrip("=")  # click reads "-v=2" as "=2"
    if flag.kind == "bool":
        if raw is True or text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{where}: {text!r} is not true or false")
    if flag.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not a whole number") from None
    if flag.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {text!r} is not a number")
        return value
    if flag.kind == "duration":
        try:
            return parse_duration(text)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if flag.kind == "map":
        gates: dict[str, bool] = {}
        items = raw if isinstance(raw, tuple | list) else (raw,)
        for item in (p.strip() for r in items for p in str(r).split(",")):
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep or val.strip() not in _TRUE + _FALSE:
                raise ConfigError(f"{where}: {item!r} is not name=true|false")
            gates[key.strip()] = val.strip() in _TRUE
        return gates
    return text


# -- building and validating -------------------------------------------------------------------


def split_host_port(text: str) -> tuple[str, int | None]:
    """`IP:port` or `[IPv6]:port` (port None when absent, 0 for any); the host must be an IP."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: unbalanced [")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not IP:port")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""  # a bare IP (IPv6 without brackets has several colons)
    try:
        ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if port_text == "":
        return host, None
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"{text!r}: {port_text!r} is not a port number")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(value: str, where: str, default_port: int) -> str:
    """A bind address as `IP:port`, the port defaulted as upstream's AppendPortIfNeeded does."""
    if not value:
        return ""
    try:
        host, port = split_host_port(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return join_host_port(host, default_port if port is None else port)


def _build(
    values: dict[str, Any],
    origin: dict[str, str],
    flag_only: dict[str, Any],
    config_file: str,
    hostname: str | None,
) -> RunConfig:
    def where(path: str) -> str:
        return origin[path]

    mode = values["mode"] or "iptables"
    if mode not in MODES:
        raise ConfigError(f"{where('mode')}: {mode!r} is not iptables, ipvs or nftables")
    if mode not in RUN_MODES:
        raise ConfigError(f"{where('mode')}: {mode!r}: this build of kproxy runs the iptables and ipvs modes only")

    node_name = (values["hostnameOverride"] or "").strip().lower()
    if not node_name:
        if origin["hostnameOverride"] == "--hostname-override":
            raise ConfigError("--hostname-override: empty hostname-override is invalid")
        node_name = (hostname if hostname is not None else socket.gethostname()).strip().lower()
    if not node_name:
        raise ConfigError("hostnameOverride: the hostname is empty; set --hostname-override")

    bind = values["bindAddress"] or ""
    ipv6_bind = False
    if bind:
        try:
            ipv6_bind = ip_address(bind).version == 6
            bind = str(ip_address(bind))
        except ValueError:
            raise ConfigError(f"{where('bindAddress')}: {bind!r} is not an IP address") from None

    healthz = values["healthzBindAddress"]
    metrics = values["metricsBindAddress"]
    if ipv6_bind and origin["healthzBindAddress"] == "healthzBindAddress":
        healthz = f"[::]:{HEALTHZ_PORT}"
    if ipv6_bind and origin["metricsBindAddress"] == "metricsBindAddress":
        metrics = f"[::1]:{METRICS_PORT}"
    healthz = _address(healthz, where("healthzBindAddress"), HEALTHZ_PORT)
    metrics = _address(metrics, where("metricsBindAddress"), METRICS_PORT)

    try:
        cluster_cidrs = parse_cidr_list(values["clusterCIDR"], where("clusterCIDR"))
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    if len(cluster_cidrs) > 2 or len({":" in c for c in cluster_cidrs}) != len(cluster_cidrs):
        raise ConfigError(f"{where('clusterCIDR')}: at most one CIDR per IP family")
    nodeport_addresses = _nodeport_addresses(values["nodePortAddresses"], where("nodePortAddresses"))

    masq_bit = values["iptables.masqueradeBit"]
    if not 0 <= masq_bit <= 31:
        raise ConfigError(f"{where('iptables.masqueradeBit')}: {masq_bit} is not in 0-31")
    period_path, min_path = _sync_period_fields(mode, origin)
    sync_period, min_sync = values[period_path], values[min_path]
    if sync_period <= 0:
        raise ConfigError(f"{where(period_path)}: must be greater than 0")
    if min_sync < 0:
        raise ConfigError(f"{where(min_path)}: must be 0 or more")
    ipvs = validate_ipvs_config(
        IpvsConfig(
            scheduler=values["ipvs.scheduler"],
            strict_arp=values["ipvs.strictARP"],
            tcp_timeout=values["ipvs.tcpTimeout"],
            tcp_fin_timeout=values["ipvs.tcpFinTimeout"],
            udp_timeout=values["ipvs.udpTimeout"],
            exclude_cidrs=parse_cidr_list(",".join(values["ipvs.excludeCIDRs"]), where("ipvs.excludeCIDRs")),
        ),
        where,
    )
    if values["configSyncPeriod"] <= 0:
        raise ConfigError(f"{where('configSyncPeriod')}: must be greater than 0")

    detect = values["detectLocalMode"] or DETECT_CLUSTER_CIDR
    if detect not in DETECT_MODES:
        raise ConfigError(f"{where('detectLocalMode')}: {detect!r} is not one of {', '.join(DETECT_MODES)}")
    bridge = values["detectLocal.bridgeInterface"]
    prefix = values["detectLocal.interfaceNamePrefix"]
    if detect == "BridgeInterface" and not bridge:
        raise ConfigError(f"{where('detectLocal.bridgeInterface')}: required with detectLocalMode BridgeInterface")
    if detect == "InterfaceNamePrefix" and not prefix:
        raise ConfigError(
            f"{where('detectLocal.interfaceNamePrefix')}: required with detectLocalMode InterfaceNamePrefix"
        )

    oom = values["oomScoreAdj"]
    if oom is not None and not -1000 <= oom <= 1000:
        raise ConfigError(f"{where('oomScoreAdj')}: {oom} is not in -1000..1000")
    for path in ("conntrack.maxPerCore", "conntrack.min"):
        if values[path] < 0:
            raise ConfigError(f"{where(path)}: must be 0 or more")
    conntrack_timeouts = {}
    for path in (
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.udpTimeout",
        "conntrack.udpStreamTimeout",
    ):
        if values[path] < 0:
            raise ConfigError(f"{where(path)}: must be 0 or more")
        # Zero leaves the kernel's value alone, as upstream ("must be greater than 0 to set").
        conntrack_timeouts[path] = values[path] or None

    log_format = values["logging.format"]
    if log_format not in ("text", "json"):
        raise ConfigError(f"{where('logging.format')}: {log_format!r} is not text or json")
    if origin["logging.format"] == "logging.format":
        log_format = ""  # not chosen: JSON when stderr is not a terminal
    verbosity = values["logging.verbosity"]
    if verbosity < 0:
        raise ConfigError(f"{where('logging.verbosity')}: must be 0 or more")

    backend = values["kproxy.iptablesBackend"]
    proxy = validate(
        ProxyConfig(
            mode=mode,
            node_name=node_name,
            cluster_cidrs=cluster_cidrs,
            nodeport_addresses=nodeport_addresses,
            masquerade_all=values["iptables.masqueradeAll"],
            masquerade_bit=masq_bit,
            localhost_nodeports=values["iptables.localhostNodePorts"],
            detect_local_mode=detect,
            bridge_interface=bridge,
            interface_name_prefix=prefix,
            conntrack_tcp_liberal=values["conntrack.tcpBeLiberal"],
            iptables_backend=backend,
            min_sync_period=min_sync,
            sync_period=sync_period,
        )
    )
    return RunConfig(
        proxy=proxy,
        kubeconfig=values["clientConnection.kubeconfig"],
        master=str(flag_only.get("master", "")),
        healthz_bind_address=healthz,
        metrics_bind_address=metrics,
        bind_address=bind,
        bind_address_hard_fail=values["bindAddressHardFail"],
        oom_score_adj=oom,
        conntrack=ConntrackConfig(
            tcp_established_timeout=conntrack_timeouts["conntrack.tcpEstablishedTimeout"],
            tcp_close_wait_timeout=conntrack_timeouts["conntrack.tcpCloseWaitTimeout"],
            tcp_be_liberal=values["conntrack.tcpBeLiberal"],
            udp_timeout=conntrack_timeouts["conntrack.udpTimeout"],
            udp_stream_timeout=conntrack_timeouts["conntrack.udpStreamTimeout"],
        ),
        log_format=log_format,
        verbosity=verbosity,
        config_file=config_file,
        write_config_to=str(flag_only.get("write-config-to", "")),
        cleanup=bool(flag_only.get("cleanup", False)),
        init_only=bool(flag_only.get("init-only", False)),
        ipvs=ipvs,
    )


def _sync_period_fields(mode: str, origin: Mapping[str, str]) -> tuple[str, str]:
    """The fields holding this mode's sync period and minimum sync interval.

    As kube-proxy: each mode reads its own section. The mode-neutral flags are stored in the
    iptables fields, so in the IPVS mode they win over the ipvs ones when given.
    """
    if mode != "ipvs":
        return "iptables.syncPeriod", "iptables.minSyncPeriod"
    return (
        "iptables.syncPeriod" if origin["iptables.syncPeriod"] == "--sync-period" else "ipvs.syncPeriod",
        "iptables.minSyncPeriod" if origin["iptables.minSyncPeriod"] == "--min-sync-period" else "ipvs.minSyncPeriod",
    )


def _nodeport_addresses(items: list[str], where: str) -> tuple[str, ...]:
    """CIDRs, or 'primary'; the keywords 'localhost' and 'all' of recent releases expand to CIDRs."""
    expanded: list[str] = []
    for item in items:
        if item == "localhost":
            expanded += ["127.0.0.0/8", "::1/128"]
        elif item == "all":
            expanded += ["0.0.0.0/0", "::/0"]
        else:
            expanded.append(item)
    try:
        return parse_nodeport_addresses(",".join(expanded))
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


def dump_config(values: Mapping[str, Any]) -> str:
    """The effective configuration as a v1alpha1 KubeProxyConfiguration YAML document."""
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    for path, value in values.items():
        if path.startswith("kproxy.") or path in ("udpIdleTimeout", "resourceContainer"):
            continue
        fld = FIELDS[path]
        out = format_duration(value) if fld.kind == "duration" and value is not None else value
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = out
    return str(yaml.safe_dump(doc, sort_keys=True))
