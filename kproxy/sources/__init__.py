"""Where cluster state comes from: the API server (kube.py) or state files (files.py)."""
