"""Attributes of the kproxy process itself."""

from __future__ import annotations

import os
from pathlib import Path

from kproxy.errors import BackendError


def set_oom_score_adj(value: int) -> None:
    """As kube-proxy's --oom-score-adj: make the OOM killer spare (negative) or prefer this process."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(value))
    except OSError as e:
        raise BackendError(f"cannot set oom_score_adj={value}: {os.strerror(e.errno or 0)}") from e
