"""`kproxy run`: the daemon's wiring and life cycle, health checks."""
