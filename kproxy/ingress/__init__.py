"""The ingress module: Ingress objects to an nginx configuration, and hostPort on edge nodes."""
