"""The command line: `kproxy` and its commands (click)."""
