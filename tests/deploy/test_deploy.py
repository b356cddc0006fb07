"""The deployment artefacts (daemonset/, Dockerfile, vagrant/) checked against the code.

No root, no cluster, no network. What is derived from the code rather than restated:
- the RBAC rules: the `Resource` definitions of kproxy/sources/kube.py, the ones each program
  watches (kproxy/daemon/daemon.py; kproxy/ingress/controller.py; kproxy/hostport/syncer.py and
  cli_ingress.py), and the API calls of kproxy/sources/kube_write.py, must equal the rules of
  each ClusterRole exactly (nothing missing, nothing extra);
- the KubeProxyConfiguration: loaded with kproxy's own loader, and the DaemonSet's command line
  parsed by `kproxy run` itself (--write-config-to: nothing touches the kernel);
- the binaries: every program kproxy's backends run must come from a Debian package the
  Dockerfile installs (found with dpkg -S on this machine, where `make deps` installed them).
External tools are used when present, else the test says why it is skipped: `kubectl
kustomize`, `shellcheck`, `vagrant validate`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kproxy.backends.iptables import _binary
from kproxy.backends.nftables import Nft
from kproxy.cli.ingress import controller as ingress_controller_cmd
from kproxy.cli.ingress import hostports as hostports_cmd
from kproxy.cli.run import run as run_cmd
from kproxy.config import HEALTHZ_PORT, load_run_config
from kproxy.ingress.convert import DEFAULT_CONTROLLER
from kproxy.model import IPFamily

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
VAGRANT = ROOT / "vagrant"
# Components (kind: Component) are not built alone; the overlays that use them are.
KUSTOMIZATIONS = sorted(
    p.parent for p in DAEMONSET.rglob("kustomization.yaml") if yaml.safe_load(p.read_text())["kind"] == "Kustomization"
)
OVERLAYS = {p.name: p for p in sorted((DAEMONSET / "overlays").iterdir()) if p.is_dir()}

Obj = dict[str, Any]


def _yaml_files() -> list[Path]:
    return sorted([*DAEMONSET.rglob("*.yaml"), *VAGRANT.rglob("*.yaml")])


def _docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# -- rendering ---------------------------------------------------------------------------------


def _kustomization(directory: Path) -> Obj:
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def _render_py(directory: Path, seen: tuple[Path, ...] = ()) -> list[Obj]:
    """A small stand-in for kustomize: resources, strategic-merge patches by kind/name, images.

    Enough for what daemonset/ uses; `kubectl kustomize` (when installed) is the real check.
    """
    directory = directory.resolve()
    assert directory not in seen, f"kustomization cycle through {_rel(directory)}"
    k = _kustomization(directory)
    objects: list[Obj] = []
    for res in k.get("resources", []):
        target = (directory / res).resolve()
        assert target.exists(), f"{_rel(directory)}/kustomization.yaml: resource {res} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{res}: a directory without kustomization.yaml"
            # kustomize refuses a base that contains the overlay referencing it.
            assert not directory.is_relative_to(target), f"{_rel(directory)}: base {res} contains this overlay"
            objects += _render_py(target, (*seen, directory))
        else:
            objects += _docs(target)
    for component in k.get("components", []):
        target = (directory / component).resolve()
        assert _kustomization(target)["kind"] == "Component", f"{_rel(directory)}: {component} is no Component"
        for res in _kustomization(target).get("resources", []):
            objects += _docs(target / res)
        _patch(objects, target, _kustomization(target))
    _patch(objects, directory, k)
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Namespace", "IngressClass", "GatewayClass"):
                o["metadata"]["namespace"] = k["namespace"]
    images = {i["name"]: i for i in k.get("images", [])}
    for container in _containers(objects):
        image = images.get(container["image"].split(":")[0])
        if image is not None:
            container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def _patch(objects: list[Obj], directory: Path, k: Obj) -> None:
    for patch in k.get("patches", []):
        if "target" in patch:  # an inline JSON 6902 patch: the "add" operations daemonset/ uses
            t = patch["target"]
            matches = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (t["kind"], t["name"])]
            assert len(matches) == 1, f"{_rel(directory)}: targets no single {t['kind']}/{t['name']}"
            for op in yaml.safe_load(patch["patch"]):
                assert op["op"] == "add", f"{_rel(directory)}: only add is rendered here"
                *parents, last = op["path"].strip("/").split("/")
                node: Any = matches[0]
                for part in parents:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                if last == "-":
                    node.append(op["value"])
                elif isinstance(node, list):
                    node.insert(int(last), op["value"])
                else:
                    node[last] = op["value"]
            continue
        path = directory / patch["path"]
        assert path.exists(), f"{_rel(directory)}: patch {patch['path']} does not exist"
        for p in _docs(path):
            matches = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (p["kind"], p["metadata"]["name"])]
            assert len(matches) == 1, f"{_rel(path)}: patches no single {p['kind']}/{p['metadata']['name']}"
            _merge(matches[0], p)


def _merge(into: Obj, patch: Obj) -> None:
    """Strategic merge for maps, and for lists of maps keyed by `name` (containers)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            current = into.setdefault(key, [])
            for item in value:
                same = [c for c in current if c.get("name") == item["name"]]
                if same:
                    _merge(same[0], item)
                else:
                    current.append(item)
        else:
            into[key] = value


def _containers(objects: list[Obj]) -> Iterator[Obj]:
    for o in objects:
        if o["kind"] in ("DaemonSet", "Deployment"):
            yield from o["spec"]["template"]["spec"]["containers"]


def _render(directory: Path) -> list[Obj]:
    return _render_py(directory)


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _config_text(objects: list[Obj]) -> str:
    text = _one(objects, "ConfigMap", "kproxy")["data"]["config.conf"]
    assert isinstance(text, str)
    return text


# -- YAML and kustomize ------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_every_yaml_file_parses_into_kubernetes_objects(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{_rel(path)} is empty"
    for d in docs:
        assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{_rel(path)}: {str(d)[:80]}"
        if d["kind"] not in ("Kustomization", "Component"):
            assert d.get("metadata", {}).get("name"), f"{_rel(path)}: a {d['kind']} without a name"


MODE_COMPONENTS = ("ipvs", "nftables")


def _mode_of(variant: str) -> str:
    """The mode an overlay (or the base) runs: its mode component's, else iptables."""
    return next((m for m in MODE_COMPONENTS if variant.endswith(m)), "iptables")


def test_the_layout_is_a_base_overlays_and_the_mode_components() -> None:
    assert _kustomization(DAEMONSET)["resources"] == ["base"]
    assert set(OVERLAYS) == {
        "iptables",
        "ipvs",
        "nftables",
        "ingress",
        "ingress-ipvs",
        "ingress-nftables",
        "ingress-gateway",
    }
    assert {p.name for p in (DAEMONSET / "components").iterdir()} == {*MODE_COMPONENTS, "gateway-api"}
    for name, overlay in OVERLAYS.items():
        k = _kustomization(overlay)
        assert k["resources"][0] == ("../ingress" if name.startswith("ingress-") else "../../base")
        for mode in MODE_COMPONENTS:
            assert (f"../../components/{mode}" in k.get("components", [])) == name.endswith(mode)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_kustomizations_reference_existing_files_and_render(directory: Path) -> None:
    objects = _render(directory)
    keys = [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "an object is defined twice"
    listed = {(directory / r).resolve() for r in _kustomization(directory).get("resources", [])}
    listed |= {(directory / p["path"]).resolve() for p in _kustomization(directory).get("patches", []) if "path" in p}
    unused = [p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in listed]
    assert not unused, f"YAML files no kustomization uses: {unused}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (not a Debian package)")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_kubectl_kustomize_renders_what_the_python_renderer_renders(directory: Path) -> None:
    res = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    real = [d for d in yaml.safe_load_all(res.stdout) if d]
    ours = _render(directory)

    def key(o: Obj) -> tuple[str, str, str]:
        return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    assert sorted(map(key, real)) == sorted(map(key, ours))
    by_key = {key(o): o for o in real}
    for o in ours:
        if o["kind"] == "ConfigMap":
            assert by_key[key(o)]["data"] == o["data"]
        if o["kind"] in ("DaemonSet", "Deployment"):
            got = by_key[key(o)]["spec"]["template"]["spec"]["containers"]
            want = o["spec"]["template"]["spec"]["containers"]
            assert [(c["image"], c.get("command"), c.get("securityContext")) for c in got] == [
                (c["image"], c.get("command"), c.get("securityContext")) for c in want
            ]


# -- RBAC, derived from the code ---------------------------------------------------------------

API_GROUPS = {"CoreV1Api": "", "DiscoveryV1Api": "discovery.k8s.io", "NetworkingV1Api": "networking.k8s.io"}
WRITE_VERBS = {"create": "create", "patch": "patch", "replace": "update", "delete": "delete"}


def _source(rel: str) -> str:
    return (ROOT / rel).read_text()


GATEWAY_GROUP = "gateway.networking.k8s.io"


def _group_of(path: str) -> str:
    """The API group of a collection path: /api/v1/... is the core group, /apis/GROUP/V/..."""
    parts = path.strip("/").split("/")
    return "" if parts[0] == "api" else parts[1]


def _resources() -> dict[str, tuple[str, str]]:
    """CONSTANT -> (API group, plural) from the Resource definitions of kproxy/sources/kube.py
    (the Gateway API ones through its `_gateway_api` helper)."""
    src = _source("kproxy/sources/kube.py")
    found = re.findall(r'^([A-Z_]+) = Resource\(\s*"(\w+)",\s*"(/[\w./-]+)"', src, re.M)
    assert len(found) >= 7, "the Resource definitions of kproxy/sources/kube.py changed shape"
    out = {const: (_group_of(path), plural) for const, plural, path in found}
    gateway = re.findall(r'^([A-Z_]+) = _gateway_api\(\s*"(\w+)"', src, re.M)
    assert len(gateway) == 4, "the Gateway API Resource definitions of kproxy/sources/kube.py changed shape"
    out.update({const: (GATEWAY_GROUP, plural) for const, plural in gateway})
    return out


def _watched(*files: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for list+watch of every Resource constant the files' code names."""
    resources = _resources()
    rules = set()
    for rel in files:
        code = "\n".join(line for line in _source(rel).splitlines() if not line.lstrip().startswith("#"))
        for const in set(re.findall(r"\b[A-Z_]+\b", code)) & set(resources):
            group, plural = resources[const]
            rules |= {(group, plural, "list"), (group, plural, "watch")}
    return rules


def _writes() -> dict[str, set[tuple[str, str, str]]]:
    """ApiWriter method -> the (group, resource, verb) its API calls need (kube_write.py)."""
    src = _source("kproxy/sources/kube_write.py")
    apis = dict(re.findall(r"self\.(_\w+) = k8s\.(\w+)\(", src))
    out: dict[str, set[tuple[str, str, str]]] = {}
    for m in re.finditer(r"\n    def (\w+)\((.*?)(?=\n    def |\n\S|\Z)", src, re.S):
        method, body = m.group(1), m.group(2)
        for attr, call in re.findall(r"self\.(_\w+)\.(\w+)\(", body):
            if apis.get(attr) not in API_GROUPS:
                continue  # the ApiClient itself (close)
            verb, _, rest = call.partition("_")
            rest = rest.removeprefix("namespaced_")
            noun, _, sub = rest.partition("_")
            plural = noun + ("es" if noun.endswith("s") else "s")
            out.setdefault(method, set()).add(
                (API_GROUPS[apis[attr]], f"{plural}/{sub}" if sub else plural, WRITE_VERBS[verb])
            )
    assert out.get("patch_ingress_status") and out.get("event"), f"kube_write.py changed shape: {out}"
    return out


def _writes_of(*files: str) -> set[tuple[str, str, str]]:
    """What the files write through ApiWriter: named methods, and `event` through a Recorder;
    `patch_gateway_status` (custom objects, the plural an argument) patches the status of the
    plurals its caller maps kinds to."""
    writes = _writes()
    code = "\n".join(_source(f) for f in files)
    needed: set[tuple[str, str, str]] = set()
    for method, rules in writes.items():
        if re.search(rf"\.{method}\(", code) or (method == "event" and "Recorder(" in code):
            needed |= rules
    src = _source("kproxy/sources/kube_write.py")
    assert "def patch_gateway_status" in src and "patch_namespaced_custom_object_status" in src
    if ".patch_gateway_status(" in code:
        mapping = re.search(r"plurals = \{([^}]*)\}", code)
        assert mapping, "the kind → plural map of the Gateway API status writes changed shape"
        plurals = re.findall(r'"\w+": "(\w+)"', mapping.group(1))
        assert plurals
        needed |= {(GATEWAY_GROUP, f"{p}/status", "patch") for p in plurals}
    return needed


def _granted(objects: list[Obj], role: str) -> set[tuple[str, str, str]]:
    granted = set()
    for rule in _one(objects, "ClusterRole", role)["rules"]:
        assert not rule.get("resourceNames") and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, res, verb), f"{role}: wildcard in {rule}"
                    granted.add((group, res, verb))
    return granted


def _bound(objects: list[Obj], role: str, account: str, namespace: str) -> None:
    bindings = [o for o in objects if o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == role]
    assert len(bindings) == 1
    assert bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    _one(objects, "ServiceAccount", account)


def test_kproxy_run_role_is_exactly_what_the_daemon_lists_and_watches() -> None:
    objects = _render(DAEMONSET)
    expected = _watched("kproxy/daemon/daemon.py") | _writes_of("kproxy/daemon/daemon.py", "kproxy/cli/run.py")
    assert expected == {
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
    }, "kproxy run reads or writes something new: update daemonset/base/rbac.yaml and this set"
    assert _granted(objects, "kproxy") == expected
    _bound(objects, "kproxy", "kproxy", "kube-system")
    ds = _one(objects, "DaemonSet", "kproxy")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "kproxy"


def _gateway_only() -> set[tuple[str, str, str]]:
    """What the controller uses only with --gateway-api: what the import inside that branch lists,
    and the Gateway API status writes."""
    line = next(x for x in _source("kproxy/ingress/controller.py").splitlines() if "GATEWAY_CLASSES" in x)
    resources = _resources()
    out = set()
    for const in set(re.findall(r"\b[A-Z_]+\b", line)) & set(resources):
        group, plural = resources[const]
        out |= {(group, plural, "list"), (group, plural, "watch")}
    return out | {r for r in _writes_of("kproxy/ingress/controller.py") if r[0] == GATEWAY_GROUP}


def _granted_to(objects: list[Obj], account: str) -> set[tuple[str, str, str]]:
    """Everything the ClusterRoles bound to a ServiceAccount grant it."""
    roles = [
        b["roleRef"]["name"]
        for b in objects
        if b["kind"] == "ClusterRoleBinding" and any(s["name"] == account for s in b["subjects"])
    ]
    return set().union(*(_granted(objects, r) for r in roles))


def test_ingress_controller_role_is_exactly_what_the_controller_uses() -> None:
    """overlays/ingress runs without --gateway-api: its role grants nothing Gateway API."""
    objects = _render(OVERLAYS["ingress"])
    expected = _watched("kproxy/ingress/controller.py") | _writes_of("kproxy/ingress/controller.py")
    assert _gateway_only() <= expected
    expected -= _gateway_only()
    assert ("networking.k8s.io", "ingresses/status", "patch") in expected
    assert ("", "events", "create") in expected
    assert not any(res == "pods" for _, res, _ in expected), "the controller does not watch pods"
    assert "--gateway-api" not in _container(objects, "DaemonSet", "kproxy-ingress")["command"]
    assert _granted(objects, "kproxy-ingress") == expected
    assert _granted_to(objects, "kproxy-ingress") == expected
    _bound(objects, "kproxy-ingress", "kproxy-ingress", "kproxy-ingress")


def test_gateway_overlay_grants_exactly_what_the_controller_uses_with_gateway_api() -> None:
    """overlays/ingress-gateway runs --gateway-api: every resource the controller reads or writes
    then, the Gateway API ones included, and nothing more."""
    objects = _render(OVERLAYS["ingress-gateway"])
    expected = _watched("kproxy/ingress/controller.py") | _writes_of("kproxy/ingress/controller.py")
    gateway = _gateway_only()
    for plural in ("gatewayclasses", "gateways", "httproutes", "referencegrants"):
        assert (GATEWAY_GROUP, plural, "watch") in gateway
    for plural in ("gatewayclasses", "gateways", "httproutes"):
        assert (GATEWAY_GROUP, f"{plural}/status", "patch") in gateway
    assert ("", "namespaces", "watch") in gateway
    assert "--gateway-api" in _container(objects, "DaemonSet", "kproxy-ingress")["command"]
    assert _granted_to(objects, "kproxy-ingress") == expected
    _bound(objects, "kproxy-ingress-gateway-api", "kproxy-ingress", "kproxy-ingress")
    gc = _one(objects, "GatewayClass", "kproxy")
    params = ingress_controller_cmd.make_context("c", ["--gateway-api"]).params
    assert gc["spec"]["controllerName"] == params["gateway_controller_name"]


def test_hostports_role_is_exactly_what_the_hostport_daemon_uses() -> None:
    objects = _render(OVERLAYS["ingress"])
    code = _source("kproxy/cli/ingress.py")
    daemon_part = code[code.index("def _hostports_daemon") :]
    hostport_py = _source("kproxy/hostport/syncer.py")
    watched = _watched("kproxy/hostport/syncer.py")
    writes = _writes_of("kproxy/hostport/syncer.py") if "Recorder(" in daemon_part else set()
    expected = watched | writes
    assert "Recorder(writer)" in daemon_part and "HostPortDaemon" in hostport_py
    assert expected == {
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "events", "create"),
    }
    assert _granted(objects, "kproxy-hostports") == expected
    _bound(objects, "kproxy-hostports", "kproxy-hostports", "kproxy-ingress")


# -- the KubeProxyConfiguration and the command line -------------------------------------------


def _container(objects: list[Obj], kind: str, name: str) -> Obj:
    containers = _one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Obj = containers[0]
    return c


@pytest.mark.parametrize(
    "variant", ["base", "iptables", "ipvs", "nftables", "ingress", "ingress-ipvs", "ingress-nftables"]
)
def test_the_configmap_loads_with_kproxys_config_loader(variant: str, tmp_path: Path) -> None:
    objects = _render(DAEMONSET if variant == "base" else OVERLAYS[variant])
    conf = tmp_path / "config.conf"
    conf.write_text(_config_text(objects))
    loaded = load_run_config({"config": str(conf), "hostname-override": "node-1"})
    cfg = loaded.config
    assert loaded.unknown == () and loaded.ignored == ()
    assert cfg.proxy.mode == _mode_of(variant)
    assert cfg.proxy.node_name == "node-1"
    assert cfg.proxy.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.healthz_bind_address == f"0.0.0.0:{HEALTHZ_PORT}"
    assert cfg.kubeconfig == ""  # in-cluster: the ServiceAccount token


@pytest.mark.parametrize("variant", ["ipvs", "ingress-ipvs"])
def test_the_ipvs_overlays_may_load_ip_vs(variant: str) -> None:
    """The IPVS backend runs `modprobe ip_vs` when the module is not loaded yet."""
    objects = _render(OVERLAYS[variant])
    caps = _container(objects, "DaemonSet", "kproxy")["securityContext"]["capabilities"]["add"]
    assert "SYS_MODULE" in caps
    volumes = _one(objects, "DaemonSet", "kproxy")["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("hostPath", {}).get("path") == "/lib/modules" for v in volumes)


@pytest.mark.parametrize("variant", ["nftables", "ingress-nftables"])
def test_the_nftables_overlays_configure_kube_proxys_nftables_section(variant: str, tmp_path: Path) -> None:
    """`mode: nftables` with kube-proxy's `nftables` fields, read from there (not from the
    `iptables` section, which this mode does not read), and the container that `nft -f -` needs:
    NET_ADMIN and no extra capability (the nftables package is checked with the Dockerfile)."""
    objects = _render(OVERLAYS[variant])
    doc = yaml.safe_load(_config_text(objects))
    assert set(doc["nftables"]) == {"masqueradeAll", "masqueradeBit", "syncPeriod", "minSyncPeriod"}
    assert "iptables" not in doc and "ipvs" not in doc
    # The periods this mode runs with are the section's: change one and see it.
    assert doc["nftables"]["syncPeriod"] == "30s"
    conf = tmp_path / "config.conf"
    conf.write_text(_config_text(objects).replace("syncPeriod: 30s", "syncPeriod: 17s"))
    cfg = load_run_config({"config": str(conf), "hostname-override": "node-1"}).config
    assert cfg.proxy.mode == "nftables"
    assert cfg.proxy.sync_period == 17.0
    assert cfg.proxy.masquerade_bit == doc["nftables"]["masqueradeBit"]
    assert cfg.proxy.masquerade_all is doc["nftables"]["masqueradeAll"]
    sc = _container(objects, "DaemonSet", "kproxy")["securityContext"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert sc["privileged"] is True  # conntrack sysctls, as the base


@pytest.mark.parametrize("variant", ["base", "iptables", "ipvs", "ingress-ipvs", "nftables", "ingress-nftables"])
def test_kproxy_run_accepts_the_daemonsets_exact_command_line(variant: str, tmp_path: Path) -> None:
    objects = _render(DAEMONSET if variant == "base" else OVERLAYS[variant])
    container = _container(objects, "DaemonSet", "kproxy")
    command = container["command"]
    assert command[:2] == ["kproxy", "run"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    conf = tmp_path / "config.conf"
    conf.write_text(_config_text(objects))
    args = [
        a.replace(f"{mount['mountPath']}/config.conf", str(conf)).replace("$(NODE_NAME)", "node-1") for a in command[2:]
    ]
    assert args != command[2:], "the command names neither the mounted config nor $(NODE_NAME)"
    out = tmp_path / "effective.yaml"
    res = CliRunner().invoke(run_cmd, [*args, f"--write-config-to={out}"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    effective = yaml.safe_load(out.read_text())
    assert effective["hostnameOverride"] == "node-1"
    assert effective["mode"] == _mode_of(variant)


def test_the_ingress_commands_parse_with_kproxys_own_options() -> None:
    objects = _render(OVERLAYS["ingress"])
    for name, cmd, prefix in (
        ("kproxy-ingress", ingress_controller_cmd, ["kproxy", "ingress", "controller"]),
        ("kproxy-hostports", hostports_cmd, ["kproxy", "ingress", "hostports"]),
    ):
        command = _container(objects, "DaemonSet", name)["command"]
        assert command[:3] == prefix
        args = [a.replace("$(NODE_NAME)", "edge-1") for a in command[3:]]
        ctx = cmd.make_context(name, args)  # parses and validates every option, runs nothing
        params = ctx.params
        if name == "kproxy-ingress":
            assert params["controller_class"] == DEFAULT_CONTROLLER
            assert params["http_port"] == 80 and params["https_port"] == 443
            assert params["node_name"] == "edge-1"
        else:
            assert params["watch"] and params["node_name"] == "edge-1"


# -- the DaemonSets ----------------------------------------------------------------------------


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_kproxy_daemonset_is_what_a_node_proxy_needs() -> None:
    objects = _render(DAEMONSET)
    ds = _one(objects, "DaemonSet", "kproxy")
    spec = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "kube-system"
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    update = ds["spec"]["updateStrategy"]
    assert update["type"] == "RollingUpdate"
    assert update["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    c = _container(objects, "DaemonSet", "kproxy")
    assert c["command"] == [
        "kproxy",
        "run",
        "--config=/var/lib/kproxy/config.conf",
        "--hostname-override=$(NODE_NAME)",
    ]
    assert _env(c)["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": HEALTHZ_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": HEALTHZ_PORT}
    sc = c["securityContext"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert sc["privileged"] is True  # /proc/sys is read-only otherwise; see the comment there
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["xtables-lock"]["mountPath"] == "/run/xtables.lock"
    assert volumes["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["lib-modules"] == {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True}
    assert volumes["lib-modules"]["hostPath"]["path"] == "/lib/modules"
    assert volumes["config"]["configMap"]["name"] == "kproxy"
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        ref = _env(c)[var]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "kproxy-apiserver" and ref["optional"] is True


def test_the_ingress_overlay_runs_on_edge_nodes_with_hostports() -> None:
    objects = _render(OVERLAYS["ingress"])
    assert _one(objects, "IngressClass", "kproxy")["spec"]["controller"] == DEFAULT_CONTROLLER
    for name in ("kproxy-ingress", "kproxy-hostports"):
        spec = _one(objects, "DaemonSet", name)["spec"]["template"]["spec"]
        assert spec["nodeSelector"]["node-role.kubernetes.io/edge"] == ""
        assert spec["serviceAccountName"] == name
    ctl = _container(objects, "DaemonSet", "kproxy-ingress")
    host_ports = {p["hostPort"]: p["containerPort"] for p in ctl["ports"] if "hostPort" in p}
    assert host_ports == {80: 80, 443: 443}
    metrics = next(a for a in ctl["command"] if a.startswith("--metrics-bind-address="))
    port = int(metrics.rsplit(":", 1)[1])
    assert not metrics.split("=", 1)[1].startswith("127."), "the kubelet probes the pod's address"
    assert ctl["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert ctl["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}
    assert not ctl["securityContext"].get("privileged")
    hp_spec = _one(objects, "DaemonSet", "kproxy-hostports")["spec"]["template"]["spec"]
    assert hp_spec["hostNetwork"] is True
    # The default backend: a Service behind an Ingress of our class with only a defaultBackend.
    ing = _one(objects, "Ingress", "default-backend")
    assert ing["spec"]["ingressClassName"] == "kproxy" and "rules" not in ing["spec"]
    svc = ing["spec"]["defaultBackend"]["service"]["name"]
    assert _one(objects, "Service", svc)["metadata"]["namespace"] == ing["metadata"]["namespace"]


# -- the Dockerfile ----------------------------------------------------------------------------


def _stages() -> dict[str, tuple[str, set[str]]]:
    """Stage name -> (parent image or stage, packages its apt-get install lines add)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str, set[str]]] = {}
    current = ""
    for line in text.splitlines():
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line.strip(), re.I)
        if m:
            current = m.group(2)
            stages[current] = (m.group(1), set())
            continue
        for install in re.findall(r"apt-get install ([^&;]*)", line):
            stages[current][1].update(w for w in install.split() if not w.startswith("-"))
    return stages


def _packages(stage: str) -> set[str]:
    stages = _stages()
    parent, pkgs = stages[stage]
    return pkgs | (_packages(parent) if parent in stages else set())


def _binaries_run_by_backends() -> set[str]:
    """Every program kproxy/backends starts: literal argv[0]s, the iptables names built by
    `_binary` (both families, both backends, plain/save/restore), and `Nft`'s binary."""
    found = set()
    for path in (ROOT / "kproxy" / "backends").glob("*.py"):
        src = path.read_text()
        found |= set(re.findall(r'(?:argv\s*=\s*|_run\(|subprocess\.(?:run|Popen)\()\[\s*"([\w.-]+)"', src))
    found |= {_binary(f, v, t) for f in IPFamily for v in ("nft", "legacy") for t in ("", "save", "restore")}
    found.add(Nft().binary)  # argv[0] is an attribute there: `nft -f -` (the nftables mode)
    return found


def _debian_packages(binaries: set[str]) -> dict[str, str]:
    """binary -> the package shipping it on this machine, with one `dpkg -S` call (merged /usr:
    dpkg knows some as /sbin/x). Binaries not installed here are left out."""
    if shutil.which("dpkg") is None:
        return {}
    paths: dict[str, str] = {}
    for b in binaries:
        path = shutil.which(b)
        if path is not None:
            paths[path] = b
            paths[re.sub(r"^/usr/", "/", path)] = b
    if not paths:
        return {}
    res = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True, timeout=120, check=False)
    found = {}
    for line in res.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        if path in paths:
            found[paths[path]] = pkg.split(":")[0].split(",")[0]
    return found


# Used only where dpkg cannot answer (the binary is not installed on this machine).
FALLBACK_PACKAGES = {"ipset": "ipset", "conntrack": "conntrack", "modprobe": "kmod", "nginx": "nginx"}


def _provided_by(stages: dict[str, set[str]]) -> dict[str, set[str]]:
    """Per stage, its packages and their direct dependencies (nginx-light depends on nginx,
    which ships the binary); one `apt-cache depends` over apt's local cache, no network."""
    out = {stage: set(pkgs) for stage, pkgs in stages.items()}
    if shutil.which("apt-cache") is None:
        return out
    every = sorted(set().union(*stages.values()))
    res = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", *every],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    depends: dict[str, set[str]] = {}
    current = ""
    for line in res.stdout.splitlines():
        if not line.startswith(" "):
            current = line.strip()
            continue
        m = re.match(r"\s+\|?Depends: <?([\w.+-]+)", line)
        if m:
            depends.setdefault(current, set()).add(m.group(1))
    for stage, pkgs in stages.items():
        for pkg in pkgs:
            out[stage] |= depends.get(pkg, set())
    return out


def test_every_binary_kproxy_runs_is_installed_by_the_dockerfile() -> None:
    stages = _stages()
    assert {"build", "kproxy", "ingress"} <= set(stages)
    assert stages["ingress"][0] == "kproxy"
    binaries = _binaries_run_by_backends()
    assert {"ipset", "conntrack", "modprobe", "nft", "iptables-nft-restore", "ip6tables-legacy-save"} <= binaries
    nginx_default = ingress_controller_cmd.params[[p.name for p in ingress_controller_cmd.params].index("nginx_binary")]
    assert nginx_default.default == "/usr/sbin/nginx"
    checks = [(b, "kproxy") for b in sorted(binaries)] + [("nginx", "ingress")]
    known = _debian_packages({b for b, _ in checks})
    provided = _provided_by({stage: _packages(stage) for stage in ("kproxy", "ingress")})
    missing = []
    for binary, stage in checks:
        pkg = known.get(binary) or FALLBACK_PACKAGES.get(binary) or binary.split("-")[0].replace("ip6", "ip")
        if pkg not in provided[stage]:
            missing.append(f"{binary} (package {pkg}) in stage {stage}")
    assert not missing, f"not installed by the Dockerfile: {missing}"
    # The debugging tools the issue asks for, and the interpreter the venv links to.
    assert {"python3", "nftables", "ipvsadm", "iproute2"} <= _packages("kproxy")
    assert "nginx-light" in _packages("ingress")


def test_the_dockerfile_installs_kproxy_from_what_the_context_sends() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M)
    sources = {s for line in copied for s in line.split()}
    assert sources == {"pyproject.toml", "README.md", "kproxy"}
    for s in sources:
        assert (ROOT / s).exists()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1:2] == ["*"] or "*" in ignore
    for s in sources:
        assert f"!{s}" in ignore or f"!{s}/" in ignore, f".dockerignore drops {s}"
    assert "DEBIAN_FRONTEND=noninteractive" in text
    assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
    assert re.search(r"ENV PATH=/opt/kproxy/bin:", text)
    version = re.search(r'^version = "(.+)"', _source("pyproject.toml"), re.M)
    assert version is not None
    for k in (DAEMONSET / "base", OVERLAYS["ingress"]):
        tags = {i["newTag"] for i in _kustomization(k).get("images", [])}
        assert tags == {version.group(1)}, f"{_rel(k)}: image tags differ from pyproject's version"


# -- vagrant/ ----------------------------------------------------------------------------------


def _shell_scripts() -> list[Path]:
    return sorted(VAGRANT.glob("*.sh"))


def test_the_lab_skips_kube_proxy_and_deploys_from_daemonset() -> None:
    vagrantfile = (VAGRANT / "Vagrantfile").read_text()
    for script in re.findall(r'path: "([\w.-]+)"', vagrantfile):
        assert (VAGRANT / script).exists(), f"Vagrantfile names a missing {script}"
    assert ":libvirt" in vagrantfile and ":virtualbox" in vagrantfile
    assert len(re.findall(r'role: "(?:control-plane|worker|edge)"', vagrantfile)) == 3
    assert "--skip-phases=addon/kube-proxy" in (VAGRANT / "provision-control-plane.sh").read_text()
    deploy = (VAGRANT / "deploy.sh").read_text()
    applied = re.findall(r'kubectl apply -k "\$\{repo\}/([^"]+)"', deploy)
    assert applied == ["daemonset/overlays/${overlay}"]
    overlays = re.findall(r"^\s+(\w+)\) overlay=([\w-]+) ;;$", deploy, re.M)
    assert dict(overlays) == {"iptables": "ingress", "ipvs": "ingress-ipvs", "nftables": "ingress-nftables"}
    modes = re.search(r"%w\[([\w ]+)\]\.include\?\(MODE\)", vagrantfile)
    assert modes is not None and set(modes.group(1).split()) == set(dict(overlays)), "KPROXY_MODE's values"
    assert all((OVERLAYS[o] / "kustomization.yaml").exists() for _, o in overlays)
    assert 'ENV.fetch("KPROXY_MODE", "iptables")' in vagrantfile
    assert "node-role.kubernetes.io/edge=" in deploy
    smoke = (VAGRANT / "smoke.sh").read_text()
    for what in ("ClusterIP", "NodePort", "Ingress"):
        assert f'retry "{what}' in smoke


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_shellcheck_is_clean_on_the_lab_scripts() -> None:
    scripts = _shell_scripts()
    assert scripts
    res = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (apt-get install vagrant)")
def test_vagrant_validate(tmp_path: Path) -> None:
    """`--ignore-provider`: neither libvirt nor VirtualBox is installed on a test machine, and
    without one `vagrant validate` stops at "no usable provider" before reading the file."""
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    res = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=VAGRANT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
