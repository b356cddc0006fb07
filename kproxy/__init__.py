"""kproxy: a Kubernetes service proxy with an nginx ingress module."""

__version__ = "0.1.0"
