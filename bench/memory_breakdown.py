"""Where a sync's memory goes, by stage, measured with tracemalloc.

Builds N Services x 10 endpoints (the benchmark's generated cluster), streams them through
`build_state` as a state file's items are, then takes the family view, and runs one full sync
of the iptables proxier over a backend that keeps nothing (so that only what kproxy itself
holds is counted). After each stage, and after a `gc.collect()`, the bytes still allocated are
attributed to the source lines that allocated them. Prints a Markdown table.

    python bench/memory_breakdown.py --services 10000
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from iptables_bench import objects  # noqa: E402  (the benchmark's generated cluster)

from kproxy.backends.iptables import SavedState  # noqa: E402
from kproxy.config import ProxyConfig  # noqa: E402
from kproxy.model import IPFamily  # noqa: E402
from kproxy.proxier.iptables.proxier import IptablesProxier  # noqa: E402
from kproxy.state import build_state  # noqa: E402
from kproxy.view import family_view, node_context  # noqa: E402


class NullIptables:
    """Accepts every transaction and keeps none of it: the kernel's side is not ours to count."""

    def save(self, *args: Any, **kwargs: Any) -> SavedState:
        return SavedState(chains={"nat": set(), "filter": set()}, jumps={}, jump_rules={})

    def restore(self, text: str) -> None:
        pass


def _streamed(n: int) -> Iterator[dict[str, Any]]:
    items = objects(n)
    items.reverse()
    while items:  # each raw object dropped once converted, as a streamed state file's are
        yield items.pop()


def _stage(before: tracemalloc.Snapshot, top: int) -> tuple[tracemalloc.Snapshot, float, list[str]]:
    gc.collect()
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats) / 1e6
    lines = []
    for s in stats[:top]:
        frame = s.traceback[0]
        where = frame.filename.split("/kproxy/")[-1] if "/kproxy/" in frame.filename else Path(frame.filename).name
        lines.append(f"{where}:{frame.lineno} {s.size_diff / 1e6:.1f} MB ({s.count_diff:,} objects)")
    return after, total, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    tracemalloc.start(1)
    rows = []
    start = tracemalloc.take_snapshot()
    state, _ = build_state(_streamed(args.services))
    snap, size, lines = _stage(start, args.top)
    rows.append(("model (ClusterState)", size, lines))
    view = family_view(state, IPFamily.V4)
    snap, size, lines = _stage(snap, args.top)
    rows.append(("family view", size, lines))
    cfg = ProxyConfig(node_name="node-0", cluster_cidrs=("10.0.0.0/8",))
    ctx = node_context(cfg, IPFamily.V4, None, ("127.0.0.1", "192.168.0.2"))
    proxier = IptablesProxier(NullIptables())
    result = proxier.sync(view, ctx, full=True)
    payload = len(result.payload)
    del result
    snap, size, lines = _stage(snap, args.top)
    rows.append(("iptables proxier, remembered after a full sync", size, lines))
    print(f"{args.services:,} Services x 10 endpoints; restore text of the full sync {payload / 1e6:.1f} MB\n")
    print("| what is held | MB | largest allocation sites |")
    print("|---|---|---|")
    for what, size, lines in rows:
        print(f"| {what} | {size:.1f} | {'<br>'.join(lines)} |")


if __name__ == "__main__":
    main()
