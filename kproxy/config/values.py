"""The frozen configuration values every command reads (`ProxyConfig`, `IpvsConfig`, `RunConfig`), with
their validation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_network
from typing import Any

from kproxy import modes as registry
from kproxy.config.table import DEFAULT_OOM_SCORE_ADJ, HEALTHZ_PORT, METRICS_PORT
from kproxy.convert import parse_cidr
from kproxy.errors import ConfigError, InvalidObject
from kproxy.model import IPFamily
from kproxy.node import DETECT_CLUSTER_CIDR, DETECT_MODES

MODES = registry.KNOWN
RUN_MODES = registry.names()  # the modes this build implements


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
