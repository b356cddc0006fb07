"""The kproxy command line (contracts in docs/architecture.md, DESIGN.md section 3).

Exit status: 0 done; 2 unusable input as a whole (a bad flag, no such file, not YAML); 1 the
kernel refused. A malformed object is skipped with a line on stderr and is no reason to stop,
unless --strict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from kproxy import __version__
from kproxy.cli_exits import exits
from kproxy.config import MODES, ProxyConfig, parse_cidr_list, parse_nodeport_addresses, validate
from kproxy.errors import BackendError, ConfigError, InputError, InvalidObject
from kproxy.ipvs_mode import ipvs_options
from kproxy.model import ClusterState, IPFamily

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
@click.version_option(__version__, prog_name="kproxy")
def main() -> None:
    """kproxy: a Kubernetes service proxy with an nginx ingress module."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


def state_options(fn: F) -> F:
    for opt in reversed(
        [
            click.option("--mode", type=click.Choice(MODES), default="iptables", show_default=True),
            click.option("--node", "node_name", required=True, help="This node's name: endpoints on it are local."),
            click.option("--state", "state_paths", multiple=True, help="YAML file or directory (repeatable)."),
            click.option("--kubeconfig", default=None, help="Read the API server instead of --state."),
            click.option("--cluster-cidr", default="", help="Pod CIDRs, comma-separated (one per family)."),
            click.option("--nodeport-addresses", default="", help="CIDRs, comma-separated, or 'primary'."),
            click.option("--masquerade-all", is_flag=True, help="SNAT all Service traffic."),
            click.option(
                "--detect-local-mode",
                type=click.Choice(["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"]),
                default="ClusterCIDR",
                show_default=True,
            ),
            click.option("--pod-bridge-interface", default=""),
            click.option("--pod-interface-name-prefix", default=""),
            click.option(
                "--iptables-backend",
                type=click.Choice(["", "nft", "legacy"]),
                default="",
                help="Default: the backend the node already uses.",
            ),
            click.option("--strict", is_flag=True, help="Exit 2 if any object was skipped."),
        ]
    ):
        fn = opt(fn)
    return fn


def _config(kw: dict[str, Any]) -> ProxyConfig:
    return validate(
        ProxyConfig(
            mode=kw["mode"],
            node_name=kw["node_name"],
            cluster_cidrs=parse_cidr_list(kw["cluster_cidr"], "--cluster-cidr"),
            nodeport_addresses=parse_nodeport_addresses(kw["nodeport_addresses"]),
            masquerade_all=kw["masquerade_all"],
            detect_local_mode=kw["detect_local_mode"],
            bridge_interface=kw["pod_bridge_interface"],
            interface_name_prefix=kw["pod_interface_name_prefix"],
            iptables_backend=kw["iptables_backend"],
        )
    )


def _load(kw: dict[str, Any], cfg: ProxyConfig) -> ClusterState:
    from kproxy.sources.files import load_objects
    from kproxy.state import build_state

    if kw["state_paths"]:
        objects = load_objects(kw["state_paths"])
    else:
        from kproxy.sources.api import list_once

        objects = list_once(cfg.node_name, kw["kubeconfig"])
    state, rejected = build_state(objects, service_proxy_name=cfg.service_proxy_name)
    _report(rejected)
    if rejected and kw["strict"]:
        raise InputError(f"{len(rejected)} object(s) skipped and --strict given")
    return state


def _report(rejected: list[InvalidObject]) -> None:
    for e in rejected:
        click.echo(f"kproxy: skipped {e}", err=True)


def _require_mode(mode: str) -> None:
    if mode not in ("iptables", "ipvs"):
        raise ConfigError(f"--mode {mode}: this build has the iptables and ipvs modes only so far")


@main.command()
@state_options
@click.option("--dry-run", is_flag=True, help="Print what would be written; change nothing.")
@ipvs_options
@exits
def sync(dry_run: bool, **kw: Any) -> None:
    """Read the cluster state once, program this network namespace once, and exit."""
    from kproxy.backends.conntrack import Conntrack
    from kproxy.backends.host import local_addresses
    from kproxy.backends.iptables import Iptables, detect_variant
    from kproxy.families import kernel_families
    from kproxy.proxier.base import family_view, node_context
    from kproxy.proxier.iptables_proxier import IptablesProxier

    cfg = _config(kw)
    _require_mode(cfg.mode)
    if cfg.mode == "ipvs":
        from kproxy.ipvs_mode import ipvs_config, sync_ipvs

        ipvs_cfg = ipvs_config(kw)
        state = _load(kw, cfg)
        # A dry run writes no rules: no need to find out which iptables the node uses.
        variant = cfg.iptables_backend or ("nft" if dry_run else detect_variant())
        sync_ipvs(cfg, ipvs_cfg, state, dry_run=dry_run, variant=variant)
        return
    state = _load(kw, cfg)
    node = state.nodes.get(cfg.node_name)
    variant = cfg.iptables_backend or _detect(detect_variant, dry_run)
    for family in kernel_families():
        ctx = node_context(cfg, family, node, local_addresses(family))
        view = family_view(state, family)
        proxier = IptablesProxier(Iptables(family, variant), None if dry_run else Conntrack(family))
        result = proxier.sync(view, ctx, full=True, dry_run=dry_run)
        name = "IPv4" if family is IPFamily.V4 else "IPv6"
        if dry_run:
            click.echo(f"# {name}: iptables-restore --noflush input ({variant} backend)")
            click.echo(result.payload, nl=False)
            continue
        click.echo(
            f"{name}: {result.services} service ports, {result.endpoints} endpoints; "
            f"wrote {sum(result.written.values())} chains, deleted {sum(result.deleted.values())}; "
            f"render {result.render_seconds * 1000:.1f} ms, apply {result.apply_seconds * 1000:.1f} ms"
            + (f"; {result.conntrack_deleted} stale UDP flows deleted" if result.conntrack_deleted else "")
        )


def _detect(detect: Callable[[], str], dry_run: bool) -> str:
    try:
        return detect()
    except BackendError:
        if dry_run:
            return "nft"
        raise


def _parse_dst(text: str) -> tuple[str, int, str]:
    """`IP:PORT[/proto]`, with IPv6 as `[IP]:PORT`."""
    addr, _, proto = text.partition("/")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--dst: {text!r} is not IP:PORT[/tcp|udp|sctp]")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise ConfigError(f"--dst: unknown protocol {proto!r}")
    return host.strip("[]"), int(port), proto


@main.command()
@state_options
@click.option("--src", required=True, help="Source address of the packet.")
@click.option("--dst", required=True, help="IP:PORT[/tcp|udp|sctp] (IPv6 as [IP]:PORT).")
@click.option("--iface", default="eth0", show_default=True, help="Interface the packet arrives on.")
@ipvs_options
@exits
def trace(src: str, dst: str, iface: str, **kw: Any) -> None:
    """Explain where a packet goes through the rules kproxy would render for this node."""
    from kproxy.convert import parse_ip
    from kproxy.model import family_of
    from kproxy.proxier import iptables as ipt
    from kproxy.proxier.base import family_view, node_context
    from kproxy.testing.tracer import Tracer

    cfg = _config(kw)
    _require_mode(cfg.mode)
    dst_ip, port, proto = _parse_dst(dst)
    try:
        src, dst_ip = parse_ip(src, "--src", "value"), parse_ip(dst_ip, "--dst", "value")
    except InvalidObject as e:
        raise ConfigError(str(e)) from None
    family = family_of(dst_ip)
    if family_of(src) != family:
        raise ConfigError("--src and --dst must be of one IP family")
    state = _load(kw, cfg)
    node = state.nodes.get(cfg.node_name)
    if node is not None and node.addresses_of(family):
        host = node.addresses_of(family) + (("127.0.0.1",) if family is IPFamily.V4 else ("::1",))
    else:
        from kproxy.backends.host import local_addresses

        host = local_addresses(family)
    if cfg.mode == "ipvs":
        from kproxy.ipvs_mode import ipvs_config, trace_ipvs

        trace_ipvs(cfg, ipvs_config(kw), state, family, tuple(host), src, dst_ip, port, proto, iface)
        return
    ctx = node_context(cfg, family, node, host)
    view = family_view(state, family)
    ruleset = ipt.render(view.ports, view.endpoints, ctx)
    result = Tracer(ruleset, ctx.local_ips).trace(src, dst_ip, port, proto, iface)
    click.echo("\n".join(result.explain()))


@main.command()
@click.option("--mode", type=click.Choice(MODES + ("all",)), default="all", show_default=True)
@click.option("--upstream", is_flag=True, help="Also remove kube-proxy's leftovers (KUBE- chains).")
@exits
def cleanup(mode: str, upstream: bool) -> None:
    """Remove everything kproxy created in this network namespace, and nothing else."""
    from kproxy.cleanup import cleanup_iptables

    removed = cleanup_iptables(upstream=upstream)
    click.echo(f"removed {removed} chains")
    if mode in ("ipvs", "all"):
        from kproxy.ipvs_mode import cleanup_ipvs

        click.echo(cleanup_ipvs(upstream=upstream))


# Command groups living in their own modules.
from kproxy.cli_ingress import ingress  # noqa: E402
from kproxy.cli_lab import lab  # noqa: E402
from kproxy.cli_run import run  # noqa: E402

main.add_command(run)
main.add_command(lab)
main.add_command(ingress)

if __name__ == "__main__":
    main()
