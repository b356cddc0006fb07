"""`kproxy sync` as a process on state files, and the kernel's bare cost for the same payload.

For one size, mode and backend: the whole process on the YAML file and on the JSON file, each in
a fresh namespace (wall, kproxy's own render and apply from its summary lines, user CPU, peak
RSS); then `kproxy sync --dry-run` in a fresh namespace for the exact text kproxy writes there,
and that text loaded by the kernel tool alone (`iptables-restore --noflush`, or `nft -f`) in
another fresh namespace: the floor. In the iptables mode the floor namespace then also takes the
input of one endpoint change and of its reversal, alternately (`change_payload.py`): the floor of
the daemon's network-programming latency.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from cluster import NODE
from modes import ModeSpec
from procs import ENV, KPROXY, KPROXY_OWN_PEAK, Timed, fresh_netns, in_netns, timed

# "render R ms, plan P ms, apply A ms": the "apply" column is plan + apply (reading back what
# the kernel holds, working out the difference, writing it), as before the plan had its own.
SUMMARY = re.compile(r"^(IPv[46]): .*render ([\d.]+) ms, (?:plan ([\d.]+) ms, )?apply ([\d.]+) ms", re.M)
CHANGE_REPEATS = 5  # each direction; the floor of one change is the median of the ten


class Budget:
    """Seconds left for one run (a size × mode × backend); every step takes what it needs of it."""

    def __init__(self, seconds: float) -> None:
        import time

        self._time = time
        self.total = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - self._time.monotonic())


def unavailable(done: Timed) -> str | None:
    """Why a mode could not run at all here ("not built", "not available: ..."), or None."""
    err = done.stderr.strip().splitlines()
    if done.returncode == 2 and any("modes only" in line or "not available" in line for line in err):
        return "not built"
    if done.returncode == 1 and any("not available" in line for line in err):
        return "not available on this kernel"
    return None


def failed(done: Timed) -> dict[str, Any]:
    if done.over_budget:
        return {"status": "over budget", "after_s": done.wall_s}
    why = unavailable(done)
    if why:
        return {"status": why}
    return {"status": "failed", "returncode": done.returncode, "stderr": done.stderr[-1500:]}


def sync_process(spec: ModeSpec, backend: str, state: Path, budget: Budget, tag: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="kproxy-bench-peak-", suffix=".json") as report:
        argv = [*KPROXY_OWN_PEAK, "sync", *spec.flags(backend), "--state", str(state), "--node", NODE]
        with fresh_netns(tag) as ns:
            done = timed(in_netns(ns, argv), budget.left(), env={**ENV, "OWN_PEAK_REPORT": report.name})
        peaks = json.loads(Path(report.name).read_text() or "{}")
    if done.returncode != 0:
        return failed(done)
    families = SUMMARY.findall(done.stdout)
    return {
        "status": "ok",
        "wall_s": done.wall_s,
        "render_s": sum(float(r) for _, r, _, _ in families) / 1000,
        "apply_s": sum(float(p or 0) + float(a) for _, _, p, a in families) / 1000,
        "user_s": done.user_s,
        "sys_s": done.sys_s,
        "peak_rss_mib": done.maxrss_mib,  # the larger of kproxy's own and its children's
        "own_rss_mib": peaks.get("own_mib"),
        "children_rss_mib": peaks.get("children_mib"),  # the largest: the kernel tool's, nearly always
        "summary": done.stdout.strip().splitlines(),
    }


def floor(spec: ModeSpec, backend: str, state: Path, budget: Budget, tag: str, changes: bool) -> dict[str, Any]:
    """The dry run's text, then the kernel tool alone loading it in a fresh namespace."""
    argv = [*KPROXY, "sync", *spec.flags(backend), "--state", str(state), "--node", NODE, "--dry-run"]
    with fresh_netns(tag + "d") as ns:
        dry = timed(in_netns(ns, argv), budget.left())
    if dry.returncode != 0:
        return failed(dry)
    text = dry.stdout
    out: dict[str, Any] = {"status": "ok", "lines": text.count("\n"), "bytes": len(text.encode())}
    with fresh_netns(tag + "f") as ns:
        walls = []
        for tool, payload in spec.floor(text, backend):
            done = timed(in_netns(ns, tool), budget.left(), stdin=payload)
            if done.returncode != 0:
                return {**out, **failed(done), "tool": tool}
            walls.append(done.wall_s)
        out["apply_s"] = sum(walls)
        out["transactions"] = len(walls)
        if changes:
            out["change"] = change_floor(backend, state, ns, budget)
    return out


def change_floor(backend: str, state: Path, ns: str, budget: Budget) -> dict[str, Any]:
    """One endpoint change and back, applied alternately by the bare `iptables-restore`."""
    services, per_service = _size_of(state)
    made = timed(
        [sys.executable, str(Path(__file__).with_name("change_payload.py")), str(services), str(per_service)],
        budget.left(),
    )
    if made.returncode != 0:
        return failed(made)
    texts = json.loads(made.stdout)
    walls = []
    for _ in range(CHANGE_REPEATS):
        for direction in ("forward", "back"):
            done = timed(
                in_netns(ns, [f"iptables-{backend}-restore", "--noflush"]), budget.left(), stdin=texts[direction]
            )
            if done.returncode != 0:
                return failed(done)
            walls.append(done.wall_s)
    return {
        "status": "ok",
        "apply_s": statistics.median(walls),
        "runs_s": walls,
        "lines": texts["forward"].count("\n"),
    }


def _size_of(state: Path) -> tuple[int, int]:
    # The benchmark names its state files svc<N>x<M>.<fmt>.
    m = re.fullmatch(r"svc(\d+)x(\d+)\.\w+", state.name)
    if not m:
        raise ValueError(f"not a benchmark state file: {state}")
    return int(m[1]), int(m[2])


def measure(spec: ModeSpec, backend: str, states: dict[str, Path], budget: Budget, tag: str) -> dict[str, Any]:
    """Every `kproxy sync` figure of one size, mode and backend; stops at the first step that
    could not run (over budget, not built)."""
    out: dict[str, Any] = {}
    for fmt, path in states.items():
        out[fmt] = sync_process(spec, backend, path, budget, f"{tag}{fmt[0]}")
        if out[fmt]["status"] != "ok":
            # What could not run stands for the steps after it (over budget, not built).
            for rest in [*states, "floor"]:
                out.setdefault(rest, {"status": out[fmt]["status"]})
            return out
    out["floor"] = floor(spec, backend, states["json"], budget, tag, changes=spec.name == "iptables")
    return out
