"""The data-plane modes the process benchmark runs, as parameters: the flags that select a mode and
backend, and how the kernel alone loads the text `kproxy sync --dry-run` prints (the floor).

A mode this build of kproxy does not have (`kproxy sync` exits 2 naming the modes it runs) is
recorded "not built"; one the host kernel cannot run (IPVS without ip_vs) "not available". Adding a
mode is one `ModeSpec` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModeSpec:
    name: str
    backends: tuple[str, ...]  # iptables backends, or ("",) for a mode that has none
    # The kernel's bare load of a dry run's text: (argv, stdin) per transaction.
    floor: Callable[[str, str], list[tuple[list[str], str]]]

    def column(self, backend: str) -> str:
        return f"{self.name} / {backend}" if backend else self.name

    def flags(self, backend: str) -> list[str]:
        """For `kproxy sync` and `kproxy run` alike (both take kube-proxy's flags)."""
        return [f"--proxy-mode={self.name}"] + ([f"--iptables-backend={backend}"] if backend else [])


def iptables_floor(text: str, backend: str) -> list[tuple[list[str], str]]:
    """One `iptables-restore --noflush` per family, of exactly the text kproxy would write: the
    dry run prints each family's input after a `# IPv4: ...`/`# IPv6: ...` header."""
    parts: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines(keepends=True):
        if line.startswith("# IPv4:") or line.startswith("# IPv6:"):
            current = parts.setdefault(line[2:6], [])
        elif current is not None:
            current.append(line)
    tool = {"IPv4": "iptables", "IPv6": "ip6tables"}
    return [([f"{tool[f]}-{backend}-restore", "--noflush"], "".join(lines)) for f, lines in parts.items() if lines]


def nft_floor(text: str, backend: str) -> list[tuple[list[str], str]]:
    """`nft -f -` of the whole script (its comment lines are nft comments too)."""
    return [(["nft", "-f", "-"], text)]


MODES: dict[str, ModeSpec] = {
    m.name: m
    for m in (
        ModeSpec("iptables", ("legacy", "nft"), iptables_floor),
        ModeSpec("nftables", ("",), nft_floor),
        ModeSpec("ipvs", ("",), iptables_floor),
    )
}
