"""The benchmark as users run kproxy: `kproxy sync` as a process on state files and `kproxy run`
as a process against the in-process fake API server, for each size and each mode/backend, with
the kernel's bare load of the same text as the floor.

For each size (N Services × M endpoints, `cluster.py`) the state is written as `kubectl get -o
yaml` prints it (a `kind: List`) and as JSON; then, per mode and backend, `sync_bench.measure`
(the whole `kproxy sync` process on each file, its dry run's text loaded by the kernel tool alone)
and `run_bench.measure` (the daemon: start to first sync, endpoint changes, a Service added and
deleted, peak RSS). Each of the two phases of a run has `--budget` seconds; a phase past it is
killed and recorded "over budget", and that mode/backend is not run at the larger sizes. A mode
this build lacks is recorded "not built", one the kernel cannot run "not available"; the rest go
on. Nothing is asserted about timings.

    python bench/process_bench.py --sizes 1000x10 10000x10 50000x5 --out docs/benchmarks.md

writes the tables between the `<!-- bench:process -->` markers of docs/benchmarks.md, the raw
figures under the "process" key of docs/benchmarks.json and the plot to
docs/benchmarks-process.svg. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cluster
import report
import run_bench
import sync_bench
from modes import MODES
from procs import remove_leftovers

MARKER = "<!-- bench:process -->"


def parse_size(text: str) -> tuple[int, int]:
    n, _, m = text.lower().partition("x")
    return int(n), int(m or 10)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "budget_s": args.budget,
        "changes": args.changes,
        "sizes": [],
    }
    previous = _previous(args) if args.no_run else []
    # Columns that could not run at one size (over budget, not built, not available) are not run
    # at the larger ones: what stopped them stands in their cells.
    stopped: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for n, m in sorted(args.sizes):
            t = time.perf_counter()
            states = {fmt: cluster.write_state(tmp / f"svc{n}x{m}.{fmt}", n, m, fmt) for fmt in ("yaml", "json")}
            say(f"== {n:,} Services × {m} endpoints (state files written in {time.perf_counter() - t:.1f} s)")
            size: dict[str, Any] = {"services": n, "per_service": m, "columns": {}}
            results["sizes"] = [s for s in previous if (s["services"], s["per_service"]) != (n, m)]
            previous = [*results["sizes"], size]
            results["sizes"] = sorted(previous, key=lambda s: (s["services"], s["per_service"]))
            for mode in args.modes:
                spec = MODES[mode]
                for backend in spec.backends:
                    name = spec.column(backend)
                    if name in stopped:
                        size["columns"][name] = {"mode": mode, "backend": backend, **stopped[name]}
                        continue
                    column = measure_column(spec, backend, n, m, states, args, tmp)
                    size["columns"][name] = column
                    why = column.get("status", "ok")
                    if why in ("not built", "not available on this kernel"):
                        stopped[name] = {"status": why}
                    elif _over_budget(column):
                        stopped[name] = {"status": "skipped", "why": f"not run: over budget at {n:,}"}
            for line in report.size_table(size, args.budget).splitlines():
                say(line)
            results["total_s"] = time.perf_counter() - started
            results["targets"] = report.targets(results)
            results["nftables_targets"] = report.nftables_targets(results)
            if args.out:
                # After every size, so that a run stopped later keeps what it measured.
                write(results, args.out)
    return results


def _over_budget(column: dict[str, Any]) -> bool:
    sync = column.get("sync", {})
    steps = [*(v for v in sync.values() if isinstance(v, dict)), column.get("run") or {}]
    return any(s.get("status") == "over budget" for s in steps)


def measure_column(
    spec: Any, backend: str, n: int, m: int, states: dict[str, Path], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    name = spec.column(backend)
    tag = f"{n // 1000}{spec.name[:2]}{backend[:1]}"
    column: dict[str, Any] = {"mode": spec.name, "backend": backend}
    t = time.perf_counter()
    column["sync"] = sync_bench.measure(spec, backend, states, sync_bench.Budget(args.budget), tag)
    first = column["sync"]["yaml"]["status"]
    say(f"   {name}: kproxy sync {first} ({time.perf_counter() - t:.0f} s)")
    if first in ("not built", "not available on this kernel"):
        column["status"] = first
        return column
    if args.no_run:
        kept = _last_run(args, n, m, name)
        column["run"] = kept or {"status": "skipped", "why": "not run (--no-run)"}
        return column
    if _over_budget(column):
        # The daemon's first sync loads the same text through the same tool: a budget's worth
        # of waiting would only say "over budget" again.
        column["run"] = {"status": "skipped", "why": "not run: kproxy sync over budget"}
        return column
    t = time.perf_counter()
    column["run"] = run_bench.measure(spec, backend, n, m, args.changes, sync_bench.Budget(args.budget), tmp, tag)
    say(f"   {name}: kproxy run {column['run']['status']} ({time.perf_counter() - t:.0f} s)")
    return column


def _previous(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sizes of the last recorded run. A `--no-run` rerun replaces the `kproxy sync` figures of
    the sizes it measures and keeps everything else, `kproxy run` figures included (the daemon's
    take far longer to measure)."""
    path = args.out.with_suffix(".json") if args.out is not None else None
    if path is None or not path.exists():
        return []
    sizes: list[dict[str, Any]] = (json.loads(path.read_text()).get("process") or {}).get("sizes", [])
    return sizes


def _last_run(args: argparse.Namespace, n: int, m: int, name: str) -> dict[str, Any] | None:
    for size in _previous(args):
        if (size.get("services"), size.get("per_service")) == (n, m):
            run = (size.get("columns", {}).get(name) or {}).get("run")
            if run and run.get("status") == "ok":
                return dict(run)
    return None


def write(results: dict[str, Any], out: Path) -> None:
    from plot import process_svg

    svg = out.with_name(out.stem + "-process.svg")
    svg.write_text(process_svg(results))
    report.put_json(out.with_suffix(".json"), "process", results)
    report.put_block(out, MARKER, report.markdown(results, svg.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[(1000, 10), (10000, 10), (50000, 5)])
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    ap.add_argument("--budget", type=float, default=600.0, help="seconds per phase of a run (default 10 min)")
    ap.add_argument("--changes", type=int, default=100, help="single-endpoint changes per kproxy run")
    ap.add_argument("--no-run", action="store_true", help="measure kproxy sync only")
    ap.add_argument("--out", type=Path, help="docs/benchmarks.md (also .json and -process.svg beside it)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("process_bench: needs root (network namespaces)")
    # SIGTERM unwinds like Ctrl-C, so every namespace and daemon is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    remove_leftovers()
    results = run(args)
    say(report.targets_table(results["targets"]))
    say(report.targets_table(results["nftables_targets"], 13))
    if not args.out:
        say(json.dumps(results, indent=1)[:4000])
    say(f"process benchmark took {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
