"""State files load at the parser's speed and give the same model whatever the loader or format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.errors import InputError
from kproxy.sources.files import YAML_LOADER, iter_objects, load_objects
from kproxy.state import build_state
from kproxy.testing.builders import endpoint, endpoint_slice, node, service
from kproxy.testing.flows import SCENARIOS, Scenario


def _as_list(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": objects}


def test_the_c_loader_is_the_one_in_use() -> None:
    assert YAML_LOADER is yaml.CSafeLoader  # libyaml is installed here and in the images


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_c_and_pure_python_loaders_give_the_same_model(scenario: Scenario, tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(yaml.safe_dump(_as_list(scenario.objects)))
    fast = build_state(iter_objects([path], loader=yaml.CSafeLoader))
    pure = build_state(iter_objects([path], loader=yaml.SafeLoader))
    assert fast == pure
    assert fast[0].services  # every scenario has a Service


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_json_and_yaml_state_files_give_the_same_model(scenario: Scenario, tmp_path: Path) -> None:
    as_yaml, as_json = tmp_path / "state.yaml", tmp_path / "state.json"
    as_yaml.write_text(yaml.safe_dump_all(scenario.objects))  # several documents
    as_json.write_text(json.dumps(_as_list(scenario.objects)))  # `kubectl get -o json`
    assert build_state(iter_objects([as_json])) == build_state(iter_objects([as_yaml]))


def test_one_malformed_object_among_thousands_loses_only_itself(tmp_path: Path) -> None:
    objects: list[dict[str, Any]] = [node()]
    for i in range(2000):
        ip = f"172.30.{i // 250}.{i % 250 + 1}"
        objects.append(service(name=f"svc{i}", cluster_ip=ip))
        objects.append(endpoint_slice(f"svc{i}", endpoints=[endpoint(f"10.1.{i // 250}.{i % 250 + 1}", "node-1")]))
    objects[1001]["spec"]["ports"][0]["port"] = "eighty"  # one Service among 2,000
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_as_list(objects)))
    state, rejected = build_state(iter_objects([path]))
    assert len(state.services) == 1999 and len(state.slices) == 2000
    assert [str(e).split(":")[0] for e in rejected] == [f"Service ns1/{objects[1001]['metadata']['name']}"]


def test_list_items_are_handed_over_and_dropped(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(_as_list([service(name="a"), service(name="b", cluster_ip="172.30.0.42")])))
    seen = [obj["metadata"]["name"] for obj in iter_objects([path])]
    assert seen == ["a", "b"]  # in the file's order, kind filled in from the list
    assert [o["kind"] for o in load_objects([path])] == ["Service", "Service"]


def test_a_broken_json_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"kind": "List", "items": [')
    with pytest.raises(InputError, match="not JSON"):
        list(iter_objects([path]))


TRICKY_YAML = """\
apiVersion: v1
items:
- apiVersion: v1
  metadata: &meta
    name: a
    namespace: ns1
    labels: {app: web, "on": "yes"}
  spec:
    ports:
    - {port: 80, protocol: TCP, name: !!str 80}
    clusterIP: 172.30.0.1
    flags: [yes, no, on, off, ~, null, 0x1F, 1_000, 0o17, 1.5, .inf, 2001-12-14t21:59:43.10-05:00]
- metadata:
    <<: *meta
    name: b
  spec:
    quoted: "80"
    single: '00'
    block: |
      two
      lines
kind: ServiceList
metadata:
  resourceVersion: "42"
"""


def test_streamed_yaml_gives_what_pyyaml_gives(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(TRICKY_YAML)
    expected = yaml.load(TRICKY_YAML, Loader=yaml.SafeLoader)["items"]
    for item in expected:
        item["kind"] = "Service"  # filled in from the ServiceList, which comes after the items
    assert expected[1]["metadata"]["namespace"] == "ns1"  # the merge key did its work
    for loader in (yaml.CSafeLoader, yaml.SafeLoader):
        assert list(iter_objects([path], loader=loader)) == expected


def test_streamed_json_gives_what_the_json_module_gives(tmp_path: Path) -> None:
    doc = _as_list([service(name="a"), {"kind": "Node", "metadata": {"name": "n"}, "x": [1.5, None, True, "\u00e9"]}])
    for text in (json.dumps(doc), json.dumps(doc, indent=4), json.dumps(list(doc["items"]))):
        path = tmp_path / "state.json"
        path.write_text(text)
        assert list(iter_objects([path])) == doc["items"]


def test_a_list_is_handed_over_before_the_rest_of_the_file_is_read(tmp_path: Path) -> None:
    for name, text in (
        ("state.json", '{"kind": "List", "items": [{"kind": "Node", "metadata": {"name": "n"}}, {"kind": oops'),
        ("state.yaml", "kind: List\nitems:\n- kind: Node\n  metadata: {name: n}\n- kind: [oops\n"),
    ):
        path = tmp_path / name
        path.write_text(text)
        objects = iter_objects([path])
        assert next(objects)["metadata"]["name"] == "n"  # before the parser met the broken item
        with pytest.raises(InputError, match="not JSON" if name.endswith("json") else "not YAML"):
            next(objects)


def test_a_yaml_flow_mapping_is_not_taken_for_json(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("{kind: Node, metadata: {name: n}}\n")
    assert list(iter_objects([path])) == [{"kind": "Node", "metadata": {"name": "n"}}]
    saved_json = tmp_path / "saved.yaml"  # `kubectl get -o json > saved.yaml`
    saved_json.write_text(json.dumps(_as_list([node()])))
    assert [o["kind"] for o in iter_objects([saved_json])] == ["Node"]


def test_an_object_with_items_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("items:\n- {metadata: {name: a}}\nkind: Service\n")
    with pytest.raises(InputError, match="a Service with items is not a list"):
        list(iter_objects([path]))
