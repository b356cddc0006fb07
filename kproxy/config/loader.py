"""Defaults, the --config file and the flags given, resolved into one validated `RunConfig`:
kube-proxy's KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) and flags.

Guarantees:
- Every field of a v1alpha1 KubeProxyConfiguration (any release since 1.20) and every kube-proxy
  flag is accepted; values are typed and validated here, and an invalid one stops start-up with
  a ConfigError naming the flag or the file field.
- Defaulting follows upstream's v1alpha1 defaults: in the file, a zero value (`0s`, `""`, `0`)
  of a defaulted field means the default, `null` means the default for pointer fields; a flag's
  value is taken literally (`--iptables-min-sync-period=0s` means no minimum).
- Precedence: defaults < file < flags given on the command line. (kube-proxy itself ignores
  most flags once --config is given; kproxy applies them and logs which ones it applied.)
- What kproxy does not act on is collected in `LoadedConfig.ignored` (set to a non-default
  value) and `LoadedConfig.unknown` (file fields no release knows), for one warning.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

from kproxy import modes as registry
from kproxy.config.file import is_set, read_config_file
from kproxy.config.syntax import format_duration, join_host_port, parse_duration, split_host_port
from kproxy.config.table import FIELDS, FLAGS_BY_NAME, HEALTHZ_PORT, METRICS_PORT, MODE_FIELDS, Field, Flag
from kproxy.config.values import (
    ConntrackConfig,
    IpvsConfig,
    LoadedConfig,
    ProxyConfig,
    RunConfig,
    parse_cidr_list,
    parse_nodeport_addresses,
    validate,
    validate_ipvs_config,
)
from kproxy.errors import ConfigError
from kproxy.node import DETECT_CLUSTER_CIDR, DETECT_MODES

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
        for path, value, where in read_config_file(config_file, unknown):
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


def _other_mode_fields(mode: str, values: Mapping[str, Any], origin: Mapping[str, str]) -> list[str]:
    read = set(_sync_period_fields(mode, origin)) | set(_masquerade_fields(mode, origin))
    candidates = [p for other, paths in MODE_FIELDS.items() if other != mode for p in paths]
    candidates += [p for p in registry.MODES[mode].ignores if p not in candidates]
    return [
        f"{origin[path]}={_show(values[path], FIELDS[path].kind)}"
        for path in candidates
        if path not in read and _differs(FIELDS[path], values[path])
    ]


def _differs(fld: Field, value: Any) -> bool:
    """Whether a value changes behaviour from the default (what an ignored field is warned for)."""
    if value is None or value == fld.default:
        return False
    if fld.kind == "any":
        return _any_set(value)
    return is_set(value) or not fld.zero_is_default


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
    if mode not in registry.KNOWN:
        raise ConfigError(f"{where('mode')}: {mode!r} is not {', '.join(registry.KNOWN[:-1])} or {registry.KNOWN[-1]}")
    if mode not in registry.MODES:
        built = " and ".join(registry.names())
        raise ConfigError(f"{where('mode')}: {mode!r}: this build of kproxy runs the {built} modes only")

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

    bit_path, all_path = _masquerade_fields(mode, origin)
    masq_bit = values[bit_path]
    if not 0 <= masq_bit <= 31:
        raise ConfigError(f"{where(bit_path)}: {masq_bit} is not in 0-31")
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
    if backend not in ("", "nft", "legacy"):
        raise ConfigError(f"{where('kproxy.iptablesBackend')}: {backend!r} is not nft or legacy")
    proxy = validate(
        ProxyConfig(
            mode=mode,
            node_name=node_name,
            cluster_cidrs=cluster_cidrs,
            nodeport_addresses=nodeport_addresses,
            masquerade_all=values[all_path],
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
    section = registry.MODES[mode].section
    if section == "iptables":
        return "iptables.syncPeriod", "iptables.minSyncPeriod"
    return (
        "iptables.syncPeriod" if origin["iptables.syncPeriod"] == "--sync-period" else f"{section}.syncPeriod",
        "iptables.minSyncPeriod"
        if origin["iptables.minSyncPeriod"] == "--min-sync-period"
        else f"{section}.minSyncPeriod",
    )


def _masquerade_fields(mode: str, origin: Mapping[str, str]) -> tuple[str, str]:
    """masqueradeBit and masqueradeAll: the nftables mode reads its own section, as kube-proxy's
    does, unless the flags (stored in the iptables fields) were given, which win as upstream's."""
    if registry.MODES[mode].section != "nftables":
        return "iptables.masqueradeBit", "iptables.masqueradeAll"
    return (
        "iptables.masqueradeBit"
        if origin["iptables.masqueradeBit"] == "--iptables-masquerade-bit"
        else "nftables.masqueradeBit",
        "iptables.masqueradeAll"
        if origin["iptables.masqueradeAll"] == "--masquerade-all"
        else "nftables.masqueradeAll",
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
