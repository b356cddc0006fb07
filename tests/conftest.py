"""Shared by every test directory: no test inherits another's process-wide logging set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    # The CLI commands configure structlog for the whole process (`ingress convert` filters
    # below "error"); a later test's capture_logs() would then see nothing.
    yield
    structlog.reset_defaults()
