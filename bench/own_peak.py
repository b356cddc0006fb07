"""`python own_peak.py MODULE ARGS...`: `python -m MODULE ARGS...` in this very process, and, as it
exits, its own peak RSS and its largest child's written to $OWN_PEAK_REPORT (JSON).

The peak that `wait4` (and `/usr/bin/time`) gives for a process is the larger of its own and its
children's: `kproxy sync` on the nf_tables backend reported `iptables-nft-restore`'s, a child
holding the whole transaction, not kproxy's. Issue 12 compares kproxy's memory with upstream
kube-proxy's (its daemon's RSS, without its iptables-restore children), so the benchmark keeps
the two apart: `RUSAGE_SELF` and `RUSAGE_CHILDREN` read in an exit handler, which `kproxy`'s
entry runs before it ends the process.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys


def _report(path: str) -> None:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(path, "w") as f:
        json.dump({"own_mib": own / 1024, "children_mib": children / 1024}, f)


def main() -> None:
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    path = os.environ.pop("OWN_PEAK_REPORT", "")
    if path:
        atexit.register(_report, path)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
