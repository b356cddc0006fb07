"""kproxy's configuration: one frozen value, with kube-proxy's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.errors import ConfigError
from kproxy.model import IPFamily
from kproxy.proxier.context import DETECT_CLUSTER_CIDR, DETECT_MODES
from kproxy.convert import parse_cidr
from kproxy.errors import InvalidObject

MODES = ("iptables", "ipvs", "nftables")


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
