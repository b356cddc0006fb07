"""The registry of modes drives the command line, the daemon's configuration and cleanup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kproxy import modes as registry
from kproxy.cli.main import main
from kproxy.config import MODE_FIELDS, load_run_config
from kproxy.errors import ConfigError
from kproxy.modes import DataPlaneMode, ModeInfo
from kproxy.testing.builders import node, service


@pytest.mark.parametrize("info", list(registry.MODES.values()), ids=list(registry.MODES))
def test_every_registered_mode_implements_the_protocol(info: ModeInfo) -> None:
    mode = info.load()
    assert isinstance(mode, DataPlaneMode)
    assert info.section and info.own_fields
    assert MODE_FIELDS[info.name]  # the fields only it reads are known to the configuration


class FakeMode:
    """A mode that records what the command line asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def proxier(self, family: Any, cfg: Any, iptables: Any) -> Any:
        self.calls.append("proxier")
        return None

    def sync_once(self, cfg: Any, state: Any, *, dry_run: bool) -> str:
        self.calls.append(f"sync_once dry_run={dry_run} services={len(state.services)}")
        return "fake mode synced\n"

    def trace(self, cfg: Any, state: Any, family: Any, host: Any, packet: Any) -> list[str]:
        self.calls.append(f"trace {packet}")
        return ["fake trace"]

    def describe(self, cfg: Any, view: Any, ctx: Any) -> Any:
        self.calls.append("describe")
        return {}

    def check(self, cfg: Any, family: Any, expected: Any, complete: bool) -> list[str]:
        self.calls.append("check")
        return []

    def cleanup(self, upstream: bool) -> str | None:
        self.calls.append(f"cleanup upstream={upstream}")
        return "fake: removed everything"

    def leave(self, variant: str, successor: Any) -> str | None:
        self.calls.append(f"leave {variant}")
        return None


FAKE = FakeMode()


@pytest.fixture
def fake_mode(monkeypatch: pytest.MonkeyPatch) -> FakeMode:
    FAKE.calls.clear()
    info = ModeInfo("nftables", "nftables", ("nftables.",), periodic_full=False, implementation=f"{__name__}:FAKE")
    monkeypatch.setitem(registry.MODES, "nftables", info)
    return FAKE


def _state(tmp_path: Path) -> str:
    path = tmp_path / "state.yaml"
    items = [node(addresses=["192.168.0.2"]), service()]
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    return str(path)


def test_a_registered_mode_is_run_synced_traced_and_cleaned_through_the_registry(
    fake_mode: FakeMode, tmp_path: Path
) -> None:
    cfg = load_run_config({"proxy-mode": "nftables", "hostname-override": "node-1"}).config
    assert cfg.proxy.mode == "nftables"
    runner = CliRunner()
    state = _state(tmp_path)
    res = runner.invoke(main, ["sync", "--mode", "nftables", "--node", "node-1", "--state", state, "--dry-run"])
    assert (res.exit_code, res.output) == (0, "fake mode synced\n")
    res = runner.invoke(
        main,
        ["trace", "--mode", "nftables", "--node", "node-1", "--state", state]
        + ["--src", "203.0.113.10", "--dst", "172.30.0.41:80"],
    )
    assert (res.exit_code, res.output) == (0, "fake trace\n")
    res = runner.invoke(main, ["status", "--mode", "nftables", "--node", "node-1", "--state", state, "--check"])
    assert res.exit_code == 0, res.output
    assert fake_mode.calls[:2] == [
        "sync_once dry_run=True services=1",
        "trace ('203.0.113.10', '172.30.0.41', 80, 'tcp', 'eth0')",
    ]
    assert set(fake_mode.calls[2:]) == {"describe", "check"}  # kproxy status asks the mode, per family


def test_an_unregistered_mode_is_refused_the_same_way_by_run_and_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(registry.MODES, "nftables")  # a known mode this build would not have
    with pytest.raises(ConfigError, match="this build of kproxy runs the iptables and ipvs modes only"):
        load_run_config({"proxy-mode": "nftables", "hostname-override": "node-1"})
    res = CliRunner().invoke(main, ["sync", "--mode", "nftables", "--node", "n", "--state", _state(tmp_path)])
    assert res.exit_code == 2 and "this build of kproxy runs the iptables and ipvs modes only" in res.output


def test_cleanup_asks_every_registered_mode(fake_mode: FakeMode, monkeypatch: pytest.MonkeyPatch) -> None:
    import kproxy.proxier.cleanup

    monkeypatch.setattr(kproxy.proxier.cleanup, "cleanup_iptables", lambda upstream=False: 0)
    for info in registry.MODES.values():
        if info.name != "nftables":
            monkeypatch.setattr(info.load(), "cleanup", lambda upstream: None)
    res = CliRunner().invoke(main, ["cleanup", "--upstream"])
    assert res.exit_code == 0, res.output
    assert res.output == "removed 0 chains\nfake: removed everything\n"
    assert fake_mode.calls == ["cleanup upstream=True"]
    fake_mode.calls.clear()
    assert CliRunner().invoke(main, ["cleanup", "--mode", "iptables"]).exit_code == 0
    assert fake_mode.calls == []


def test_leaving_a_mode_asks_every_other_mode(fake_mode: FakeMode) -> None:
    assert [m.name for m in registry.others("iptables")] == ["ipvs", "nftables"]
    assert [m.name for m in registry.others("nftables")] == ["iptables", "ipvs"]


def test_backends_and_their_fakes_implement_the_same_protocols() -> None:
    from kproxy.backends import protocols as bp
    from kproxy.backends.conntrack import Conntrack
    from kproxy.backends.dummy import DummyDevice
    from kproxy.backends.ipset import Ipset
    from kproxy.backends.iptables import Iptables
    from kproxy.backends.ipvs import Ipvs
    from kproxy.model import IPFamily
    from kproxy.testing.fakeconntrack import FakeConntrack
    from kproxy.testing.fakeiptables import FakeIptables
    from kproxy.testing.ipvs_fakes import FakeDummy, FakeIpset, FakeIpvs

    pairs = [
        (bp.IptablesBackend, Iptables(IPFamily.V4, "nft"), FakeIptables()),
        (bp.ConntrackBackend, Conntrack(IPFamily.V4), FakeConntrack()),
        (bp.IpsetBackend, Ipset(), FakeIpset()),
        (bp.DeviceBackend, DummyDevice("kproxy-test0"), FakeDummy()),
    ]
    for protocol, real, fake in pairs:
        assert isinstance(real, protocol) and isinstance(fake, protocol), protocol.__name__
    assert issubclass(Ipvs, bp.IpvsBackend) and isinstance(FakeIpvs(), bp.IpvsBackend)
