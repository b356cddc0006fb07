"""The benchmark runs end to end at a small size, so that it cannot rot (nothing is timed here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark applies rules in its own namespaces (root)")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "iptables_bench.py"


def test_the_benchmark_runs_at_100_services_on_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--services", "100", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 100 × 10 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["legacy", "nft"]
    assert (tmp_path / "benchmarks.json").exists() and (tmp_path / "benchmarks.svg").exists()
