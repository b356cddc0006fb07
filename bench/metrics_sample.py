"""Record a real metrics sample of `kproxy run` under churn, for the dashboard's picture.

sudo .venv/bin/python bench/metrics_sample.py --out docs/grafana/metrics-sample.json [--seconds 90]

The e2e lab (one node, two pods, a client), the fake API server in node-1's namespace and the real
daemon, as tests/e2e/test_run.py runs them. It creates `--services` Services (TCP and UDP ports)
served by both pods, then for `--seconds` moves one Service's endpoints every `--every` seconds
(with a fresh trigger time, so the network programming latency is measured), sends UDP through a
Service before its endpoint leaves (so the conntrack cleanup has stale flows to delete), flushes
one of kproxy's chains by hand once (a tampered rule, repaired by the next verifying sync), and
scrapes /metrics every `--scrape` seconds. Kept per scrape: the kproxy and kubeproxy series only
(no process_ ones), as samples; bench/metrics_plot.py draws them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import endpoint, node, service
from kproxy.testing.daemon_process import KproxyProcess, http_get
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import EchoServer, Sender, call_in, wait_for

PORT = 8080


def slice_for(lab: Lab, name: str, pods: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": datetime.now(UTC).isoformat()},
        },
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}, {"name": "udp", "port": PORT, "protocol": "UDP"}],
        "endpoints": [endpoint(lab.pod(p).ipv4, lab.pod(p).node) for p in pods],
    }


def vip(i: int) -> str:
    return f"172.30.{1 + i // 250}.{1 + i % 250}"


def scrape(ns: str) -> list[tuple[str, dict[str, str], float]]:
    code, body = http_get(ns, 10249, "/metrics")
    assert code == 200
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(body.decode())
        if family.name.startswith(("kubeproxy_", "kproxy_"))
        for s in family.samples
    ]


def matrix(scrapes: list[dict[str, Any]]) -> dict[str, Any]:
    """Scrapes as one row of values per series (a series absent from a scrape: null)."""
    series: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
    for s in scrapes:
        for name, labels, _ in s["samples"]:
            series.setdefault((name, tuple(sorted(labels.items()))), len(series))
    rows: list[list[float | None]] = [[None] * len(scrapes) for _ in series]
    for j, s in enumerate(scrapes):
        for name, labels, value in s["samples"]:
            rows[series[(name, tuple(sorted(labels.items())))]][j] = float(f"{value:.6g}")
    return {
        "times": [s["t"] for s in scrapes],
        "series": [[name, dict(labels), row] for (name, labels), row in zip(series, rows, strict=True)],
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--scrape", type=float, default=2.0)
    ap.add_argument("--mode", default="iptables")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rng = random.Random(1)
    tmp = Path(tempfile.mkdtemp(prefix="kproxy-metrics-"))
    scrapes: list[dict[str, Any]] = []
    with Lab(prefix=f"km{os.getpid()}", nodes=1, pods_per_node=2, clients=1) as lab:
        servers = [EchoServer(pod, PORT, proto="both").start() for pod in lab.all_pods]
        ns = lab.node(1).ns
        api = call_in(ns, FakeAPIServer().start)
        lab.run(ns, ["ip", "route", "replace", "default", "via", lab.client(1).ipv4])
        api.create("nodes", node(addresses=["192.168.0.2"], pod_cidrs=["10.0.1.0/24"]))
        pods = ["pod-1a", "pod-1b"]
        for i in range(args.services):
            ports = [{"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "udp", "port": 80, "protocol": "UDP"}]
            api.create("services", service(f"svc-{i}", "default", cluster_ip=vip(i), ports=ports))
            api.create("endpointslices", slice_for(lab, f"svc-{i}", pods))
        kp = KproxyProcess.start(
            ns,
            tmp / "kproxy.log",
            f"--kubeconfig={api.write_kubeconfig(tmp / 'kubeconfig')}",
            "--hostname-override=node-1",
            "--cluster-cidr=10.0.0.0/8",
            f"--proxy-mode={args.mode}",
            "--iptables-sync-period=5s",
            "--iptables-min-sync-period=200ms",
        )
        try:
            wait_for(lambda: kp.events("sync_complete"), timeout=30, message="the first sync")
            start = time.monotonic()
            next_scrape = start
            tampered = False
            while (now := time.monotonic()) < start + args.seconds:
                if now >= next_scrape:
                    scrapes.append({"t": round(now - start, 3), "samples": scrape(ns)})
                    next_scrape += args.scrape
                i = rng.randrange(args.services)
                keep = rng.sample(pods, rng.choice((1, 2)))
                # A UDP flow to the Service first: when its endpoint leaves, the flow is stale.
                with Sender(lab.client(1).ns, vip(i), 80) as sender:
                    sender.send(timeout=0.5)
                api.update("endpointslices", slice_for(lab, f"svc-{i}", keep))
                if not tampered and now - start > args.seconds / 2 and args.mode != "nftables":
                    lab.run(ns, ["iptables", "-t", "nat", "-F", "KPROXY-SERVICES"], check=False)
                    tampered = True
                time.sleep(args.every)  # the churn's pace, not a synchronisation
            scrapes.append({"t": round(time.monotonic() - start, 3), "samples": scrape(ns)})
        finally:
            kp.stop()
            api.stop()
            for s in servers:
                s.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "mode": args.mode,
        "services": args.services,
        "seconds": args.seconds,
        "every": args.every,
        "recorded": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    args.out.write_text(json.dumps({"meta": meta, **matrix(scrapes)}, separators=(",", ":")) + "\n")
    print(f"{len(scrapes)} scrapes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
