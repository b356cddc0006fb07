"""Benchmark the daemon's watch side: listing N Services x 10 endpoints from the API server.

The fake API server runs in a process of its own, so that its memory is not counted. Each
measurement runs in a fresh process: three reflectors (Services, EndpointSlices, this Node), as
the daemon wires them, feed the daemon's change trackers; the measurement ends once all three
are synced and the trackers have folded everything (what the first sync's checkout does). Two
runs per variant: one timed (wall time to synced, peak RSS), one under `tracemalloc` (bytes
held afterwards, peak during the list, and where the held bytes were allocated).

Variants: ``after`` is this tree (paged lists, `KeyStore`); ``before`` is the same measurement
with `informer` (a `Store` of raw dicts) run against another tree, normally main's checkout:

    python bench/api_load_bench.py --services 10000 --before-tree /work/main

No timing is asserted; the run checks that every object arrived, since a figure for a list that
lost objects would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ENDPOINTS = 10
NODE = "node-0"
HERE = Path(__file__).resolve().parent
KEY_TYPE = os.environ.get("BENCH_TRACE_KEY", "filename")


def objects(n: int) -> list[dict[str, Any]]:
    """N ClusterIP Services with one EndpointSlice of ENDPOINTS endpoints each, and the Node."""
    from kproxy.testing.builders import endpoint, endpoint_slice, node, service

    out: list[dict[str, Any]] = [node(NODE)]
    for i in range(n):
        out.append(service(name=f"svc{i}", namespace=f"ns{i % 100}", cluster_ip=f"172.30.{i // 250}.{i % 250 + 1}"))
        eps = [
            endpoint(f"10.{1 + i // 6000}.{(i // 25) % 240}.{(i % 25) * ENDPOINTS + j + 1}", f"node-{j}")
            for j in range(ENDPOINTS)
        ]
        out.append(endpoint_slice(f"svc{i}", namespace=f"ns{i % 100}", endpoints=eps))
    return out


def serve(n: int) -> None:
    """Fill a fake API server, print its kubeconfig path, serve until stdin closes."""
    from kproxy.testing.fakeapi import FakeAPIServer

    with FakeAPIServer(history_size=100) as api, tempfile.TemporaryDirectory() as tmp:
        for obj in objects(n):
            api.create({"Node": "nodes", "Service": "services"}.get(obj["kind"], "endpointslices"), obj)
        print(api.write_kubeconfig(tmp), flush=True)
        sys.stdin.read()


class Target:
    """The daemon's handlers (`Daemon.on_*`), minus the runner: into the change trackers."""

    def __init__(self) -> None:
        from kproxy.tracker import ChangeTrackers

        self.trackers = ChangeTrackers(NODE)

    def on_service_add(self, obj: dict[str, Any]) -> None:
        self.trackers.services.update(None, obj)

    def on_service_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.trackers.services.update(old, new)

    def on_service_delete(self, obj: dict[str, Any]) -> None:
        self.trackers.services.update(obj, None)

    def on_service_synced(self) -> None:
        pass

    def on_endpoint_slice_add(self, obj: dict[str, Any]) -> None:
        self.trackers.slices.update(None, obj)

    def on_endpoint_slice_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.trackers.slices.update(old, new)

    def on_endpoint_slice_delete(self, obj: dict[str, Any]) -> None:
        self.trackers.slices.update(obj, None)

    def on_endpoint_slice_synced(self) -> None:
        pass

    def on_node_add(self, obj: dict[str, Any]) -> None:
        self.trackers.node.update(None, obj)

    def on_node_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.trackers.node.update(old, new)

    def on_node_delete(self, obj: dict[str, Any]) -> None:
        self.trackers.node.update(obj, None)

    def on_node_synced(self) -> None:
        pass


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(kubeconfig: str, variant: str, n: int, trace: bool) -> dict[str, Any]:
    """One measurement in this process (see the module docstring)."""
    from kubernetes import client as k8s

    from kproxy.sources import kube

    k8s.CoreV1Api, k8s.DiscoveryV1Api  # noqa: B018  (the client's lazy imports, paid up front)
    configuration = kube.load_client_configuration(kubeconfig)
    configuration.proxy = None  # loopback only
    target = Target()
    wire = kube.informer if variant == "before" else kube.key_informer
    baseline_rss = rss_kib()
    if trace:
        tracemalloc.start()
    began = time.perf_counter()
    reflectors = [
        wire(kube.SERVICES, configuration, target)[0],
        wire(kube.ENDPOINT_SLICES, configuration, target)[0],
        wire(kube.NODES, configuration, target, field_selector=kube.name_selector(NODE))[0],
    ]
    for reflector in reflectors:
        reflector.start()
    try:
        for reflector in reflectors:
            if not reflector.wait_synced(600):
                raise SystemExit(f"{reflector.resource.name} not synced")
        checkout = target.trackers.checkout()  # what the first sync folds
        listed_s = time.perf_counter() - began
        result: dict[str, Any] = {"variant": variant, "services": n, "list_s": round(listed_s, 2)}
        state = checkout.state
        if (len(state.services), len(state.slices), len(state.nodes)) != (n, n, 1):
            raise SystemExit(f"incomplete: {len(state.services)} services, {len(state.slices)} slices")
        if trace:
            current, peak = tracemalloc.get_traced_memory()
            result.update(held_mib=round(current / 2**20, 1), peak_mib=round(peak / 2**20, 1))
            result["by_file"] = by_file(tracemalloc.take_snapshot())
            tracemalloc.stop()
        else:
            result["rss_mib"] = round(rss_kib() / 1024, 1)
            result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            result["baseline_rss_mib"] = round(baseline_rss / 1024, 1)
        del checkout, state
        return result
    finally:
        for reflector in reflectors:
            reflector.stop()


def by_file(snapshot: tracemalloc.Snapshot, top: int = 6) -> list[tuple[str, float]]:
    """Where the bytes still held were allocated: the biggest files, in MiB."""
    stats = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)]).statistics(KEY_TYPE)
    found = []
    for stat in stats[:top]:
        name = stat.traceback[0].filename
        parts = Path(name).parts
        short = "/".join(parts[parts.index("kproxy") :]) if "kproxy" in parts else "/".join(parts[-2:])
        where = f"{short}:{stat.traceback[0].lineno}" if KEY_TYPE == "lineno" else short
        found.append((where, round(stat.size / 2**20, 1)))
    return found


def child(kubeconfig: str, variant: str, n: int, trace: bool, tree: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    args = [sys.executable, str(Path(__file__).resolve()), "--measure", variant, "--kubeconfig", kubeconfig]
    args += ["--services", str(n)] + (["--trace"] if trace else [])
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True, cwd=tree).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--before-tree", type=Path, help="a kproxy tree to measure the 'before' variant in")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per variant (the best is kept)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.services)
        return
    if args.measure:
        print(json.dumps(measure(args.kubeconfig, args.measure, args.services, args.trace)))
        return

    this_tree = HERE.parent
    variants = [("after", this_tree)]
    if args.before_tree:
        variants.insert(0, ("before", args.before_tree.resolve()))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", "--services", str(args.services)]
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=this_tree)
    try:
        assert server.stdout is not None
        kubeconfig = server.stdout.readline().strip()
        rows = []
        for variant, tree in variants:
            timed = min(
                (child(kubeconfig, variant, args.services, False, tree) for _ in range(args.runs)),
                key=lambda r: r["list_s"],
            )
            traced = child(kubeconfig, variant, args.services, True, tree)
            rows.append({**timed, **{k: v for k, v in traced.items() if k not in timed}})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(60)
    print()
    print("| variant | list + convert | peak RSS | held (tracemalloc) | peak during the list (tracemalloc) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['list_s']} s | {r['peak_rss_mib']} MiB | {r['held_mib']} MiB | {r['peak_mib']} MiB |"
        )
    for r in rows:
        print(f"{r['variant']}: held by file: {r['by_file']}")


if __name__ == "__main__":
    main()
