"""Generate docs/configuration.md from kproxy.config's field and flag tables.

python tools/gen_config_reference.py            # rewrite docs/configuration.md
python tools/gen_config_reference.py --check    # exit 1 if it is out of date (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kproxy import config

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _show(value: Any) -> str:
    if value in (None, "", (), [], {}):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def render() -> str:
    flags_by_path: dict[str, list[str]] = {}
    for flag in config.FLAGS:
        if flag.path:
            flags_by_path.setdefault(flag.path, []).append(f"`--{flag.name}`")
    lines = [
        "# Configuration reference",
        "",
        "Generated from `kproxy/config.py` by `tools/gen_config_reference.py`; a test fails when it is out",
        "of date. `kproxy run` takes kube-proxy's flags and a `--config` file holding a",
        f"`{config.KIND}` (`{config.API_VERSION}`), or a kube-proxy ConfigMap as `kubectl get -o yaml`",
        "prints it. Settings kproxy does not act on are accepted and named in one `config_ignored`",
        "warning at start-up; invalid values stop start-up with a message naming the field or flag.",
        "",
        "## KubeProxyConfiguration fields",
        "",
        "| Field | Type | Default | Acted on | Flags |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(config.FIELDS):
        fld = config.FIELDS[path]
        lines.append(
            f"| `{path}` | {fld.kind} | {_show(fld.default)} | {'yes' if fld.acted else 'no'} | "
            f"{', '.join(flags_by_path.get(path, []))} |"
        )
    lines += [
        "",
        "## Flags outside the configuration file",
        "",
        "| Flag | Type | Default | Acted on | Meaning |",
        "|---|---|---|---|---|",
    ]
    for flag in sorted((f for f in config.FLAGS if not f.path), key=lambda f: f.name):
        lines.append(
            f"| `--{flag.name}` | {flag.kind} | {_show(flag.default)} | {'yes' if flag.acted else 'no'} | {flag.help} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
