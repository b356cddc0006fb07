"""Fixtures for the real-nginx tests; the helpers live in ingresskit.py, a name no other test
directory uses (test modules importing `conftest` would get whichever conftest came first)."""

from ingresskit import cert_factory, client, echo_backends, htpasswd_secret, nginx_factory  # noqa: F401
