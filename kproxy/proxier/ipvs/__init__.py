"""The IPVS mode: pure render and plans, the proxier that applies them, the mode object."""
