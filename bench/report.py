"""The process benchmark's results as Markdown: one table per size with every mode and backend
side by side, and issue 12's numbers to reach beside the measured ones (recorded, never
asserted). Also the shared helpers that put a block between markers in docs/benchmarks.md and a
key into docs/benchmarks.json without touching what other benchmarks wrote there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Result = dict[str, Any]


# -- formatting ----------------------------------------------------------------------------------


def secs(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"
    return f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} MiB"


def status_text(step: Result | None, budget_s: float) -> str | None:
    """What stands in a cell instead of a figure: over budget, not built, failed."""
    if step is None:
        return "not run"
    status = step.get("status", "ok")
    if status == "ok":
        return None
    if status == "over budget":
        return f"over budget ({secs(budget_s)})"
    if status == "skipped":
        return str(step.get("why", "skipped"))
    if status == "failed" and step.get("stderr"):
        # The kproxy line that says why (e.g. its own restore timeout), not the whole stderr.
        first = str(step["stderr"]).strip().splitlines()[0].removeprefix("kproxy: ")
        return f"failed: {first}"
    return str(status)


# -- one table per size ------------------------------------------------------------------------

Row = tuple[str, str, Callable[[Result], str]]  # label, the step it reads ("sync.yaml"...), cell


def _sync_rows(fmt: str, label: str) -> list[Row]:
    step = f"sync.{fmt}"
    return [
        (f"`kproxy sync`, {label}: whole process", step, lambda r: secs(r["wall_s"])),
        ("… of which render / apply (its own lines)", step, lambda r: f"{secs(r['render_s'])} / {secs(r['apply_s'])}"),
        ("… rest (start, load, convert, exit)", step, lambda r: secs(r["wall_s"] - r["render_s"] - r["apply_s"])),
        ("… user CPU / peak RSS: kproxy's own (its largest child's)", step, _cpu_and_peaks),
    ]


def _cpu_and_peaks(r: Result) -> str:
    own, children = r.get("own_rss_mib"), r.get("children_rss_mib")
    if own is None:  # a recording from before the two were kept apart: the larger of them
        return f"{secs(r['user_s'])} / {mib(r['peak_rss_mib'])}"
    return f"{secs(r['user_s'])} / {mib(own)} ({mib(children)})"


ROWS: list[Row] = [
    *_sync_rows("yaml", "YAML file"),
    *_sync_rows("json", "JSON file"),
    (
        "kernel floor: bare restore of that text (lines)",
        "sync.floor",
        lambda r: f"{secs(r['apply_s'])} ({r['lines']:,})",
    ),
    (
        "`kproxy run`: start → initial list / → first full sync in the kernel",
        "run",
        lambda r: f"{secs(r['to_listed_s'])} / {secs(r['to_first_sync_s'])}",
    ),
    (
        "… first sync's own render / apply",
        "run",
        lambda r: f"{secs(r['first_sync']['render_ms'] / 1000)} / {secs(r['first_sync']['apply_ms'] / 1000)}",
    ),
    (
        "one endpoint changed: p50 / p99 (changes)",
        "run",
        lambda r: f"{secs(r['change_p50_s'])} / {secs(r['change_p99_s'])} ({len(r['changes'])})",
    ),
    ("… the daemon's apply of it (median)", "run", lambda r: secs(r["change_apply_p50_s"])),
    (
        "kernel floor: bare restore of one change (median of 10)",
        "sync.floor.change",
        lambda r: secs(r["apply_s"]),
    ),
    (
        "one Service added / deleted",
        "run",
        lambda r: f"{secs(r['add_service']['latency_s'])} / {secs(r['delete_service']['latency_s'])}",
    ),
    (
        "peak RSS (VmHWM): after the first sync / at the end",
        "run",
        lambda r: f"{mib(r['peak_rss_after_first_sync_mib'])} / {mib(r['peak_rss_mib'])}",
    ),
]


def _step(column: Result, path: str) -> Result | None:
    node: Any = column
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        if node.get("status", "ok") != "ok":
            return node  # the first step that did not run stands for everything after it
        node = node.get(part)
    return node if isinstance(node, dict) else None


def _cell(column: Result, path: str, fmt: Callable[[Result], str], budget_s: float) -> str:
    step = _step(column, path)
    text = status_text(step, budget_s)
    if text is not None and step is not None and step.get("changes"):
        # Over budget during the endpoint changes: what was measured before stands, marked.
        try:
            return f"{fmt(step)}, then {text}"
        except (KeyError, TypeError):
            return text
    if text is not None:
        return text
    assert step is not None
    try:
        return fmt(step)
    except (KeyError, TypeError):
        # A run stopped over budget part-way keeps the figures it has.
        return "-"


def size_table(size: Result, budget_s: float) -> str:
    cols = size["columns"]
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for i, (label, path, fmt) in enumerate(ROWS):
        cells = []
        for c in cols.values():
            whole = status_text(c, budget_s)  # a column that did not run at all: said once
            cells.append((whole if i == 0 else "") if whole else _cell(c, path, fmt, budget_s))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


# -- issue 12's numbers to reach -------------------------------------------------------------


def targets(results: Result) -> list[Result]:
    """Each target of issue 12 with what was measured and whether it is reached."""
    out: list[Result] = []
    by_size = {(s["services"], s["per_service"]): s for s in results["sizes"]}

    def iptables_columns(size: Result) -> dict[str, Result]:
        return {k: v for k, v in size["columns"].items() if v.get("mode") == "iptables"}

    for (n, m), limit in (((1000, 10), 1.0), ((10000, 10), 5.0)):
        size = by_size.get((n, m))
        for name, col in iptables_columns(size).items() if size else []:
            for fmt in ("yaml", "json"):
                step = _step(col, f"sync.{fmt}")
                ok = step is not None and step.get("status") == "ok"
                over = step["wall_s"] - step["apply_s"] if ok and step else None
                out.append(
                    {
                        "target": f"`kproxy sync` {n:,} × {m}, {name}, {fmt.upper()}: whole process within {limit:g} s of its apply",
                        "measured": f"{secs(step['wall_s'])} − {secs(step['apply_s'])} = {secs(over)}"
                        if ok and step
                        else status_text(step, results["budget_s"]),
                        "reached": None if over is None else over <= limit,
                    }
                )
        if size is None:
            out.append({"target": f"`kproxy sync` at {n:,} × {m}", "measured": "size not run", "reached": None})

    for (n, m), limit in (((1000, 10), 100.0), ((5000, 10), 250.0)):
        size = by_size.get((n, m))
        if size is None:
            out.append(
                {
                    "target": f"peak RSS of `kproxy sync` and `kproxy run` at {n:,} × {m}: at most {limit:g} MiB",
                    "measured": f"size not run (`--sizes {n}x{m}`)",
                    "reached": None,
                }
            )
            continue
        for name, col in iptables_columns(size).items():
            for what, path in (("sync", "sync.yaml"), ("run", "run")):
                step = _step(col, path)
                ok = step is not None and step.get("status", "ok") == "ok"
                # A daemon stopped over budget after its first sync still had its peak read.
                stopped = (
                    what == "run"
                    and step is not None
                    and step.get("status") == "over budget"
                    and step.get("peak_rss_after_first_sync_mib") is not None
                )
                # kproxy's own, as upstream's figure is its daemon's; the child beside it
                value = (step.get("own_rss_mib") or step.get("peak_rss_mib")) if step and (ok or stopped) else None
                child = step.get("children_rss_mib") if step and ok else None
                measured = mib(value) if value is not None else (status_text(step, results["budget_s"]) or "-")
                if child is not None:
                    measured += f" (its largest child's: {mib(child)})"
                if stopped and step is not None:
                    changes = len(step.get("changes", []))
                    measured += f" when stopped over budget ({secs(results['budget_s'])}), after its first sync"
                    measured += f" and {changes} endpoint change{'s' if changes != 1 else ''}"
                out.append(
                    {
                        "target": f"peak RSS of `kproxy {what}` {n:,} × {m}, {name}: at most {limit:g} MiB",
                        "measured": measured,
                        "reached": None if value is None else value <= limit,
                    }
                )

    size = by_size.get((10000, 10))
    for name, col in iptables_columns(size).items() if size else []:
        run, change = _step(col, "run"), _step(col, "sync.floor.change")
        p50 = run.get("change_p50_s") if run and run.get("status") == "ok" else None
        floor = change.get("apply_s") if change and change.get("status", "ok") == "ok" else None
        out.append(
            {
                "target": f"`kproxy run` 10,000 × 10, {name}: one endpoint changed, p50 under 2× the bare kernel call",
                "measured": f"{secs(p50)} vs 2 × {secs(floor)}"
                if p50 is not None and floor is not None
                else (status_text(run, results["budget_s"]) or status_text(change, results["budget_s"]) or "-"),
                "reached": None if p50 is None or floor is None else p50 < 2 * floor,
            }
        )
    if size is None:
        out.append({"target": "`kproxy run` at 10,000 × 10", "measured": "size not run", "reached": None})
    return out


# -- issue 13's numbers to reach (the nftables mode) ----------------------------------------------


def nftables_targets(results: Result) -> list[Result]:
    """Issue 13's numbers for the nftables mode, as measured here (first-packet latency is
    bench/first_packet.py's own section)."""
    out: list[Result] = []
    by_size = {(s["services"], s["per_service"]): s for s in results["sizes"]}
    cols = {k: s["columns"].get("nftables") for k, s in by_size.items()}
    budget = results["budget_s"]

    for (n, m), limit in (((10000, 10), 5.0), ((50000, 5), 30.0)):
        col = cols.get((n, m))
        for fmt in ("json", "yaml"):
            step = _step(col, f"sync.{fmt}") if col else None
            ok = step is not None and step.get("status") == "ok"
            took = step["render_s"] + step["apply_s"] if ok and step else None
            out.append(
                {
                    "target": f"full sync into an empty node, {n:,} × {m}: under {limit:g} s "
                    f"(`kproxy sync`, {fmt.upper()} file: render + plan + apply; whole process beside it)",
                    "measured": f"{secs(took)} (whole process {secs(step['wall_s'])})"
                    if ok and step
                    else (status_text(step, budget) if col else "size not run"),
                    "reached": None if took is None else took < limit,
                }
            )
        run = _step(col, "run") if col else None
        first = run.get("first_sync") if run and run.get("status") == "ok" else None
        took = (first["render_ms"] + first["apply_ms"]) / 1000 if first else None
        out.append(
            {
                "target": f"full sync into an empty node, {n:,} × {m}: under {limit:g} s (`kproxy run`'s first sync)",
                "measured": secs(took) if took is not None else (status_text(run, budget) if col else "size not run"),
                "reached": None if took is None else took < limit,
            }
        )

    def figure(size: tuple[int, int], what: str, key: str) -> float | None:
        """`key` "latency_s": from the update stored in the API server to the sync logged done;
        "duration_ms": the daemon's own sync of it (its log line)."""
        run = _step(cols[size], "run") if cols.get(size) else None
        if not run or run.get("status") != "ok":
            return None
        samples = run.get("changes") or [] if what == "endpoint" else [run.get(f"{what}_service") or {}]
        values = sorted(x[key] for x in samples if x.get(key) is not None)
        if not values:
            return None
        median = (
            values[len(values) // 2]
            if len(values) % 2
            else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
        )
        return median / 1000 if key == "duration_ms" else median

    sizes = ((1000, 10), (10000, 10), (50000, 5))
    for what, label in (
        ("endpoint", "one endpoint changed (median)"),
        ("add", "one Service added"),
        ("delete", "one Service deleted"),
    ):
        for key, how in (
            ("duration_ms", "the daemon's sync"),
            ("latency_s", "from the API server's update to the kernel"),
        ):
            values = {size: figure(size, what, key) for size in sizes}
            shown = ", ".join(f"{n:,}: {secs(v)}" for (n, _), v in values.items())
            measured = [v for v in values.values() if v is not None]
            out.append(
                {
                    "target": f"`kproxy run`, {label}, {how}: under 50 ms at every size",
                    "measured": shown,
                    "reached": None if len(measured) < len(values) else max(measured) < 0.05,
                }
            )
            small, large = values[(1000, 10)], values[(50000, 5)]
            out.append(
                {
                    "target": f"`kproxy run`, {label}, {how}: the 50,000 figure within 1.5× the 1,000 figure",
                    "measured": f"{secs(large)} ÷ {secs(small)} = {large / small:.2f}" if small and large else "-",
                    "reached": None if not small or not large else large <= 1.5 * small,
                }
            )

    col = cols.get((50000, 5))
    run = _step(col, "run") if col else None
    peak = (
        run.get("peak_rss_end_mib") or run.get("peak_rss_after_first_sync_mib")
        if run and run.get("status") == "ok"
        else None
    )
    out.append(
        {
            "target": "peak RSS of the process at 50,000 × 5: under 600 MB (`kproxy run`, VmHWM)",
            "measured": f"{mib(peak)} = {peak * 1.048576:.0f} MB"
            if peak is not None
            else (status_text(run, budget) or "-"),
            "reached": None if peak is None else peak * 1.048576 < 600,
        }
    )
    return out


def targets_table(rows: list[Result], issue: int = 12) -> str:
    def mark(v: bool | None) -> str:
        return "not measured" if v is None else ("yes" if v else "**no**")

    return (
        f"| number to reach (issue {issue}) | measured | reached |\n|---|---|---|\n"
        + "\n".join(f"| {r['target']} | {r['measured']} | {mark(r['reached'])} |" for r in rows)
        + "\n"
    )


def markdown(results: Result, svg_name: str) -> str:
    parts = [
        f"Measured {results['measured']} on {results['machine']} ({results['cpus']} cores), Python "
        f"{results['python']}, kernel {results['kernel']}; time budget {secs(results['budget_s'])} per "
        f"run; {results['changes']} endpoint changes per run; the whole benchmark took "
        f"{secs(results['total_s'])}." + (f" {results['note']}" if results.get("note") else "") + "\n",
        f"![kproxy sync and kproxy run as processes, log scale]({svg_name})\n",
    ]
    for size in results["sizes"]:
        parts.append(
            f"**{size['services']:,} Services × {size['per_service']} endpoints**\n\n{size_table(size, results['budget_s'])}"
        )
    parts.append(targets_table(results["targets"]))
    if results.get("nftables_targets"):
        parts.append(targets_table(results["nftables_targets"], 13))
    return "\n".join(parts)


# -- the shared files ------------------------------------------------------------------------------


def put_block(doc_path: Path, marker: str, block: str) -> None:
    """Replace what stands between the two `marker` lines (or append the block with them)."""
    doc = doc_path.read_text() if doc_path.exists() else ""
    wrapped = f"{marker}\n{block.rstrip()}\n{marker}"
    if doc.count(marker) >= 2:
        pre, _, rest = doc.partition(marker)
        _, _, post = rest.partition(marker)
        doc = pre + wrapped + post
    else:
        doc = doc.rstrip("\n") + "\n\n" + wrapped + "\n"
    doc_path.write_text(doc)


def put_json(path: Path, key: str, value: Any) -> None:
    """Set one key of docs/benchmarks.json, keeping every other. The file used to be the
    in-process benchmark's list alone: that list becomes its key, "iptables"."""
    data: Any = json.loads(path.read_text()) if path.exists() else {}
    if isinstance(data, list):
        data = {"iptables": data}
    data[key] = value
    path.write_text(json.dumps(data, indent=1) + "\n")
