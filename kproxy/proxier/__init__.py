"""Per-mode proxiers: pure render and plan, plus the driver that hands a plan to a backend."""
