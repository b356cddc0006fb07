"""Benchmark the iptables mode: render, apply, partial sync after one endpoint change, memory,
and what drift detection costs a sync.

Each size runs in its own process (so peak RSS is that size's) and applies into its own
throw-away network namespace. Results are written to a Markdown file. No timing is asserted;
the drift syncs are checked for what they must do (an idle sync writes nothing, a flushed chain
is repaired), since a figure for a sync that did the wrong thing would mean nothing.

    python bench/iptables_bench.py --services 1000 10000 --out docs/benchmarks.md

`make bench` runs it after `bench/process_bench.py` (kproxy sync and kproxy run as processes).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kproxy.node import NodeContext
    from kproxy.view import FamilyView

ENDPOINTS = 10
# The drift figures are the median of this many runs (each is a fraction of a full sync).
DRIFT_RUNS = 3


def objects(n: int) -> list[dict]:
    from kproxy.testing.builders import endpoint, endpoint_slice, service

    out: list[dict] = []
    for i in range(n):
        ip = f"172.30.{i // 250}.{i % 250 + 1}"
        out.append(
            service(name=f"svc{i}", cluster_ip=ip, type="NodePort", node_port=30000 + i % 2000 if i < 2000 else None)
        )
        eps = [
            endpoint(f"10.{1 + i // 6000}.{(i // 25) % 240}.{(i % 25) * ENDPOINTS + j + 1}", f"node-{j}")
            for j in range(ENDPOINTS)
        ]
        out.append(endpoint_slice(f"svc{i}", endpoints=eps))
    return out


def run_one(n: int, variant: str, apply: bool) -> dict:
    from kproxy.backends.iptables import Iptables
    from kproxy.config import ProxyConfig
    from kproxy.model import IPFamily
    from kproxy.proxier.iptables import render as ipt
    from kproxy.state import build_state
    from kproxy.testing.builders import endpoint, endpoint_slice
    from kproxy.view import FamilyView, family_view, node_context

    objs = objects(n)
    cfg = ProxyConfig(node_name="node-0", cluster_cidrs=("10.0.0.0/8",))
    t = time.perf_counter()
    state, _ = build_state(objs)
    convert_s = time.perf_counter() - t
    ctx = node_context(cfg, IPFamily.V4, None, ("127.0.0.1", "192.168.0.2"))
    view = family_view(state, IPFamily.V4)

    t = time.perf_counter()
    full = ipt.render(view.ports, view.endpoints, ctx)
    render_cold = time.perf_counter() - t
    t = time.perf_counter()
    full = ipt.render(view.ports, view.endpoints, ctx)  # warm: chain-name caches filled, as in a daemon
    render_s = time.perf_counter() - t
    t = time.perf_counter()
    plan = ipt.plan(full, None, {"nat": set(), "filter": set()}, {})
    plan_s = time.perf_counter() - t
    lines = plan.text.count("\n")

    res = {
        "services": n,
        "endpoints": n * ENDPOINTS,
        "variant": variant,
        "convert_s": convert_s,
        "render_cold_s": render_cold,
        "render_s": render_s,
        "plan_s": plan_s,
        "restore_lines": lines,
        "chains": sum(plan.written.values()),
    }

    backend = Iptables(IPFamily.V4, variant)
    if apply:
        t = time.perf_counter()
        backend.restore(plan.text)
        res["apply_s"] = time.perf_counter() - t

    # One endpoint of one Service changes: re-render against the previous result and plan the diff.
    objs[1] = endpoint_slice("svc0", endpoints=[endpoint("10.250.0.1", "node-0")] + objs[1]["endpoints"][1:])
    state2, _ = build_state([objs[0], objs[1]])
    changed = family_view(state2, IPFamily.V4)
    ports = dict(view.ports)
    eps = dict(view.endpoints)
    eps.update(changed.endpoints)
    t = time.perf_counter()
    partial = ipt.render(ports, eps, ctx, previous=full, changed=set(changed.endpoints))
    pplan = ipt.plan(
        partial,
        full.tables,
        None,
        {t: {(b, tg) for (tb, b, _, tg, _) in full.jumps if tb == t} for t in ("nat", "filter")},
    )
    res["partial_render_s"] = time.perf_counter() - t
    res["partial_lines"] = pplan.text.count("\n")
    res["partial_chains"] = sum(pplan.written.values())
    if apply:
        t = time.perf_counter()
        backend.restore(pplan.text)
        res["partial_apply_s"] = time.perf_counter() - t
    # Before the drift syncs below, whose proxier holds a ruleset of its own: the column stays
    # what one synced ruleset costs.
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if apply:
        del full, partial, pplan, plan
        res.update(drift_costs(FamilyView(ports, eps), ctx, variant))
    return res


def drift_costs(view: FamilyView, ctx: NodeContext, variant: str) -> dict:
    """What drift detection costs: the listing a verifying sync reads, an idle sync, a repair.

    `IptablesProxier` as the daemon drives it: a full sync first, then partial syncs of the
    same view (the daemon's view keeps unchanged Services' objects, so render compares them
    by identity). An idle sync must write nothing and call iptables-restore not at all; after
    `iptables -t nat -F KPROXY-SERVICES` the next sync must rewrite exactly that chain.
    """
    from kproxy.backends.iptables import Iptables
    from kproxy.model import IPFamily
    from kproxy.proxier.iptables.proxier import IptablesProxier

    class Counting(Iptables):
        restores = 0

        def restore(self, text: str) -> None:
            self.restores += 1
            super().restore(text)

    backend = Counting(IPFamily.V4, variant)
    proxier = IptablesProxier(backend)
    out: dict = {}
    t = time.perf_counter()
    proxier.sync(view, ctx, full=True)
    out["sync_full_s"] = time.perf_counter() - t

    listing, idle, idle_render, repair, repair_lines = [], [], [], [], []
    for _ in range(DRIFT_RUNS):
        t = time.perf_counter()
        saved = backend.save()
        listing.append(time.perf_counter() - t)
        out["listed_chains"] = sum(len(c) for c in saved.chains.values())

        before = backend.restores
        t = time.perf_counter()
        r = proxier.sync(view, ctx)
        idle.append(time.perf_counter() - t)
        idle_render.append(r.render_seconds)
        if r.full or sum(r.written.values()) or sum(r.deleted.values()) or r.repairs or backend.restores != before:
            raise RuntimeError(f"idle sync was not idle: written {r.written}, {backend.restores - before} restores")

        flush = [f"iptables-{variant}", "-w", "10", "-t", "nat", "-F", "KPROXY-SERVICES"]
        subprocess.run(flush, check=True, capture_output=True)
        before = backend.restores
        t = time.perf_counter()
        r = proxier.sync(view, ctx)
        repair.append(time.perf_counter() - t)
        repair_lines.append(r.payload.count("\n"))
        if not r.repairs or r.written.get("nat") != 1 or sum(r.written.values()) != 1 or backend.restores != before + 1:
            raise RuntimeError(f"flush not repaired: repairs {r.repairs}, written {r.written}")
        out["repairs"] = [x.what for x in r.repairs]
    out["listing_s"] = statistics.median(listing)
    out["idle_sync_s"] = statistics.median(idle)
    out["idle_render_s"] = statistics.median(idle_render)
    out["repair_sync_s"] = statistics.median(repair)
    out["repair_lines"] = max(repair_lines)
    out["drift_runs"] = {"listing_s": listing, "idle_sync_s": idle, "repair_sync_s": repair}
    out["peak_rss_drift_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def child(args: argparse.Namespace) -> None:
    print(json.dumps(run_one(args.child, args.variant, args.apply)))


def measure(n: int, variant: str, apply: bool) -> dict:
    ns = f"kpbench{n}{variant[0]}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    argv = [sys.executable, __file__, "--child", str(n), "--variant", variant] + (["--apply"] if apply else [])
    if apply:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        argv = ["ip", "netns", "exec", ns] + argv
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=3600)
    finally:
        if apply:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    head = (
        "| Services × endpoints | backend | render (first / again) | plan (full) | apply (full) | restore lines "
        "| partial render+plan | partial apply | partial lines (chains) | peak RSS "
        "| listing (filter+nat) | idle sync | flush repair |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        apply_s = f"{r['apply_s']:.2f} s" if "apply_s" in r else "not applied"
        papply = f"{r['partial_apply_s'] * 1000:.0f} ms" if "partial_apply_s" in r else "-"
        rows.append(
            f"| {r['services']:,} × {ENDPOINTS} | {r['variant']} | {r['render_cold_s']:.2f} s / {r['render_s']:.2f} s | "
            f"{r['plan_s']:.2f} s | {apply_s} | {r['restore_lines']:,} | {r['partial_render_s'] * 1000:.0f} ms | {papply} | "
            f"{r['partial_lines']} ({r['partial_chains']}) | {r['peak_rss_mb']:.0f} MB | "
            f"{_ms(r.get('listing_s'))} | {_ms(r.get('idle_sync_s'))} | {_ms(r.get('repair_sync_s'))} |"
        )
    return head + "\n".join(rows) + "\n"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=int)
    ap.add_argument("--variant", default="legacy")
    ap.add_argument("--apply", action="store_true")
    ap.add_argument("--nft-max", type=int, default=1000, help="largest size applied with iptables-nft")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for n in args.services:
        results.append(measure(n, "legacy", True))
        if n <= args.nft_max:
            results.append(measure(n, "nft", True))
        print(table(results[-2:] if n <= args.nft_max else results[-1:]), flush=True)
    text = table(results)
    if args.out:
        # The raw figures and a plot beside the Markdown page.
        from plot import svg
        from report import put_json

        put_json(args.out.with_suffix(".json"), "iptables", results)  # beside the other benchmarks' keys

        args.out.with_suffix(".svg").write_text(svg(results))
        doc = args.out.read_text() if args.out.exists() else ""
        marker = "<!-- bench:iptables -->"
        block = f"{marker}\nMeasured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {platform.python_version()}:\n\n{text}{marker}"
        if marker in doc:
            pre, _, rest = doc.partition(marker)
            _, _, post = rest.partition(marker)
            doc = pre + block + post
        else:
            doc += "\n" + block + "\n"
        args.out.write_text(doc)
    print(text)


if __name__ == "__main__":
    main()
