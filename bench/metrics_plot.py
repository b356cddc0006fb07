"""Draw the dashboard's panels over a recorded metrics sample, as one SVG (no plotting dependency).

python bench/metrics_plot.py docs/grafana/metrics-sample.json docs/grafana/kproxy-dashboard.svg

No Grafana runs here, so this draws what docs/grafana/kproxy-dashboard.json's panels would show
over the sample bench/metrics_sample.py recorded: the same series, and quantiles computed as
PromQL's histogram_quantile over a `WINDOW`-second increase (linear inside a bucket).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WINDOW = 10.0  # seconds: the rate/increase window of the dashboard's queries
COLOURS = ("#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd")

Series = list[tuple[float, float]]


class Sample:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.meta = doc["meta"]
        self.times: list[float] = doc["times"]
        self.series: list[tuple[str, dict[str, str], list[float | None]]] = [
            (n, labels, row) for n, labels, row in doc["series"]
        ]

    def rows(self, name: str, **labels: str) -> list[tuple[dict[str, str], list[float | None]]]:
        return [(ls, row) for n, ls, row in self.series if n == name and all(ls.get(k) == v for k, v in labels.items())]

    def gauge(self, name: str, **labels: str) -> Series:
        found = self.rows(name, **labels)
        if not found:
            return []
        return [(t, sum(r[i] or 0.0 for _, r in found)) for i, t in enumerate(self.times)]

    def _back(self, i: int) -> int:
        j = i
        while j > 0 and self.times[i] - self.times[j - 1] <= WINDOW + 1e-9:
            j -= 1
        return j

    def rate(self, name: str, **labels: str) -> Series:
        total = self.gauge(name, **labels)
        out = []
        for i in range(1, len(total)):
            j = min(self._back(i), i - 1)
            out.append((total[i][0], (total[i][1] - total[j][1]) / (total[i][0] - total[j][0])))
        return out

    def quantile(self, q: float, name: str, **labels: str) -> Series:
        buckets: dict[float, list[float]] = {}
        for ls, row in self.rows(name + "_bucket", **labels):
            le = math.inf if ls["le"] == "+Inf" else float(ls["le"])
            acc = buckets.setdefault(le, [0.0] * len(self.times))
            for i, v in enumerate(row):
                acc[i] += v or 0.0
        les = sorted(buckets)
        out = []
        for i in range(1, len(self.times)):
            j = min(self._back(i), i - 1)
            inc = [buckets[le][i] - buckets[le][j] for le in les]
            if not inc or inc[-1] <= 0:
                continue
            rank, lower, below = q * inc[-1], 0.0, 0.0
            for le, cum in zip(les, inc, strict=True):
                if cum >= rank:
                    value = lower if le == math.inf else lower + (le - lower) * (rank - below) / max(cum - below, 1e-12)
                    out.append((self.times[i], value))
                    break
                lower, below = le, cum
        return out


Panel = tuple[str, str, Callable[[Sample], Sequence[tuple[str, Series]]]]

PANELS: tuple[Panel, ...] = (
    (
        "Sync latency (p50, p99)",
        "s",
        lambda s: [
            ("p50", s.quantile(0.5, "kubeproxy_sync_proxy_rules_duration_seconds")),
            ("p99", s.quantile(0.99, "kubeproxy_sync_proxy_rules_duration_seconds")),
        ],
    ),
    (
        "Sync phases (p99)",
        "s",
        lambda s: [
            (p, s.quantile(0.99, "kproxy_sync_proxy_rules_phase_duration_seconds", phase=p))
            for p in ("render", "plan", "apply")
        ],
    ),
    (
        "Network programming latency (p50, p99)",
        "s",
        lambda s: [
            ("p50", s.quantile(0.5, "kubeproxy_network_programming_duration_seconds")),
            ("p99", s.quantile(0.99, "kubeproxy_network_programming_duration_seconds")),
        ],
    ),
    (
        "Rules per table (IPv4)",
        "",
        lambda s: [
            (t, s.gauge("kubeproxy_sync_proxy_rules_iptables_total", table=t, ip_family="IPv4"))
            for t in ("nat", "filter")
        ],
    ),
    (
        "Conntrack reconciler",
        "/s",
        lambda s: [
            ("deleted/s", s.rate("kubeproxy_conntrack_reconciler_deleted_entries_total", ip_family="IPv4")),
            ("runs/s", s.rate("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4")),
        ],
    ),
    (
        "Syncs, failures, tampered rules",
        "/s",
        lambda s: [
            ("partial ok/s", s.rate("kproxy_syncs_total", kind="partial", result="ok")),
            ("full ok/s", s.rate("kproxy_syncs_total", kind="full", result="ok")),
            ("failed/s", s.rate("kproxy_syncs_total", result="failed")),
            ("tampered/s", s.rate("kproxy_rules_tampered_total")),
        ],
    ),
)


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"
    return f"{v:.3g}{unit}" if v < 10 else f"{v:.0f}{unit}"


def panel_svg(
    x0: float, y0: float, w: float, h: float, title: str, unit: str, lines: Sequence[tuple[str, Series]]
) -> list[str]:
    out = [
        f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>',
        f'<text x="{x0 + 8}" y="{y0 + 16}" font-size="13" font-weight="bold">{title}</text>',
    ]
    px, py, pw, ph = x0 + 56, y0 + 28, w - 70, h - 64
    points = [p for _, series in lines for p in series]
    if not points:
        return [*out, f'<text x="{px}" y="{py + ph / 2}" font-size="11">no data</text>']
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    top = max(v for _, v in points) * 1.1 or 1.0
    out.append(f'<line x1="{px}" y1="{py + ph}" x2="{px + pw}" y2="{py + ph}" stroke="#888"/>')
    for k in range(5):
        v = top * k / 4
        y = py + ph - ph * k / 4
        out.append(f'<line x1="{px}" y1="{y:.1f}" x2="{px + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{px - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt(v, unit)}</text>')
    for k in range(4):
        t = t0 + (t1 - t0) * k / 3
        x = px + pw * k / 3
        out.append(f'<text x="{x:.1f}" y="{py + ph + 14}" font-size="10" text-anchor="middle">{t:.0f} s</text>')
    for n, (label, series) in enumerate(lines):
        colour = COLOURS[n % len(COLOURS)]
        if series:
            path = " ".join(
                f"{px + pw * (t - t0) / max(t1 - t0, 1e-9):.1f},{py + ph - ph * v / top:.1f}" for t, v in series
            )
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        lx = px + n * (pw / max(len(lines), 1))
        out.append(f'<rect x="{lx:.1f}" y="{y0 + h - 16}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14:.1f}" y="{y0 + h - 7}" font-size="10">{label}</text>')
    return out


def svg(sample: Sample) -> str:
    cols, w, h, gap = 2, 460, 220, 12
    rows = -(-len(PANELS) // cols)
    width, height = cols * (w + gap) + gap, rows * (h + gap) + gap + 30
    m = sample.meta
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{gap}" y="20" font-size="14">kproxy run, {m["mode"]} mode, {m["services"]} Services, one endpoint '
        f"change every {m['every']} s for {m['seconds']:.0f} s (recorded {m['recorded']}; {WINDOW:.0f} s windows)</text>",
    ]
    for n, (title, unit, lines) in enumerate(PANELS):
        x0 = gap + (n % cols) * (w + gap)
        y0 = 30 + gap + (n // cols) * (h + gap)
        out += panel_svg(x0, y0, w, h, title, unit, lines(sample))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sample = Sample(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(svg(sample))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
