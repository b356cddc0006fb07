"""The iptables mode: pure render and plan, the proxier that applies them, the mode object."""
