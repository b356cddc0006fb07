"""The benchmark runs end to end at a small size, so that it cannot rot (nothing is timed here)."""

from __future__ import annotations

import json
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


PROCESS_BENCH = BENCH.with_name("process_bench.py")


def test_the_process_benchmark_runs_kproxy_sync_and_run_at_100_services(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- bench:process -->\n<!-- bench:process -->\n\n## Kept\n")
    done = subprocess.run(
        [
            sys.executable,
            str(PROCESS_BENCH),
            "--sizes",
            "100x10",
            "--changes",
            "5",
            "--budget",
            "120",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "benchmarks.json").read_text())["process"]
    (size,) = results["sizes"]
    assert (size["services"], size["per_service"]) == (100, 10)
    for name in ("iptables / legacy", "iptables / nft"):
        column = size["columns"][name]
        for step in ("yaml", "json", "floor"):
            assert column["sync"][step]["status"] == "ok", (name, step, column["sync"][step])
        assert column["sync"]["floor"]["change"]["status"] == "ok"
        assert all(column["sync"][f][k] > 0 for f in ("yaml", "json") for k in ("wall_s", "apply_s", "peak_rss_mib"))
        for f in ("yaml", "json"):  # kproxy's own peak apart from its children's, the larger of which wait4 gives
            sync = column["sync"][f]
            assert (
                0 < sync["own_rss_mib"] <= sync["peak_rss_mib"] and 0 < sync["children_rss_mib"] <= sync["peak_rss_mib"]
            )
            assert max(sync["own_rss_mib"], sync["children_rss_mib"]) == pytest.approx(sync["peak_rss_mib"], rel=0.05)
        run = column["run"]
        assert run["status"] == "ok", run
        assert len(run["changes"]) == 5 and run["verified_in_kernel"] is True
        assert run["to_first_sync_s"] > 0 and run["peak_rss_mib"] > 0
        assert run["add_service"]["latency_s"] > 0 and run["delete_service"]["latency_s"] > 0
    # Modes that cannot run here are recorded as such, not dropped.
    assert {c.get("status", "ok") for c in size["columns"].values()} <= {
        "ok",
        "not built",
        "not available on this kernel",
    }
    doc = out.read_text()
    assert doc.endswith("## Kept\n") and doc.count("<!-- bench:process -->") == 2
    assert "| `kproxy sync`, YAML file: whole process |" in doc and "number to reach" in doc
    assert (tmp_path / "benchmarks-process.svg").read_text().startswith("<svg")


FIRST_PACKET = BENCH.with_name("first_packet.py")


def test_the_first_packet_benchmark_runs_at_20_and_50_services(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    before = _labs()
    out.write_text("# Benchmarks\n\n<!-- bench:first-packet -->\n<!-- bench:first-packet -->\n\n## Kept\n")
    done = subprocess.run(
        [
            sys.executable,
            str(FIRST_PACKET),
            "--sizes",
            "20",
            "50",
            "--columns",
            "nftables",
            "iptables/legacy",
            "iptables/nft",
            "--nft-max",
            "20",
            "--rounds",
            "1",
            "--seconds",
            "0.2",
            "--latency-seconds",
            "0.1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "benchmarks.json").read_text())["first_packet"]
    assert [s["services"] for s in results["sizes"]] == [20, 50]
    for size in results["sizes"]:
        for name in ("nftables", "iptables / legacy"):
            case = size["columns"][name]
            assert case["status"] == "ok", (size["services"], name, case)
            assert case["sync_s"] > 0
            for target in ("baseline", "service", "pod_with_rules"):
                figures = case[target]
                # Connections went through (how many is the machine's business, not asserted).
                assert figures["per_s_median"] > 0 and figures["p50_us_median"] > 0, (name, target)
                assert figures["per_s_min"] <= figures["per_s_median"] <= figures["per_s_max"]
                assert len(figures["rounds"]) == 1
    # iptables-nft runs only up to --nft-max, and says so above it.
    assert results["sizes"][0]["columns"]["iptables / nft"]["status"] == "ok"
    assert results["sizes"][1]["columns"]["iptables / nft"]["status"] == "not run"
    ratios = {r["column"]: r for r in results["ratios"]}
    assert ratios["nftables"]["status"] == "ok" and ratios["nftables"]["per_s_ratio"] > 0
    assert ratios["iptables / nft"]["status"] == "not measured"
    doc = out.read_text()
    assert doc.endswith("## Kept\n") and doc.count("<!-- bench:first-packet -->") == 2
    assert "| 50 | iptables / nft | not run:" in doc and "within 10 %" in doc
    assert (tmp_path / "benchmarks-first-packet.svg").read_text().startswith("<svg")
    assert _labs() <= before, "the benchmark's lab namespaces outlived it"


def _labs() -> set[str]:
    return {n for n in os.listdir("/run/netns") if n.startswith("fp")} if os.path.isdir("/run/netns") else set()
