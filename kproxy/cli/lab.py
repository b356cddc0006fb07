"""`kproxy lab`: the network-namespace lab on this machine (what `make demo` runs).

`up` builds the namespaces and starts a background process serving echo servers in every pod;
`down` stops it and removes every namespace of the lab; `demo` does up, one `kproxy sync` of
every node from the example state, requests to a ClusterIP, a NodePort and a LoadBalancer IP, and
down, all in one go.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from importlib import resources
from pathlib import Path

import click

from kproxy.lab.namespaces import Lab, NamespaceRef, remove_namespaces, start_detached

RUN_DIR = Path("/run/kproxy-lab")
ECHO_PORT = 8080


def _pidfile(prefix: str) -> Path:
    return RUN_DIR / f"{prefix}.pid"


def example_state() -> Path:
    return Path(str(resources.files("kproxy") / "examples" / "demo.yaml"))


@click.group()
def lab() -> None:
    """The local multi-node lab on network namespaces."""


@lab.command()
@click.option("--prefix", default="kp", show_default=True)
@click.option("--nodes", default=2, show_default=True)
@click.option("--pods-per-node", default=2, show_default=True)
@click.option("--clients", default=1, show_default=True)
def up(prefix: str, nodes: int, pods_per_node: int, clients: int) -> None:
    """Build the lab and serve an echo server on port 8080 (TCP and UDP) in every pod."""
    the_lab = Lab(prefix=prefix, nodes=nodes, pods_per_node=pods_per_node, clients=clients).up()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "kproxy.cli.main",
        "lab",
        "serve",
        "--prefix",
        prefix,
        "--nodes",
        str(nodes),
        "--pods-per-node",
        str(pods_per_node),
        "--clients",
        str(clients),
    ]
    pid = start_detached(argv)
    _pidfile(prefix).write_text(str(pid))
    click.echo(the_lab.describe())
    click.echo(f"echo servers on port {ECHO_PORT} in every pod (pid {pid}); `kproxy lab down` removes it all")


@lab.command(hidden=True)
@click.option("--prefix", default="kp")
@click.option("--nodes", default=2)
@click.option("--pods-per-node", default=2)
@click.option("--clients", default=1)
def serve(prefix: str, nodes: int, pods_per_node: int, clients: int) -> None:
    from kproxy.testing.netns import EchoServer

    the_lab = Lab(prefix=prefix, nodes=nodes, pods_per_node=pods_per_node, clients=clients)
    servers = [EchoServer(pod, ECHO_PORT, proto="both").start() for pod in the_lab.all_pods]
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    for s in servers:
        s.stop()


@lab.command()
@click.option("--prefix", default="kp", show_default=True)
def down(prefix: str) -> None:
    """Stop the echo servers and remove every namespace of the lab."""
    pidfile = _pidfile(prefix)
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        pidfile.unlink()
    remove_namespaces(prefix)
    click.echo(f"lab {prefix} removed")


@lab.command()
@click.option("--prefix", default="kpdemo", show_default=True)
@click.option(
    "--state", "state_path", type=click.Path(), default=None, help="Default: the example state shipped with kproxy."
)
@click.option("--requests", default=6, show_default=True)
def demo(prefix: str, state_path: str | None, requests: int) -> None:
    """Build a lab, program every node with kproxy sync, show where requests land, clean up."""
    from kproxy.testing.netns import EchoServer, probe

    state = state_path or str(example_state())
    the_lab = Lab(prefix=prefix, nodes=2, pods_per_node=2, clients=1)
    servers: list[EchoServer] = []
    try:
        the_lab.up()
        click.echo(the_lab.describe())
        servers = [EchoServer(pod, ECHO_PORT, proto="both").start() for pod in the_lab.all_pods]
        # Every node runs kproxy, as the DaemonSet would; endpoints on a node are local to it.
        for node in the_lab.nodes:
            argv = [
                str(Path(sys.executable).with_name("kproxy")),
                "sync",
                "--mode",
                "iptables",
                "--node",
                node.name,
                "--state",
                state,
                "--cluster-cidr",
                "10.0.0.0/8",
            ]
            click.echo(f"\n$ ip netns exec {node.ns} {' '.join(['kproxy'] + argv[1:])}")
            res = the_lab.run(node.ns, argv, check=False)
            click.echo(res.stdout + res.stderr, nl=False)
            if res.returncode != 0:
                raise click.ClickException(f"kproxy sync on {node.name} exited {res.returncode}")
        client = the_lab.client(1)
        pod = the_lab.pod("pod-1b")
        # (title, from, to IP, port, source IP to bind)
        cases: list[tuple[str, NamespaceRef, str, int, str | None]] = [
            ("ClusterIP demo/web 172.30.0.10:80 from pod-1b", pod, "172.30.0.10", 80, None),
            (
                "ClusterIP demo/web 172.30.0.10:80 from pod-2b (node-2's rules)",
                the_lab.pod("pod-2b"),
                "172.30.0.10",
                80,
                None,
            ),
            (
                "NodePort demo/shop 192.168.0.2:30080 from the outside client",
                client,
                "192.168.0.2",
                30080,
                "203.0.113.10",
            ),
            (
                "LoadBalancer demo/edge 198.51.100.10:80 (externalTrafficPolicy Local) from the outside client",
                client,
                "198.51.100.10",
                80,
                "203.0.113.10",
            ),
        ]
        failed = False
        for title, src, dst, port, src_ip in cases:
            click.echo(f"\n{title}:")
            seen: dict[str, int] = {}
            for _ in range(requests):
                r = probe(src, dst, port, src_ip=src_ip)
                key = f"answered by {r.name}, which saw the client as {r.peer_ip}" if r.answered else str(r)
                failed = failed or not r.answered
                seen[key] = seen.get(key, 0) + 1
            for key, count in sorted(seen.items()):
                click.echo(f"  {count} x {key}")
        if failed:
            raise click.ClickException("some requests were not answered")
        click.echo("\nThe LoadBalancer Service keeps the client's address and only uses node-1's pod (eTP Local);")
        click.echo("the NodePort masquerades and spreads over both nodes' pods.")
    finally:
        for s in servers:
            s.stop()
        the_lab.down()
        click.echo(f"\nlab {prefix} removed")
