"""The network-namespace lab behind `make demo` and the kernel tests."""
