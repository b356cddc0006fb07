"""Reading a KubeProxyConfiguration (or a kube-proxy ConfigMap) file, and writing one (--write-config-to)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kproxy.config.syntax import format_duration, parse_duration
from kproxy.config.table import API_VERSION, FIELDS, KIND, OBJECTS, Field
from kproxy.errors import ConfigError


def read_config_file(path: str, unknown: list[str]) -> list[tuple[str, Any, str]]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not YAML: {e}") from None
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        doc = _from_config_map(doc, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: not a KubeProxyConfiguration object")
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if kind != KIND or api_version != API_VERSION:
        raise ConfigError(f"--config {path}: apiVersion/kind is {api_version}/{kind}, expected {API_VERSION}/{KIND}")
    found: list[tuple[str, Any, str]] = []
    _walk(doc, "", path, found, unknown)
    return found


def _from_config_map(doc: dict[str, Any], path: str) -> Any:
    """A kube-proxy ConfigMap as `kubectl get -o yaml` prints it: its KubeProxyConfiguration key."""
    data = doc.get("data") or {}
    for key in ("config.conf", *sorted(data)):
        text = data.get(key)
        if isinstance(text, str) and KIND in text:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: data[{key}] is not YAML: {e}") from None
    raise ConfigError(f"--config {path}: the ConfigMap holds no {KIND}")


def _walk(obj: dict[str, Any], prefix: str, path: str, found: list[tuple[str, Any, str]], unknown: list[str]) -> None:
    for key, value in obj.items():
        full = f"{prefix}{key}"
        if not prefix and key in ("apiVersion", "kind"):
            continue
        fld = FIELDS.get(full)
        if fld is not None:
            where = f"{full} (in {path})"
            parsed = parse_file_value(fld, value, where)
            if parsed is not None:
                found.append((full, parsed, where))
        elif full in OBJECTS and isinstance(value, dict):
            _walk(value, f"{full}.", path, found, unknown)
        elif full in OBJECTS and value is None:
            continue
        else:
            unknown.append(full)


def dump_config(values: Mapping[str, Any]) -> str:
    """The effective configuration as a v1alpha1 KubeProxyConfiguration YAML document."""
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    for path, value in values.items():
        if path.startswith("kproxy.") or path in ("udpIdleTimeout", "resourceContainer"):
            continue
        fld = FIELDS[path]
        out = format_duration(value) if fld.kind == "duration" and value is not None else value
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = out
    return str(yaml.safe_dump(doc, sort_keys=True))


def parse_file_value(fld: Field, value: Any, where: str) -> Any:
    """The typed value, or None when the file leaves the default in place."""
    if value is None:
        return None
    parsed = typed_value(fld.kind, value, where)
    if fld.zero_is_default and not is_set(parsed) and fld.kind != "bool":
        return None  # upstream's v1alpha1 defaulting: a zero value means the default
    return parsed


def typed_value(kind: str, value: Any, where: str) -> Any:
    if kind == "any":
        return value
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} is not a string")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not true or false")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} is not a whole number")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {value!r} is not a number")
    if kind == "duration":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} is not a duration like '30s' or '1m30s'")
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if kind == "list":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: {value!r} is not a list of strings")
    if kind == "map":
        if isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{where}: {value!r} is not a map of names to true/false")
    raise AssertionError(kind)


def is_set(value: Any) -> bool:
    return value not in (None, "", 0, 0.0, False, [], {}, ())
