"""Draw the benchmark results as SVG bar charts (log scale), with no plotting dependency.

python bench/plot.py docs/benchmarks.json docs/benchmarks.svg           # in-process
python bench/plot.py docs/benchmarks.json docs/benchmarks-process.svg   # kproxy sync / run
python bench/plot.py docs/benchmarks.json docs/benchmarks-first-packet.svg   # new connections/s
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SERIES = (
    ("render_s", "render (full)", "#4c72b0"),
    ("plan_s", "plan (full)", "#55a868"),
    ("apply_s", "apply (full)", "#c44e52"),
    ("partial_render_s", "partial render+plan", "#8172b2"),
    ("partial_apply_s", "partial apply", "#ccb974"),
    ("listing_s", "listing (drift check)", "#64b5cd"),
    ("idle_sync_s", "idle sync", "#8c8c8c"),
    ("repair_sync_s", "flush repair", "#da8bc3"),
)
LEGEND_ROW = 4  # legend entries per line
LO, HI = 1e-3, 100.0  # seconds: the log axis runs from 1 ms to 100 s


def svg(results: list[dict]) -> str:
    bar, gap, left, top, width = 14, 18, 190, 40, 520
    groups = len(results)
    legend_rows = -(-len(SERIES) // LEGEND_ROW)
    height = top + groups * (len(SERIES) * bar + gap) + 44 + 16 * legend_rows
    axis = height - 16 * legend_rows - 28  # where the tick labels sit

    def x(seconds: float) -> float:
        s = min(max(seconds, LO), HI)
        return left + width * (math.log10(s) - math.log10(LO)) / (math.log10(HI) - math.log10(LO))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 140}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="20" font-size="13">kproxy iptables mode: seconds per sync (log scale)</text>',
    ]
    for tick in (1e-3, 1e-2, 1e-1, 1, 10, 100):
        tx = x(tick)
        label = f"{tick * 1000:g} ms" if tick < 1 else f"{tick:g} s"
        out.append(f'<line x1="{tx:.1f}" y1="{top - 5}" x2="{tx:.1f}" y2="{axis - 14}" stroke="#ddd"/>')
        out.append(f'<text x="{tx:.1f}" y="{axis}" text-anchor="middle">{label}</text>')
    y = top
    for r in results:
        out.append(f'<text x="8" y="{y + bar * 2}">{r["services"]:,} × 10, {r["variant"]}</text>')
        for key, _, colour in SERIES:
            if key in r:
                out.append(
                    f'<rect x="{left}" y="{y}" width="{x(r[key]) - left:.1f}" height="{bar - 2}" fill="{colour}"/>'
                )
                value = r[key]
                text = f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
                out.append(f'<text x="{x(r[key]) + 4:.1f}" y="{y + bar - 4}">{text}</text>')
            y += bar
        y += gap
    for i, (_, label, colour) in enumerate(SERIES):
        if i % LEGEND_ROW == 0:
            lx, ly = left, axis + 14 + 16 * (i // LEGEND_ROW)
        out.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly + 9}">{label}</text>')
        lx += 14 + 7 * len(label) + 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


# The process benchmark (bench/process_bench.py): per size and mode/backend, seconds.
PROCESS_SERIES = (
    ("sync.yaml.wall_s", "kproxy sync, YAML (whole process)", "#4c72b0"),
    ("sync.json.wall_s", "kproxy sync, JSON (whole process)", "#64b5cd"),
    ("sync.yaml.apply_s", "its apply", "#c44e52"),
    ("sync.floor.apply_s", "kernel floor (bare restore)", "#8c8c8c"),
    ("run.to_first_sync_s", "kproxy run: start to first sync", "#55a868"),
    ("run.change_p50_s", "one endpoint change, p50", "#8172b2"),
    ("run.change_p99_s", "one endpoint change, p99", "#da8bc3"),
    ("sync.floor.change.apply_s", "kernel floor of one change", "#ccb974"),
)


def _lookup(column: dict, path: str) -> float | str | None:
    """The figure at `path`, or the status of the step that did not run, or None."""
    node: object = column
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        if node.get("status", "ok") != "ok":
            return str(node["status"])
        node = node.get(part)
    return node if isinstance(node, (int, float)) else None


def process_svg(results: dict) -> str:
    groups = []
    for size in results["sizes"]:
        for name, column in size["columns"].items():
            if column.get("status", "ok") != "ok":
                continue  # not built, not available: nothing to draw
            label = f"{size['services']:,} × {size['per_service']}, {name}"
            groups.append((label, {key: _lookup(column, key) for key, _, _ in PROCESS_SERIES}))
    return bars("kproxy sync and kproxy run as processes: seconds (log scale)", groups, PROCESS_SERIES)


def bars(title: str, groups: list[tuple[str, dict]], series: tuple[tuple[str, str, str], ...]) -> str:
    """Horizontal bars per group and series on a log axis; a string value (a step over budget)
    is written where its bar would be."""
    bar, gap, left, top, width = 14, 18, 230, 40, 520
    legend_rows = -(-len(series) // 3)
    height = top + max(len(groups), 1) * (len(series) * bar + gap) + 44 + 16 * legend_rows
    axis = height - 16 * legend_rows - 28

    def x(seconds: float) -> float:
        s = min(max(seconds, LO), HI)
        return left + width * (math.log10(s) - math.log10(LO)) / (math.log10(HI) - math.log10(LO))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 160}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="8" y="20" font-size="13">{title}</text>',
    ]
    for tick in (1e-3, 1e-2, 1e-1, 1, 10, 100):
        tx = x(tick)
        label = f"{tick * 1000:g} ms" if tick < 1 else f"{tick:g} s"
        out.append(f'<line x1="{tx:.1f}" y1="{top - 5}" x2="{tx:.1f}" y2="{axis - 14}" stroke="#ddd"/>')
        out.append(f'<text x="{tx:.1f}" y="{axis}" text-anchor="middle">{label}</text>')
    y = top
    for label, values in groups:
        out.append(f'<text x="8" y="{y + bar * 2}">{label}</text>')
        for key, _, colour in series:
            value = values.get(key)
            if isinstance(value, (int, float)):
                out.append(
                    f'<rect x="{left}" y="{y}" width="{x(value) - left:.1f}" height="{bar - 2}" fill="{colour}"/>'
                )
                text = f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
                out.append(f'<text x="{x(value) + 4:.1f}" y="{y + bar - 4}">{text}</text>')
            elif isinstance(value, str):
                out.append(f'<rect x="{left}" y="{y}" width="4" height="{bar - 2}" fill="{colour}"/>')
                out.append(f'<text x="{left + 8}" y="{y + bar - 4}" fill="#555">{value}</text>')
            y += bar
        y += gap
    for i, (_, label, colour) in enumerate(series):
        if i % 3 == 0:
            lx, ly = left, axis + 14 + 16 * (i // 3)
        out.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly + 9}">{label}</text>')
        lx += 14 + 6 * len(label) + 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


# The first-packet benchmark (bench/first_packet.py): new connections per second, linear axis.
FIRST_PACKET_SERIES = (
    ("service", "through the ClusterIP", "#4c72b0"),
    ("pod_with_rules", "to the pod, rules loaded", "#55a868"),
    ("baseline", "to the pod, no rules", "#8c8c8c"),
)


def first_packet_svg(results: dict) -> str:
    """One group per size and mode, one bar per target: the median connections per second, with
    the rounds' min-max drawn as a whisker."""
    groups = [
        (f"{size['services']:,}, {name}", column)
        for size in results["sizes"]
        for name, column in size["columns"].items()
        if column.get("status") == "ok"
    ]
    top_value = max([column[key]["per_s_max"] for _, column in groups for key, _, _ in FIRST_PACKET_SERIES] or [1.0])
    scale = 10 ** math.floor(math.log10(top_value))
    top_value = math.ceil(top_value / scale) * scale
    bar, gap, left, top, width = 14, 18, 200, 40, 480
    height = top + max(len(groups), 1) * (len(FIRST_PACKET_SERIES) * bar + gap) + 60

    def x(value: float) -> float:
        return left + width * value / top_value

    axis = height - 36
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        '<text x="8" y="20" font-size="13">New TCP connections per second through one Service '
        "(median of the rounds, min-max whisker)</text>",
    ]
    for i in range(6):
        value = top_value * i / 5
        out.append(f'<line x1="{x(value):.1f}" y1="{top - 5}" x2="{x(value):.1f}" y2="{axis - 14}" stroke="#ddd"/>')
        out.append(f'<text x="{x(value):.1f}" y="{axis}" text-anchor="middle">{value:,.0f}</text>')
    y = top
    for label, column in groups:
        out.append(f'<text x="8" y="{y + bar * 2}">{label}</text>')
        for key, _, colour in FIRST_PACKET_SERIES:
            s = column[key]
            out.append(
                f'<rect x="{left}" y="{y}" width="{x(s["per_s_median"]) - left:.1f}" height="{bar - 2}" fill="{colour}"/>'
            )
            mid = y + (bar - 2) / 2
            out.append(
                f'<line x1="{x(s["per_s_min"]):.1f}" y1="{mid}" x2="{x(s["per_s_max"]):.1f}" y2="{mid}" stroke="#000"/>'
            )
            out.append(f'<text x="{x(s["per_s_max"]) + 4:.1f}" y="{y + bar - 4}">{s["per_s_median"]:,.0f}</text>')
            y += bar
        y += gap
    lx = left
    for _, label, colour in FIRST_PACKET_SERIES:
        out.append(f'<rect x="{lx}" y="{axis + 14}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="{axis + 23}">{label}</text>')
        lx += 14 + 6 * len(label) + 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2])
    if isinstance(data, list):  # the file before it held more than the in-process benchmark
        data = {"iptables": data}
    if target.stem.endswith("-first-packet"):
        target.write_text(first_packet_svg(data["first_packet"]))
    elif target.stem.endswith("-process"):
        target.write_text(process_svg(data["process"]))
    else:
        target.write_text(svg(data["iptables"]))


if __name__ == "__main__":
    main()
