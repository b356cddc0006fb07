"""`kproxy ingress`: render an nginx configuration, run the Ingress controller, program hostPorts.

Exit status, as the rest of the CLI (DESIGN.md section 3): 0 done; 2 unusable input as a whole
(no such file, not YAML, a bad flag); 1 the kernel (or nginx) refused. A rejected Ingress,
path or annotation is named on stderr and is no reason to stop, unless ``--strict``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from kproxy.cli.exits import exits
from kproxy.errors import BackendError, ConfigError, InputError, InvalidObject

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def ingress() -> None:
    """The ingress module: nginx configuration, the Ingress controller, hostPorts on edge nodes."""


# --- shared pieces ---------------------------------------------------------------------------


def _by_kind(objects: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        out.setdefault(str(obj.get("kind", "")), []).append(dict(obj))
    return out


def _class_options(ingress_class: str | None, controller_class: str, without_class: bool) -> Any:
    from kproxy.ingress.convert import ClassOptions

    return ClassOptions(
        controller=controller_class, class_name=ingress_class or None, watch_without_class=without_class
    )


def class_flags(fn: F) -> F:
    from kproxy.ingress.convert import DEFAULT_CONTROLLER

    for opt in reversed(
        [
            click.option(
                "--ingress-class",
                default=None,
                help="Also serve Ingresses naming this class (ingressClassName or the old annotation).",
            ),
            click.option(
                "--controller-class",
                default=DEFAULT_CONTROLLER,
                show_default=True,
                help="Serve the IngressClasses whose spec.controller is this.",
            ),
            click.option(
                "--watch-ingress-without-class",
                is_flag=True,
                help="Serve Ingresses without any class when no default IngressClass exists.",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _https_port(value: int) -> int | None:
    return value or None


def _absolute(path: str, flag: str) -> str:
    p = str(Path(path).resolve())
    import re

    if not re.fullmatch(r"/[A-Za-z0-9/_.@:+,=-]*", p):
        raise ConfigError(f"{flag}: {p!r} must be a path of [A-Za-z0-9/_.@:+,=-] characters")
    return p


# --- render ----------------------------------------------------------------------------------


@ingress.command()
@click.option(
    "--state",
    "state_paths",
    multiple=True,
    required=True,
    help="YAML file or directory (repeatable): Ingress, IngressClass, Service, Secret, EndpointSlice.",
)
@click.option("--http-port", default=80, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--https-port", default=443, show_default=True, type=click.IntRange(0, 65535), help="0: no HTTPS listener."
)
@click.option(
    "--cert-dir", default=None, help="Write the TLS and htpasswd files from the Secrets here (TLS files mode 0600)."
)
@click.option(
    "--upstream-mode",
    type=click.Choice(["service", "endpoints"]),
    default="service",
    show_default=True,
    help="service: one upstream per Service ClusterIP (kproxy balances); endpoints: the ready endpoints.",
)
@class_flags
@click.option(
    "--gateway-controller-name",
    default="kproxy.io/gateway-controller",
    show_default=True,
    help="Serve the GatewayClasses whose spec.controllerName is this (Gateway API).",
)
@click.option("--strict", is_flag=True, help="Exit 2 if any object, path or annotation was rejected.")
@exits
def render(
    state_paths: tuple[str, ...],
    http_port: int,
    https_port: int,
    cert_dir: str | None,
    upstream_mode: str,
    ingress_class: str | None,
    controller_class: str,
    watch_ingress_without_class: bool,
    gateway_controller_name: str,
    strict: bool,
) -> None:
    """Print the nginx configuration for the Ingresses and Gateway API routes in --state."""
    from kproxy.log import setup

    setup(level="error")
    from kproxy.ingress.convert import build_routes
    from kproxy.ingress.nginx import NginxOptions, UpstreamMode
    from kproxy.ingress.nginx import render as render_nginx
    from kproxy.ingress.reload import write_files
    from kproxy.sources.files import load_objects

    objects = _by_kind(load_objects(state_paths))
    services, rejected = _services(objects.get("Service", []))
    endpoints = _endpoints(objects.get("EndpointSlice", []), rejected) if upstream_mode == "endpoints" else {}
    table = build_routes(
        objects.get("Ingress", []),
        services,
        objects.get("Secret", []),
        objects.get("IngressClass", []),
        _class_options(ingress_class, controller_class, watch_ingress_without_class),
    )
    table = _with_gateway(table, objects, services, gateway_controller_name, http_port, _https_port(https_port))
    kw: dict[str, Any] = {
        "http_port": http_port,
        "https_port": _https_port(https_port),
        "upstream_mode": UpstreamMode(upstream_mode),
    }
    if cert_dir is not None:
        kw["cert_dir"] = _absolute(cert_dir, "--cert-dir")
    try:
        options = NginxOptions(**kw)
    except ConfigError as e:
        raise ConfigError(f"bad option: {e}") from None
    cfg = render_nginx(table, options, endpoints)
    for skipped in rejected:
        click.echo(f"kproxy: skipped {skipped}", err=True)
    reasons = sorted(set(table.reasons) | set(cfg.reasons), key=lambda r: (r.ref, r.field, r.message))
    for r in reasons:
        click.echo(f"kproxy: {r}", err=True)
    if cert_dir is not None:
        write_files(cfg, secure_certs=True)
    elif cfg.files:
        click.echo(
            f"kproxy: {len(cfg.files)} TLS/auth file(s) referenced under {options.cert_dir} were not "
            "written (no --cert-dir)",
            err=True,
        )
    click.echo(cfg.text, nl=False)
    if strict and (rejected or reasons):
        raise InputError(f"{len(rejected) + len(reasons)} object(s) or part(s) rejected and --strict given")


# --- convert ---------------------------------------------------------------------------------


@ingress.command()
@click.option(
    "--state",
    "state_paths",
    multiple=True,
    required=True,
    help="YAML file or directory (repeatable): Ingress, IngressClass, Service, Secret.",
)
@click.option("--gateway-class", default="kproxy", show_default=True, help="Name of the GatewayClass written.")
@click.option(
    "--gateway-controller-name",
    default="kproxy.io/gateway-controller",
    show_default=True,
    help="spec.controllerName of the GatewayClass written.",
)
@click.option(
    "--gateway-namespace", default="default", show_default=True, help="Namespace of the Gateways (one per class)."
)
@click.option("--http-port", default=80, show_default=True, type=click.IntRange(1, 65535))
@click.option("--https-port", default=443, show_default=True, type=click.IntRange(1, 65535))
@exits
def convert(
    state_paths: tuple[str, ...],
    gateway_class: str,
    gateway_controller_name: str,
    gateway_namespace: str,
    http_port: int,
    https_port: int,
) -> None:
    """Print Gateway API objects equivalent to the Ingresses in --state (leaving ingress-nginx).

    Every annotation or feature that could not be carried over is named on stderr, per object.
    """
    from kproxy.ingress.migrate import MigrateOptions, migrate
    from kproxy.log import setup
    from kproxy.sources.files import load_objects

    setup(level="error")
    import re

    if not re.fullmatch(_DNS_LABEL, gateway_namespace):
        raise ConfigError(f"--gateway-namespace: {gateway_namespace!r} is not a namespace name")
    if not re.fullmatch(_DNS_SUBDOMAIN, gateway_class):
        raise ConfigError(f"--gateway-class: {gateway_class!r} is not a DNS subdomain name")
    objects = _by_kind(load_objects(state_paths))
    services, rejected = _services(objects.get("Service", []))
    result = migrate(
        objects.get("Ingress", []),
        services,
        objects.get("Secret", []),
        objects.get("IngressClass", []),
        MigrateOptions(gateway_class, gateway_controller_name, gateway_namespace, http_port, https_port),
    )
    for skipped in rejected:
        click.echo(f"kproxy: skipped {skipped}", err=True)
    for r in result.reasons:
        click.echo(f"kproxy: {r}", err=True)
    click.echo(_yaml_documents(result.objects), nl=False)


def _yaml_documents(objects: list[dict[str, Any]]) -> str:
    """YAML documents without anchors or aliases (shared dicts are written out each time)."""
    import yaml

    class PlainDumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return str(yaml.dump_all(objects, Dumper=PlainDumper, sort_keys=False))


_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?"


GATEWAY_KINDS = ("GatewayClass", "Gateway", "HTTPRoute", "ReferenceGrant")


def _with_gateway(
    table: Any,
    objects: Mapping[str, list[dict[str, Any]]],
    services: list[Any],
    controller: str,
    http_port: int,
    https_port: int | None,
) -> Any:
    """The Ingress table plus the Gateway API servers (Gateway listener ports are served as
    written; the Ingress ports are the conflict boundary of `gateway.combine`)."""
    if not any(objects.get(k) for k in GATEWAY_KINDS):
        return table
    from kproxy.ingress.gateway import GatewayOptions, build_gateway, combine

    opts = GatewayOptions(controller=controller, ingress_http_port=http_port, ingress_https_port=https_port)
    result = build_gateway(
        objects.get("GatewayClass", []),
        objects.get("Gateway", []),
        objects.get("HTTPRoute", []),
        services,
        objects.get("Secret", []),
        objects.get("ReferenceGrant", []),
        objects.get("Namespace", []),
        opts,
    )
    return combine(table, result, opts)


def _services(objs: Iterable[dict[str, Any]]) -> tuple[list[Any], list[InvalidObject]]:
    from kproxy.convert import convert_service

    out, rejected = [], []
    for obj in objs:
        try:
            svc = convert_service(obj)
        except InvalidObject as e:
            rejected.append(e)
            continue
        if svc is not None:
            out.append(svc)
    return out, rejected


def _endpoints(objs: Iterable[dict[str, Any]], rejected: list[InvalidObject]) -> dict[Any, tuple[Any, ...]]:
    from kproxy.convert import convert_slice
    from kproxy.endpointslices import endpoints_by_port
    from kproxy.model import IPFamily

    slices = []
    for obj in objs:
        try:
            es = convert_slice(obj)
        except InvalidObject as e:
            rejected.append(e)
            continue
        if es is not None:
            slices.append(es)
    merged: dict[Any, tuple[Any, ...]] = {}
    for family in IPFamily:
        for name, eps in endpoints_by_port(slices, family).items():
            merged[name] = merged.get(name, ()) + eps
    return merged


# --- controller ------------------------------------------------------------------------------


@ingress.command()
@click.option("--kubeconfig", default=None, help="Default: in-cluster, then $KUBECONFIG / ~/.kube/config.")
@click.option("--node", "node_name", default="", help="This node's name (events and logs say who reported).")
@class_flags
@click.option("--nginx-binary", default="/usr/sbin/nginx", show_default=True)
@click.option(
    "--state-dir",
    default="/var/lib/kproxy/ingress",
    show_default=True,
    help="nginx prefix: nginx.conf, certificates, pid and temp files.",
)
@click.option("--http-port", default=80, show_default=True, type=click.IntRange(1, 65535))
@click.option("--https-port", default=443, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--listen-address",
    "listen_addresses",
    multiple=True,
    default=("0.0.0.0",),
    show_default=True,
    help="Address nginx listens on (repeatable).",
)
@click.option("--upstream-mode", type=click.Choice(["service", "endpoints"]), default="service", show_default=True)
@click.option(
    "--publish-status-address",
    default="",
    help="Comma-separated IPs or hostnames for status.loadBalancer (default: the edge nodes').",
)
@click.option(
    "--edge-node-selector",
    default="node-role.kubernetes.io/edge",
    show_default=True,
    help="Label selector of the edge nodes, whose addresses are published in Ingress status.",
)
@click.option("--worker-user", default="", help="user:group for nginx workers when run as root.")
@click.option(
    "--gateway-api",
    is_flag=True,
    help="Also serve Gateway API (GatewayClass, Gateway, HTTPRoute, ReferenceGrant); install the CRDs first.",
)
@click.option(
    "--gateway-controller-name",
    default="kproxy.io/gateway-controller",
    show_default=True,
    help="With --gateway-api: serve the GatewayClasses whose spec.controllerName is this.",
)
@click.option(
    "--min-sync-period",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="Minimum seconds between two rebuilds (changes in between are coalesced).",
)
@click.option("--sync-period", default=60.0, show_default=True, type=click.FloatRange(1, 86400))
@click.option(
    "--metrics-bind-address",
    default="127.0.0.1:10254",
    show_default=True,
    help="/metrics, /healthz (ready after the first successful apply) and /livez.",
)
@exits
def controller(**kw: Any) -> None:
    """Watch Ingresses, render, check (nginx -t), swap, reload nginx, publish status."""
    from kproxy.ingress.controller import ControllerConfig, IngressController, serve_health
    from kproxy.ingress.nginx import NginxOptions, UpstreamMode
    from kproxy.ingress.selector import parse_selector
    from kproxy.log import setup
    from kproxy.sources.kube import load_client_configuration

    setup()
    state_dir = _absolute(kw["state_dir"], "--state-dir")
    user = None
    if kw["worker_user"]:
        u, _, g = kw["worker_user"].partition(":")
        user = (u, g or u)
    try:
        options = NginxOptions(
            http_port=kw["http_port"],
            https_port=_https_port(kw["https_port"]),
            listen_addresses=tuple(kw["listen_addresses"]),
            cert_dir=f"{state_dir}/certs",
            run_dir=state_dir,
            upstream_mode=UpstreamMode(kw["upstream_mode"]),
            user=user,
        )
    except ConfigError as e:
        raise ConfigError(f"bad option: {e}") from None
    cfg = ControllerConfig(
        classes=_class_options(kw["ingress_class"], kw["controller_class"], kw["watch_ingress_without_class"]),
        nginx=options,
        nginx_binary=kw["nginx_binary"],
        state_dir=state_dir,
        publish_status_address=_status_addresses(kw["publish_status_address"]),
        edge_selector=parse_selector(kw["edge_node_selector"]),
        node_name=kw["node_name"],
        min_sync_period=kw["min_sync_period"],
        sync_period=kw["sync_period"],
        gateway_controller=kw["gateway_controller_name"] if kw["gateway_api"] else "",
    )
    configuration = load_client_configuration(kw["kubeconfig"])
    ctl = IngressController(cfg, configuration)
    try:
        server = serve_health(ctl, kw["metrics_bind_address"])
    except (OSError, ValueError) as e:
        raise ConfigError(f"--metrics-bind-address {kw['metrics_bind_address']}: {e}") from None
    stop = _stop_on_signals()
    ctl.start()
    try:
        while not stop.wait(1.0):
            if ctl.crashed is not None:
                raise BackendError(f"the controller stopped: {ctl.crashed}")
    finally:
        ctl.stop()
        server.stop()


def _status_addresses(text: str) -> tuple[str, ...]:
    from kproxy.ingress.controller import parse_status_addresses

    try:
        return parse_status_addresses(text)
    except ValueError as e:
        raise ConfigError(f"--publish-status-address: {e}") from None


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


# --- hostports -------------------------------------------------------------------------------


@ingress.command()
@click.option("--node", "node_name", required=True, help="This node: its Pods' hostPorts are programmed here.")
@click.option("--state", "state_paths", multiple=True, help="YAML file or directory with the Pods and the Node.")
@click.option("--kubeconfig", default=None, help="Read the API server instead of --state.")
@click.option(
    "--edge-node-selector",
    default="node-role.kubernetes.io/edge",
    show_default=True,
    help="Only nodes matching this label selector get hostPort rules ('' for every node).",
)
@click.option(
    "--iptables-backend",
    type=click.Choice(["", "nft", "legacy"]),
    default="",
    help="Default: the backend the node already uses.",
)
@click.option("--dry-run", is_flag=True, help="Print the iptables-restore input; change nothing.")
@click.option("--watch", is_flag=True, help="Keep running: watch the Node and its Pods (needs the API server).")
@click.option("--min-sync-period", default=1.0, show_default=True, type=click.FloatRange(0, 3600))
@click.option("--metrics-bind-address", default="", help="With --watch: serve /metrics and /healthz here.")
@click.option("--strict", is_flag=True, help="Exit 2 if any Pod was skipped.")
@exits
def hostports(
    node_name: str,
    state_paths: tuple[str, ...],
    kubeconfig: str | None,
    edge_node_selector: str,
    iptables_backend: str,
    dry_run: bool,
    watch: bool,
    min_sync_period: float,
    metrics_bind_address: str,
    strict: bool,
) -> None:
    """Program the hostPorts of this node's Pods into this network namespace (once, or --watch)."""
    from kproxy.hostport.syncer import HostPortSyncer
    from kproxy.ingress.selector import parse_selector
    from kproxy.log import setup

    if not watch:
        setup(level="error")  # one-shot: the "kproxy: ..." lines on stderr say it all

    selector = parse_selector(edge_node_selector)
    if watch:
        if state_paths or dry_run:
            raise ConfigError("--watch reads the API server; it takes neither --state nor --dry-run")
        _hostports_daemon(node_name, kubeconfig, selector, iptables_backend, min_sync_period, metrics_bind_address)
        return
    pods, node = _hostport_input(node_name, state_paths, kubeconfig)
    syncer = HostPortSyncer(
        node_name, selector, variant=iptables_backend or ("nft" if dry_run else ""), conntrack=not dry_run
    )
    result = syncer.sync(pods, node, dry_run=dry_run)
    for e in result.rejected:
        click.echo(f"kproxy: skipped {e}", err=True)
    for c in result.conflicts:
        click.echo(f"kproxy: conflict: {c}", err=True)
    for u in result.unmapped:
        click.echo(f"kproxy: not mapped: {u}", err=True)
    if node is None:
        click.echo(f"kproxy: Node {node_name} not found; its labels are unknown", err=True)
    if dry_run:
        for family, plan in sorted(result.plans.items()):
            click.echo(f"# IPv{int(family)}: iptables-restore --noflush input")
            click.echo(plan.text, nl=False)
    else:
        click.echo(result.summary())
    if strict and result.rejected:
        raise InputError(f"{len(result.rejected)} Pod(s) skipped and --strict given")


def _hostport_input(
    node_name: str, state_paths: tuple[str, ...], kubeconfig: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    if state_paths:
        from kproxy.sources.files import load_objects

        objects = _by_kind(load_objects(state_paths))
        nodes = [n for n in objects.get("Node", []) if (n.get("metadata") or {}).get("name") == node_name]
        return objects.get("Pod", []), (nodes[0] if nodes else None)
    from kproxy.sources.kube import (
        NODES,
        PODS,
        Reflector,
        Store,
        load_client_configuration,
        name_selector,
        node_pods_selector,
    )

    configuration = load_client_configuration(kubeconfig)
    stores = {"pods": Store(), "node": Store()}
    reflectors = [
        Reflector(PODS, configuration, stores["pods"], field_selector=node_pods_selector(node_name)),
        Reflector(NODES, configuration, stores["node"], field_selector=name_selector(node_name)),
    ]
    try:
        for r in reflectors:
            r.start()
        for r in reflectors:
            if not r.wait_synced(60):
                raise InputError(f"cannot list {r.resource.name} from the API server within 60s")
    finally:
        for r in reflectors:
            r.stop()
    return stores["pods"].objects(), stores["node"].get(node_name)


def _hostports_daemon(
    node_name: str,
    kubeconfig: str | None,
    selector: Any,
    variant: str,
    min_sync_period: float,
    metrics_address: str,
) -> None:
    from kproxy.hostport.syncer import HostPortDaemon, HostPortSyncer
    from kproxy.httpd import TEXT, Response, listen
    from kproxy.ingress.events import Recorder
    from kproxy.ingress.metrics import HostPortMetrics
    from kproxy.log import setup
    from kproxy.sources.kube import load_client_configuration
    from kproxy.sources.kube_write import ApiWriter

    setup()
    configuration = load_client_configuration(kubeconfig)
    metrics = HostPortMetrics()
    writer = ApiWriter(configuration, component="kproxy-hostports", instance=node_name)
    syncer = HostPortSyncer(node_name, selector, variant=variant, metrics=metrics, recorder=Recorder(writer))
    daemon = HostPortDaemon(configuration, syncer, min_sync_period=min_sync_period)
    server = None
    if metrics_address:
        from prometheus_client import CONTENT_TYPE_LATEST

        def healthz() -> Response:
            ok = daemon.synced_once.is_set() and daemon.last_error is None
            return Response(200 if ok else 503, TEXT, b"ok\n" if ok else b"not synced\n")

        try:
            server = listen(
                metrics_address,
                {
                    "/metrics": lambda: Response(200, CONTENT_TYPE_LATEST, metrics.exposition()),
                    "/healthz": healthz,
                    "/livez": lambda: Response(200, TEXT, b"ok\n"),
                },
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"--metrics-bind-address {metrics_address}: {e}") from None
    stop = _stop_on_signals()
    daemon.start()
    try:
        while not stop.wait(1.0):
            if daemon.crashed is not None:
                raise BackendError(f"the hostPort daemon stopped: {daemon.crashed}")
    finally:
        daemon.stop()
        writer.close()
        if server is not None:
            server.stop()
