"""`kproxy status`: the effective Service table of this node (kproxy/status.py), and `--check`.

Three sources, one answer: state files (`--state`, as `kproxy sync` reads them), the API server
(as `kproxy sync` and `kproxy run` connect), or a running `kproxy run` (`--from URL`: its
`/debug/services`, so the answer is what the daemon last programmed, with the time of that
sync). Text that fits 100 columns, or `-o json` (the daemon's JSON); `--service NS/NAME`
narrows it. `--check` reads the kernel objects of this network namespace (the mode's names,
element keys and rule counts, never rule text) and names each difference: exit 1 if any, 0
when the kernel holds what the table says it should.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click

from kproxy import modes as registry
from kproxy.cli.exits import exits
from kproxy.cli.flags import given
from kproxy.cli.main import _load, _load_config, _written, replay_options, state_options
from kproxy.config import RunConfig, load_run_config
from kproxy.errors import ConfigError, InputError
from kproxy.model import IPFamily
from kproxy.status import expected_objects, only_service, service_key, service_table, text

DEBUG_PATH = "/debug/services"


def _service(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    key = service_key(value)
    if key is None:
        raise ConfigError(f"--service: {value!r} is not NAMESPACE/NAME")
    return key


def _fetch(url: str, service: tuple[str, str] | None) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    if not url.rstrip("/").endswith(DEBUG_PATH):
        url = url.rstrip("/") + DEBUG_PATH
    if service is not None:  # the daemon then describes that Service only (`only_service` still narrows)
        url += "?" + urllib.parse.urlencode({"service": "/".join(service)})
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            table: dict[str, Any] = json.load(answer)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InputError(f"--from: cannot read {url}: {e}") from None
    return table


def _compute(kw: dict[str, Any], service: tuple[str, str] | None) -> tuple[dict[str, Any], RunConfig] | None:
    from kproxy.backends.host import local_addresses
    from kproxy.families import kernel_families
    from kproxy.view import family_inputs

    loaded = _load_config(kw, "status")
    if _written(loaded):
        return None
    cfg = loaded.config
    state = _load(kw, cfg)
    mode = registry.MODES[cfg.proxy.mode].load()
    families = {
        family: family_inputs(cfg.proxy, cfg.bind_address, state, family, local_addresses(family))
        for family in kernel_families()
    }
    table = service_table(
        families,
        lambda view, ctx: mode.describe(cfg, view, ctx),
        mode=cfg.proxy.mode,
        source="state" if kw["state_paths"] else "api",
        service=service,
    )
    return table.to_json(), cfg


def _check(table: dict[str, Any], cfg: RunConfig, complete: bool) -> list[str]:
    mode = registry.MODES[table["mode"]].load()
    out = []
    for family, expected in sorted(expected_objects(table).items()):
        label = IPFamily(family).label
        out += [f"{label}: {d}" for d in mode.check(cfg, IPFamily(family), expected, complete)]
    return out


@click.command(
    "status",
    help="Show the effective Service table of this node: addresses, policies, which endpoints serve "
    "cluster and local traffic and why, REJECT or DROP, and the kernel objects of each Service port."
    "\n\nFrom --state files, the API server, or a running `kproxy run` (--from http://127.0.0.1:10256). "
    "Takes `kproxy sync`'s flags.",
)
@state_options
@click.option(
    "--from", "from_url", default=None, help="A running kproxy run's healthz address (reads /debug/services)."
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--service", "service_name", default=None, help="Only this Service (NAMESPACE/NAME).")
@click.option("--check", is_flag=True, help="Compare with what this kernel holds; exit 1 naming each difference.")
@replay_options
@exits
def status(from_url: str | None, output: str, service_name: str | None, check: bool, **kw: Any) -> None:
    service = _service(service_name)
    if from_url:
        if kw["state_paths"]:
            raise ConfigError("--from and --state: give one source")
        table = only_service(_fetch(from_url, service), service)
        if table.get("mode") not in registry.MODES:
            raise InputError(f"--from: the answer names no known mode ({table.get('mode')!r})")
        cfg = (
            load_run_config({k: v for k, v in given(kw).items() if k != "hostname-override"}).config if check else None
        )
    else:
        computed = _compute(kw, service)
        if computed is None:
            return
        table, cfg = computed
    if not check:
        click.echo(json.dumps(table, indent=1) if output == "json" else text(table), nl=output == "json")
        return
    assert cfg is not None
    differences = _check(table, cfg, complete=service is None)
    ports = len(table["servicePorts"])
    for line in differences:
        click.echo(line)
    if differences:
        click.echo(f"check: {len(differences)} difference(s) over {ports} Service port(s)")
        sys.exit(1)
    click.echo(f"check: the kernel holds what {ports} Service port(s) need")
