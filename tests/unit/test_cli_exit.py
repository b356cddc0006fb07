"""`kproxy` as a program: a one-shot command ends without freeing its heap (`entry`), and says
and exits exactly what `main` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from kproxy.cli.main import main
from kproxy.testing.builders import endpoint, endpoint_slice, node, service

TRACE = ["trace", "--node", "node-1", "--src", "10.0.2.5", "--dst", "172.30.0.41:80"]


def _program(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kproxy.cli.main", *args], capture_output=True, text=True, timeout=60)


def _state(tmp_path: Path, *extra: dict[str, object]) -> str:
    items = [
        node(name="node-1", addresses=["192.168.0.2"]),
        service(),
        endpoint_slice(endpoints=[endpoint("10.0.1.11", "node-1")]),
        *extra,
    ]
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return str(path)


def test_a_one_shot_command_prints_and_exits_as_main_does(tmp_path: Path) -> None:
    state = _state(tmp_path)
    done = _program(*TRACE, "--state", state)
    same = CliRunner().invoke(main, [*TRACE, "--state", state])
    assert (done.returncode, done.stdout) == (same.exit_code, same.output)
    assert "10.0.1.11:80" in done.stdout


def test_its_failure_exit_status_and_message_survive_the_quick_exit(tmp_path: Path) -> None:
    state = _state(tmp_path, service(name="bad", cluster_ip="172.30.0.99", port=99999))
    done = _program(*TRACE, "--state", state, "--strict")
    assert done.returncode == 2
    assert "skipped Service ns1/bad: spec.ports[0].port" in done.stderr
    assert "1 object(s) skipped and --strict given" in done.stderr
