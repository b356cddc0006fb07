"""A large YAML list parsed on several cores gives exactly what one process gives, or falls back.

The size threshold is lowered and the number of parts fixed, so small texts take the parallel
path; each test says whether it must (the parts were parsed apart) or must not (a doubt sent it
back to the one-process parse), and compares with the one-process result.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.errors import InputError
from kproxy.sources import yaml_parallel
from kproxy.sources.files import iter_objects
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, node, service


class Spy:
    def __init__(self) -> None:
        self.children: list[int] = []
        self.fallbacks = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    seen = Spy()
    monkeypatch.setattr(yaml_parallel, "MIN_SIZE", 0)
    start, whole = yaml_parallel._Child.start, yaml_parallel._Parallel._whole

    def counted_start(part: str, loader_cls: Any) -> Any:
        child = start(part, loader_cls)
        seen.children.append(child.pid)
        return child

    def counted_whole(self: Any) -> Iterator[Any]:
        seen.fallbacks += 1
        return whole(self)

    monkeypatch.setattr(yaml_parallel._Child, "start", staticmethod(counted_start))
    monkeypatch.setattr(yaml_parallel._Parallel, "_whole", counted_whole)
    yield seen
    for pid in seen.children:  # every child reaped, whatever happened
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _load(path: Path, monkeypatch: pytest.MonkeyPatch, parts: int, loader: Any = yaml.CSafeLoader) -> list[Any]:
    monkeypatch.setattr(yaml_parallel, "parts_here", lambda: parts)
    return list(iter_objects([path], loader=loader))


def _item(i: int) -> str:
    return f"""\
- apiVersion: v1
  kind: Service
  metadata:
    name: svc{i}
    namespace: ns{i % 3}
    annotations:
      note: "caf\u00e9 {i}, \U0001f600"
      multi: |
        line one {i}
        - not an item
  spec:
    clusterIP: 172.30.{i // 250}.{i % 250 + 1}
    ports:
    - {{port: 80, protocol: TCP, name: "p{i}"}}
    flags: [yes, ~, 0x1F, 1.5, '00']
# a comment between items
"""


def _list(n: int, kind: str = "List", extra: str = "") -> str:
    return "apiVersion: v1\nitems:\n" + "".join(_item(i) for i in range(n)) + extra + f"kind: {kind}\nmetadata: {{}}\n"


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_the_parts_parsed_apart_give_what_one_process_gives(
    parts: int, spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(_list(60))
    alone = _load(path, monkeypatch, 1)
    assert not spy.children
    together = _load(path, monkeypatch, parts)
    assert len(spy.children) == parts - 1 and spy.fallbacks == 0
    assert together == alone
    assert [o["metadata"]["name"] for o in together] == [f"svc{i}" for i in range(60)]
    assert together == yaml.load(path.read_text(), Loader=yaml.SafeLoader)["items"]


def test_the_pure_python_loader_splits_alike(spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(_list(30))
    assert _load(path, monkeypatch, 2, yaml.SafeLoader) == _load(path, monkeypatch, 1, yaml.CSafeLoader)
    assert len(spy.children) == 1 and spy.fallbacks == 0


def test_items_without_a_kind_take_the_lists_which_follows_them(
    spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(_list(40, kind="ServiceList").replace("  kind: Service\n", ""))
    objects = _load(path, monkeypatch, 2)
    assert spy.children and spy.fallbacks == 0
    assert {o["kind"] for o in objects} == {"Service"} and len(objects) == 40


def test_timestamps_cross_from_a_child(spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # marshal has no form for a datetime: that batch goes as pickle
    text = _list(40).replace("flags: [", "when: 2001-12-14t21:59:43.10-05:00\n    flags: [")
    path = tmp_path / "state.yaml"
    path.write_text(text)
    objects = _load(path, monkeypatch, 2)
    assert spy.children and spy.fallbacks == 0
    assert objects == _load(path, monkeypatch, 1)
    assert objects[-1]["spec"]["when"].year == 2001


def test_a_quoted_scalar_running_across_the_cut_is_not_trusted(
    spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libyaml lets a double-quoted scalar's next line start at column 0 with "- ": that line
    # looks like an item but is text of the one before. The cut is put on it.
    before = "".join(_item(i) for i in range(20))
    after = "".join(_item(i) for i in range(20, 40))
    text = f'apiVersion: v1\nitems:\n{before}- kind: Service\n  metadata:\n    name: "runs\n- on: here"\n{after}kind: List\n'
    plan = yaml_parallel.cut(text + "x" * yaml_parallel.MIN_SIZE, 2)
    assert plan is not None
    crossing = text.index("- on: here")
    monkeypatch.setattr(yaml_parallel, "OWN_SHARE", 2 * (crossing - 1 - plan.body) / (len(text) - plan.body))
    landed = yaml_parallel.cut(text, 2)
    assert landed is not None and landed.offsets[0] == crossing
    path = tmp_path / "state.yaml"
    path.write_text(text)
    objects = _load(path, monkeypatch, 2)
    assert spy.children and spy.fallbacks == 1
    assert objects == yaml.load(text, Loader=yaml.SafeLoader)["items"]
    assert objects[20]["metadata"]["name"] == "runs - on: here"


def test_an_alias_to_an_anchor_of_another_part_falls_back(
    spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _list(40).replace("  metadata:\n    name: svc0\n", "  metadata: &first\n    name: svc0\n", 1)
    text = text.replace("  metadata:\n    name: svc39\n    namespace: ns0\n", "  metadata: *first\n  x:\n    y: 1\n", 1)
    path = tmp_path / "state.yaml"
    path.write_text(text)
    objects = _load(path, monkeypatch, 2)
    assert spy.children and spy.fallbacks == 1
    assert objects == yaml.load(text, Loader=yaml.SafeLoader)["items"]
    assert objects[-1]["metadata"]["name"] == "svc0"


def test_a_parse_error_is_reported_at_its_line_in_the_whole_file(
    spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for broken in ("name: svc35\n", "name: svc3\n"):  # in the child's part, then in this process's
        text = _list(40).replace(broken, broken.replace("name:", "name: [oops"), 1)
        path = tmp_path / "state.yaml"
        path.write_text(text)
        with pytest.raises(InputError) as alone:
            _load(path, monkeypatch, 1)
        with pytest.raises(InputError) as together:
            _load(path, monkeypatch, 2)
        assert str(together.value) == str(alone.value)
        line = text[: text.index("[oops")].count("\n") + 1
        assert f"line {line + 1}," in str(alone.value) or f"line {line}," in str(alone.value)


def test_an_object_left_half_read_kills_and_reaps_the_children(
    spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(_list(60))
    monkeypatch.setattr(yaml_parallel, "parts_here", lambda: 3)
    objects = iter_objects([path])
    assert isinstance(objects, Generator)
    assert next(objects)["metadata"]["name"] == "svc0"
    objects.close()
    assert len(spy.children) == 2  # and the fixture finds them reaped


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("---\n" + _list(20) + "---\n" + _list(20), id="two documents"),
        pytest.param("%YAML 1.1\n---\n" + _list(20), id="a directive"),
        pytest.param(_list(20).replace("items:\n", "items:\n  "), id="items indented"),
        pytest.param("kind: List\nitems: []\n", id="no items"),
        pytest.param(_list(1), id="one item"),
    ],
)
def test_texts_not_fit_to_cut_are_parsed_whole(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yaml_parallel, "MIN_SIZE", 0)
    assert yaml_parallel.cut(_list(20), 2) is not None
    assert yaml_parallel.cut(text, 2) is None


def test_small_texts_are_not_cut() -> None:
    assert yaml_parallel.cut(_list(40), 2) is None  # below MIN_SIZE: a fork costs more
    assert yaml_parallel.cut(_list(40), 1) is None


def test_a_leading_document_start_is_no_doubt(spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("---\n" + _list(40))
    assert _load(path, monkeypatch, 2) == _load(path, monkeypatch, 1)
    assert spy.children and spy.fallbacks == 0


def test_one_malformed_object_in_a_childs_part_loses_only_itself(
    spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects: list[dict[str, Any]] = [node()]
    for i in range(400):
        objects.append(service(name=f"svc{i}", cluster_ip=f"172.30.{i // 250}.{i % 250 + 1}"))
        objects.append(endpoint_slice(f"svc{i}", endpoints=[endpoint(f"10.1.{i // 250}.{i % 250 + 1}", "node-1")]))
    objects[701]["spec"]["ports"][0]["port"] = "eighty"  # Service svc350, in the child's part
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects}))
    monkeypatch.setattr(yaml_parallel, "parts_here", lambda: 2)
    state, rejected = build_state(iter_objects([path]))
    assert spy.children and spy.fallbacks == 0
    assert len(state.services) == 399 and len(state.slices) == 400
    assert [str(e).split(":")[0] for e in rejected] == ["Service ns1/svc350"]


def test_no_fork_means_one_process(spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(_list(40))
    alone = _load(path, monkeypatch, 1)

    def refused() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")  # fork's EAGAIN

    monkeypatch.setattr(os, "fork", refused)
    assert _load(path, monkeypatch, 3) == alone
    assert not spy.children


def test_a_record_that_does_not_decode_is_a_doubt(spy: Spy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(_list(40))
    alone = _load(path, monkeypatch, 1)
    write = yaml_parallel._Records.write

    def garbled(self: Any, tag: bytes, data: bytes) -> None:  # runs in the forked child
        write(self, tag, data[: len(data) // 2] if tag == b"m" else data)

    monkeypatch.setattr(yaml_parallel._Records, "write", garbled)
    assert _load(path, monkeypatch, 2) == alone
    assert spy.children and spy.fallbacks == 1
