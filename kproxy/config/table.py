"""The one table of kube-proxy's KubeProxyConfiguration fields and command-line flags that feeds
`run`, `sync`, `trace` and the configuration reference; which fields only one mode or only the
daemon reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kproxy import modes as registry
from kproxy.node import DETECT_CLUSTER_CIDR

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
DEFAULT_OOM_SCORE_ADJ = -999


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
        _f("nftables.masqueradeBit", "int", 14, True, zero_is_default=False),
        _f("nftables.masqueradeAll", "bool", False, True),
        _f("nftables.syncPeriod", "duration", 30.0, True),
        _f("nftables.minSyncPeriod", "duration", 1.0, True),
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
OBJECTS = {p.rsplit(".", 1)[0] for p in FIELDS if "." in p}


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


# Fields only one mode reads (kube-proxy ignores them silently in the other).
MODE_FIELDS = {m.name: tuple(p for p in FIELDS if m.owns(p)) for m in registry.MODES.values()}


# What only the daemon uses: `kproxy sync` and `kproxy trace` take these settings (so that a
# node's whole command line or file can be replayed) and validate them, but a one-shot sync has
# no servers to bind, no periods, no process to protect and no log to configure; they have no
# effect there. kube-proxy's actions --cleanup and --init-only are run's only too (sync and trace
# refuse them: see kproxy.cli.main).
RUN_ONLY_FIELDS = frozenset(
    {
        "healthzBindAddress",
        "metricsBindAddress",
        "bindAddressHardFail",
        "oomScoreAdj",
        "iptables.syncPeriod",
        "iptables.minSyncPeriod",
        "ipvs.syncPeriod",
        "ipvs.minSyncPeriod",
        # The conntrack sysctls are start-up settings of the daemon (tcpBeLiberal also changes
        # the rules, so sync and trace act on it).
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.udpTimeout",
        "conntrack.udpStreamTimeout",
        "logging.format",
        "logging.verbosity",
    }
)
RUN_ONLY_FLAGS = frozenset({"cleanup", "init-only", "healthz-port", "metrics-port"})


def run_only(flag: Flag) -> bool:
    """Whether only `kproxy run` acts on this flag (sync and trace accept it to no effect)."""
    return flag.name in RUN_ONLY_FLAGS or (flag.path is not None and flag.path in RUN_ONLY_FIELDS)


def acted_on(path: str) -> str:
    """For the reference: "yes", "no", or the one mode that reads the field; "run only" added."""
    if not FIELDS[path].acted:
        return "no"
    where = next((f"{mode} mode" for mode, paths in MODE_FIELDS.items() if path in paths), "yes")
    return f"{where}, `run` only" if path in RUN_ONLY_FIELDS else where
