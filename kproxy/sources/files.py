"""Cluster state from YAML files, as `kubectl get ... -o yaml` prints them.

A path is a file or a directory of `*.yaml`/`*.yml`/`*.json` files; a file holds one object, a
`kind: List` (or `ServiceList`, ...), or several documents. A file that cannot be read or
parsed is an InputError (the whole input is unusable); a malformed object is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import InputError


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    if path.is_file():
        return [path]
    raise InputError(f"{path}: no such file or directory")


def _flatten(doc: Any, source: str) -> Iterator[dict[str, Any]]:
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise InputError(f"{source}: a document is not a Kubernetes object or list")
    kind = str(doc.get("kind", ""))
    if kind == "List" or (kind.endswith("List") and "items" in doc):
        item_kind = kind[: -len("List")] if kind != "List" else ""
        for item in doc.get("items") or []:
            if isinstance(item, Mapping) and item_kind and "kind" not in item:
                item = {**item, "kind": item_kind}
            yield from _flatten(item, source)
        return
    yield dict(doc)


def load_objects(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for raw in paths:
        for f in _files(Path(raw)):
            try:
                docs = list(yaml.safe_load_all(f.read_text()))
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{f}: cannot read: {e}") from e
            except yaml.YAMLError as e:
                raise InputError(f"{f}: not YAML: {e}") from e
            for doc in docs:
                objects.extend(_flatten(doc, str(f)))
    return objects
