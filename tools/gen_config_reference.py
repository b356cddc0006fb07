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
from kproxy.ingress import annotations

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _show(value: Any) -> str:
    if value in (None, "", (), [], {}):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def _acted(flag: config.Flag) -> str:
    if not flag.acted:
        return "no"
    return "yes, `run` only" if config.run_only(flag) else "yes"


def render() -> str:
    flags_by_path: dict[str, list[str]] = {}
    for flag in config.FLAGS:
        if flag.path:
            flags_by_path.setdefault(flag.path, []).append(f"`--{flag.name}`")
    lines = [
        "# Configuration reference",
        "",
        "Generated from `kproxy/config/table.py` by `tools/gen_config_reference.py`; a test fails when it is out",
        "of date. `kproxy run` takes kube-proxy's flags and a `--config` file holding a",
        f"`{config.KIND}` (`{config.API_VERSION}`), or a kube-proxy ConfigMap as `kubectl get -o yaml`",
        "prints it. Settings kproxy does not act on are accepted and named in one `config_ignored`",
        "warning at start-up; invalid values stop start-up with a message naming the field or flag.",
        "",
        "`kproxy sync` and `kproxy trace` take the same flags and `--config` file through the same",
        "code, with the same messages and exit status 2, plus their own options (`--node`, an alias of",
        "`--hostname-override` that they require, `--state`, `--dry-run`, ...). Settings marked",
        '"`run` only" are the daemon\'s (servers, periods, start-up sysctls, logging): sync and trace',
        "accept and validate them, and they have no effect there. sync and trace name what kproxy",
        "does not act on in one line on stderr, and refuse run's actions `--cleanup` and `--init-only`.",
        "",
        "`mode` is `iptables`, `ipvs` or `nftables`. A field marked with a mode is read in that mode",
        "only, and named in the warning when set in another one; `--sync-period` and",
        "`--min-sync-period` set the running mode's periods, whichever it is. The `iptables` section's",
        "masquerading settings apply in the iptables and IPVS modes; the nftables mode reads its own",
        "`nftables.masqueradeAll` and `nftables.masqueradeBit` (the flags win), as in kube-proxy.",
        "",
        "## KubeProxyConfiguration fields",
        "",
        "| Field | Type | Default | Acted on | Flags |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(config.FIELDS):
        fld = config.FIELDS[path]
        lines.append(
            f"| `{path}` | {fld.kind} | {_show(fld.default)} | {config.acted_on(path)} | "
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
        lines.append(f"| `--{flag.name}` | {flag.kind} | {_show(flag.default)} | {_acted(flag)} | {flag.help} |")
    return "\n".join(lines) + "\n"


def render_annotations() -> str:
    prefix = "nginx.ingress.kubernetes.io/"
    lines = [
        "# Ingress annotations",
        "",
        "Generated from `kproxy/ingress/annotations.py` by `tools/gen_config_reference.py`. kproxy uses",
        "ingress-nginx's annotation names. Every value is checked against a strict grammar; an invalid",
        "value is reported on the Ingress and ignored, except for the security-relevant ones (marked",
        "below), which fail closed: the Ingress answers 503 rather than serve a path unprotected.",
        "Snippet annotations are refused. See `docs/ingress.md` for how they render.",
        "",
        "## Supported",
        "",
        "| Annotation | Fails closed when invalid |",
        "|---|---|",
    ]
    for name in sorted(annotations.KNOWN_ANNOTATIONS):
        lines.append(f"| `{prefix}{name}` | {'yes' if annotations.security_relevant(name) else ''} |")
    lines += [
        "",
        "## Known but not supported (reported on the Ingress)",
        "",
        ", ".join(f"`{n}`" for n in sorted(annotations._UNSUPPORTED)),
    ]
    return "\n".join(lines) + "\n"


PAGES = {"configuration.md": render, "ingress-annotations.md": render_annotations}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for name, fn in PAGES.items():
        out, text = DOCS / name, fn()
        if args.check:
            if not out.exists() or out.read_text() != text:
                stale.append(str(out))
        else:
            out.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}: run python tools/gen_config_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
