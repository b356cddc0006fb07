"""Throw-away TLS certificates for tests: self-signed, one host each, made with openssl."""

from __future__ import annotations

import base64
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Cert:
    host: str
    crt: Path
    key: Path

    def secret(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """A `kubernetes.io/tls` Secret holding this certificate and key."""
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace},
            "data": {
                "tls.crt": base64.b64encode(self.crt.read_bytes()).decode(),
                "tls.key": base64.b64encode(self.key.read_bytes()).decode(),
            },
        }


def make_cert(directory: Path, host: str) -> Cert:
    """A self-signed P-256 certificate for `host` (wildcards too), valid for two days."""
    if OPENSSL is None:
        raise FileNotFoundError("openssl is not installed")
    stem = host.replace("*", "wildcard")
    crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={host}",
            "-addext",
            f"subjectAltName=DNS:{host}",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Cert(host, crt, key)
