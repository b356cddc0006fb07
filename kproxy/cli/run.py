"""`kproxy run`: the per-node daemon, with kube-proxy's command line.

Every kube-proxy flag is accepted with kube-proxy's syntax (``--flag=value`` or ``--flag value``;
booleans as ``--flag``, ``--flag=true`` or ``--flag=false``; durations as ``30s`` or ``1m30s``), so
a kube-proxy DaemonSet's arguments work as they are. Flags kproxy does not act on are hidden from
``--help`` and named in one ``config_ignored`` warning at start-up. Exit status: 0 after SIGTERM or
SIGINT (rules left in place), 2 unusable configuration (the message names the flag or field), 1 a
kernel or start-up failure, or a bug that stopped a thread.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from kproxy.cli.flags import given, kube_proxy_options
from kproxy.config import LoadedConfig, dump_config, load_run_config
from kproxy.errors import ConfigError, KproxyError
from kproxy.log import get_logger, setup


@click.command("run", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@kube_proxy_options()
def run(**kw: Any) -> None:
    """Watch the API server and keep this node's Service rules converged (kube-proxy's job).

    Takes kube-proxy's flags and --config FILE (a KubeProxyConfiguration, or a kube-proxy
    ConfigMap as kubectl prints it); flags given on the command line override the file.
    """
    try:
        loaded = load_run_config(given(kw))
    except ConfigError as e:
        click.echo(f"kproxy: {e}", err=True)
        sys.exit(2)
    cfg = loaded.config
    setup(level=cfg.log_level, json=None if not cfg.log_format else cfg.log_format == "json")
    _report(loaded)
    if cfg.write_config_to:
        Path(cfg.write_config_to).write_text(dump_config(loaded.values))
        get_logger("kproxy.run").info("config_written", path=cfg.write_config_to)
        return
    sys.exit(_main(loaded))


def _report(loaded: LoadedConfig) -> None:
    log = get_logger("kproxy.run")
    if loaded.ignored or loaded.unknown:
        log.warning(
            "config_ignored",
            message="kproxy does not act on these settings",
            ignored=list(loaded.ignored),
            unknown_fields=list(loaded.unknown),
        )
    if loaded.overriding:
        # kube-proxy ignores these flags once --config is given; kproxy applies them.
        log.info("config_flags_override_file", flags=list(loaded.overriding))


def _main(loaded: LoadedConfig) -> int:
    cfg = loaded.config
    log = get_logger("kproxy.run")
    try:
        if cfg.cleanup:
            # Every mode's leftovers whatever the configured mode, as kube-proxy --cleanup: the
            # mode a node ran before is not known.
            from kproxy import modes as registry
            from kproxy.proxier.cleanup import cleanup_iptables

            removed = cleanup_iptables()
            done = {info.name: info.load().cleanup(False) for info in registry.MODES.values()}
            log.info("cleanup_complete", removed_chains=removed, **{k: v for k, v in done.items() if v})
            return 0
        from kproxy.backends.process import limit_malloc_arenas
        from kproxy.daemon.daemon import build_daemon

        limit_malloc_arenas()  # before the daemon's threads start
        daemon = build_daemon(cfg)
        if cfg.init_only:
            daemon.apply_host_settings()
            return 0
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        code = daemon.run(stop)
        if code:
            log.error("kproxy_crashed", error=repr(daemon.crashed()))
        return code
    except ConfigError as e:
        click.echo(f"kproxy: {e}", err=True)
        return 2
    except KproxyError as e:  # a kernel tool failed, or a server could not bind (hard fail)
        click.echo(f"kproxy: {e}", err=True)
        return 1
