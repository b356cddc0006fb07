"""hostPort on edge nodes (an L4 data-plane feature, as the CNI portmap plugin): rules and syncer."""
