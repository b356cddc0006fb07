"""`make demo` end to end: `kproxy lab demo` builds, programs, probes and removes its lab."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kproxy.lab.namespaces import lab_namespaces

KPROXY = str(Path(sys.executable).with_name("kproxy"))


def test_demo_shows_traffic_landing_and_cleans_up() -> None:
    prefix = f"kt{os.getpid()}demo"
    res = subprocess.run([KPROXY, "lab", "demo", "--prefix", prefix], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "answered by pod-1a, which saw the client as 203.0.113.10" in res.stdout  # eTP Local LB keeps the client
    assert "ClusterIP demo/web" in res.stdout and "NodePort demo/shop" in res.stdout
    assert "--node node-2" in res.stdout and "pod-2b (node-2's rules)" in res.stdout
    assert lab_namespaces(prefix) == []


def test_lab_up_and_down() -> None:
    prefix = f"kt{os.getpid()}up"
    try:
        up = subprocess.run([KPROXY, "lab", "up", "--prefix", prefix], capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        assert f"{prefix}-node1" in lab_namespaces(prefix)
    finally:
        down = subprocess.run([KPROXY, "lab", "down", "--prefix", prefix], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and lab_namespaces(prefix) == []
