"""The kproxy command line (contracts in docs/architecture.md, DESIGN.md section 3).

Exit status: 0 done; 2 unusable input as a whole (a bad flag, no such file, not YAML); 1 the
kernel refused. A malformed object is skipped with a line on stderr and is no reason to stop,
unless --strict.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from kproxy import __version__
from kproxy import modes as registry
from kproxy.cli.exits import exits
from kproxy.cli.flags import given, kube_proxy_options
from kproxy.config import Flag, LoadedConfig, RunConfig, dump_config, load_run_config, run_only
from kproxy.errors import ConfigError, InputError, InvalidObject
from kproxy.model import ClusterState, IPFamily

F = TypeVar("F", bound=Callable[..., Any])


class _Commands(click.Group):
    """The command groups that live in their own modules are imported when named, not at start:
    `kproxy sync` should not pay for the ingress controller's and the daemon's imports."""

    LAZY = {
        "run": "kproxy.cli.run:run",
        "lab": "kproxy.cli.lab:lab",
        "ingress": "kproxy.cli.ingress:ingress",
        "status": "kproxy.cli.status:status",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = self.LAZY.get(cmd_name)
        if where is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = where.partition(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="kproxy")
def main() -> None:
    """kproxy: a Kubernetes service proxy with an nginx ingress module."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


# What sync's and trace's --help say about the flags they share with `kproxy run`.
_REPLAY_HELP = """

    Takes kube-proxy's flags and --config FILE exactly as `kproxy run` does (the same parsing,
    validation, messages and exit status 2; flags override the file), so one node's command
    line or KubeProxyConfiguration can be replayed. Settings only the daemon uses (healthz and
    metrics addresses, sync periods, conntrack sysctls, --oom-score-adj, logging) are accepted,
    hidden from this help and have no effect here; settings kproxy never acts on are named in
    one line on stderr, as `kproxy run` names them. --cleanup and --init-only are run's actions
    and are refused. --write-config-to writes the effective configuration and exits, as with
    `kproxy run`.
    """


def state_options(fn: F) -> F:
    """sync's and trace's own options (--node, --state, --strict); `replay_options` adds run's."""
    for opt in reversed(
        [
            click.option(
                "--node",
                "node_name",
                default=None,
                help="This node's name: endpoints on it are local (required; sets --hostname-override).",
            ),
            click.option("--state", "state_paths", multiple=True, help="YAML file or directory (repeatable)."),
            click.option("--strict", is_flag=True, help="Exit 2 if any object was skipped."),
        ]
    ):
        fn = opt(fn)
    return fn


def _hidden_here(flag: Flag) -> bool:
    return run_only(flag) or flag.name == "hostname-override"  # --node is the visible name


# `kproxy run`'s flags, from its table; daemon-only ones accepted but hidden from --help.
replay_options = kube_proxy_options(hide=_hidden_here)


def _load_config(kw: dict[str, Any], command: str) -> LoadedConfig:
    """The flags (with --node) and --config through `load_run_config`, plus what only a one-shot
    command requires: a node name given, not taken from this host's name as the daemon does (a
    dump is often another node's), and none of run's actions."""
    flags = given(kw)
    node = kw.get("node_name")
    if node is not None:
        if not node.strip():
            raise ConfigError("--node: empty node name is invalid")
        other = flags.get("hostname-override")
        if other is not None and str(other).strip().lower() != node.strip().lower():
            raise ConfigError(f"--node {node!r} and --hostname-override {other!r} name different nodes")
        flags["hostname-override"] = node
    loaded = load_run_config(flags)
    if not loaded.values["hostnameOverride"]:
        raise ConfigError(
            "--node: required: this node's name (--hostname-override, or hostnameOverride in the --config file)"
        )
    cfg = loaded.config
    if cfg.cleanup:
        raise ConfigError(f"--cleanup: kproxy {command} does not clean up; use kproxy cleanup")
    if cfg.init_only:
        raise ConfigError(f"--init-only: kproxy {command} applies no host settings; use kproxy run --init-only")
    if loaded.ignored or loaded.unknown:
        named = [*loaded.ignored, *(f"{path} (unknown field)" for path in loaded.unknown)]
        click.echo(f"kproxy: kproxy does not act on these settings: {', '.join(named)}", err=True)
    return loaded


def _written(loaded: LoadedConfig) -> bool:
    """--write-config-to: write the effective configuration, as `kproxy run` does; True if so."""
    path = loaded.config.write_config_to
    if not path:
        return False
    try:
        Path(path).write_text(dump_config(loaded.values))
    except OSError as e:
        raise ConfigError(f"--write-config-to {path}: {e.strerror or e}") from None
    click.echo(f"kproxy: effective configuration written to {path}", err=True)
    return True


def _load(kw: dict[str, Any], cfg: RunConfig) -> ClusterState:
    from kproxy.sources.files import iter_objects
    from kproxy.state import build_state

    global _heap_disposable
    _heap_disposable = True  # a one-shot command: what it loads lives until the process ends

    objects: Iterable[dict[str, Any]]
    if kw["state_paths"]:
        objects = iter_objects(kw["state_paths"])  # converted as they are read
    else:
        from kproxy.sources.api import list_once

        objects = list_once(cfg.proxy.node_name, cfg.kubeconfig or None, master=cfg.master)
    state, rejected = build_state(objects, service_proxy_name=cfg.proxy.service_proxy_name)
    # The cluster lives until the process ends: the collector need never scan it again (at
    # 10,000 Services it would, over and over, while the views and rules are built from it).
    gc.freeze()
    _report(rejected)
    if rejected and kw["strict"]:
        raise InputError(f"{len(rejected)} object(s) skipped and --strict given")
    return state


def _report(rejected: list[InvalidObject]) -> None:
    for e in rejected:
        click.echo(f"kproxy: skipped {e}", err=True)


@main.command(help=f"Read the cluster state once, program this network namespace once, and exit.{_REPLAY_HELP}")
@state_options
@click.option("--dry-run", is_flag=True, help="Print what would be written; change nothing.")
@replay_options
@exits
def sync(dry_run: bool, **kw: Any) -> None:
    loaded = _load_config(kw, "sync")
    if _written(loaded):
        return
    run_cfg = loaded.config
    state = _load(kw, run_cfg)
    click.echo(registry.MODES[run_cfg.proxy.mode].load().sync_once(run_cfg, state, dry_run=dry_run), nl=False)


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


@main.command(help=f"Explain where a packet goes through the rules kproxy would render for this node.{_REPLAY_HELP}")
@state_options
@click.option("--src", required=True, help="Source address of the packet.")
@click.option("--dst", required=True, help="IP:PORT[/tcp|udp|sctp] (IPv6 as [IP]:PORT).")
@click.option("--iface", default="eth0", show_default=True, help="Interface the packet arrives on.")
@replay_options
@exits
def trace(src: str, dst: str, iface: str, **kw: Any) -> None:
    from kproxy.convert import parse_ip
    from kproxy.model import family_of

    loaded = _load_config(kw, "trace")
    if _written(loaded):
        return
    run_cfg = loaded.config
    cfg = run_cfg.proxy
    dst_ip, port, proto = _parse_dst(dst)
    try:
        src, dst_ip = parse_ip(src, "--src", "value"), parse_ip(dst_ip, "--dst", "value")
    except InvalidObject as e:
        raise ConfigError(str(e)) from None
    family = family_of(dst_ip)
    if family_of(src) != family:
        raise ConfigError("--src and --dst must be of one IP family")
    state = _load(kw, run_cfg)
    node = state.nodes.get(cfg.node_name)
    if node is not None and node.addresses_of(family):
        host = node.addresses_of(family) + (("127.0.0.1",) if family is IPFamily.V4 else ("::1",))
    else:
        from kproxy.backends.host import local_addresses

        host = local_addresses(family)
    mode = registry.MODES[cfg.mode].load()
    click.echo("\n".join(mode.trace(run_cfg, state, family, tuple(host), (src, dst_ip, port, proto, iface))))


@main.command()
@click.option("--mode", type=click.Choice(registry.KNOWN + ("all",)), default="all", show_default=True)
@click.option(
    "--upstream",
    is_flag=True,
    help="Also remove kube-proxy's leftovers: its KUBE- chains, and with the nftables mode its kube-proxy tables.",
)
@exits
def cleanup(mode: str, upstream: bool) -> None:
    """Remove everything kproxy created in this network namespace, and nothing else."""
    from kproxy.proxier.cleanup import cleanup_iptables

    removed = cleanup_iptables(upstream=upstream)
    click.echo(f"removed {removed} chains")
    for info in registry.MODES.values():
        if mode in (info.name, "all") and (summary := info.load().cleanup(upstream)):
            click.echo(summary)


# Set by the one-shot commands (sync, trace) once they load a cluster: see `entry`.
_heap_disposable = False


def entry() -> NoReturn:
    """The `kproxy` program: `main`, then the exit.

    After a one-shot command that loaded a cluster, the process ends without the interpreter
    freeing its heap object by object (half a second at 10,000 Services, a tenth of `kproxy
    sync`'s time besides the kernel's): the exit handlers run and the standard streams are
    flushed, then the kernel takes the memory back whole (as mypy's `hard_exit`). Other commands,
    the daemon above all, end as usual. Tests call `main` (click's runner), which never does this.
    """
    try:
        main()
    except SystemExit as done:
        if not _heap_disposable:
            raise
        code = done.code
    else:  # main() always raises SystemExit in standalone mode
        code = 0
    if code is None or isinstance(code, int):
        status = code or 0
    else:  # sys.exit("message"), as the interpreter would print it
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: nothing left to tell it
            status = status or 120  # what the interpreter exits with when its final flush fails
    os._exit(status)


if __name__ == "__main__":
    entry()
