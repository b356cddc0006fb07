"""The nftables mode: one table `kproxy` per IP family."""
