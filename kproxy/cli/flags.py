"""kube-proxy's flags as click options: one table (`kproxy.config.FLAGS`) for run, sync and trace.

Every command built with `kube_proxy_options` accepts the same flags with kube-proxy's syntax
(``--flag=value`` or ``--flag value``; booleans as ``--flag``, ``--flag=true`` or
``--flag=false``; durations as ``30s``; lists comma-separated or repeated) and hands them,
untouched, to `kproxy.config.load_run_config`, which alone parses and validates them: a bad value
gets the same message and exit status 2 from each command. Click only collects strings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from kproxy.config import FLAGS, Flag

F = TypeVar("F", bound=Callable[..., Any])

# The click parameter name of each table flag ("iptables-sync-period" -> iptables_sync_period).
PARAMS = {flag.name.replace("-", "_"): flag.name for flag in FLAGS}


def _option(flag: Flag, hidden: bool) -> Callable[[F], F]:
    names = ["-v", "--v"] if flag.name == "v" else [f"--{flag.name}"]
    param = flag.name.replace("-", "_")
    common: dict[str, Any] = {"default": None, "hidden": hidden, "help": flag.help or None}
    if flag.kind == "bool":
        # Go's boolean flags: --flag, --flag=true, --flag=false.
        return click.option(*names, param, is_flag=False, flag_value="true", metavar="[=BOOL]", **common)
    if flag.kind in ("list", "map"):
        return click.option(*names, param, multiple=True, metavar="LIST", **{**common, "default": ()})
    metavar = {"duration": "DURATION", "int": "INT", "float": "NUMBER"}.get(flag.kind, "TEXT")
    return click.option(*names, param, metavar=metavar, **common)


def kube_proxy_options(hide: Callable[[Flag], bool] = lambda flag: False) -> Callable[[F], F]:
    """Every flag of the table as a click option, in the table's order.

    Hidden from ``--help``: flags kproxy does not act on, flags without a help line, and those
    `hide` names (still accepted).
    """

    def decorate(fn: F) -> F:
        for flag in reversed(FLAGS):
            fn = _option(flag, hidden=not flag.acted or not flag.help or hide(flag))(fn)
        return fn

    return decorate


def given(kw: dict[str, Any]) -> dict[str, Any]:
    """The table flags given on the command line, by flag name, as `load_run_config` takes them.

    Other parameters of the command (its own options) are left out.
    """
    return {PARAMS[name]: value for name, value in kw.items() if name in PARAMS and value is not None and value != ()}
