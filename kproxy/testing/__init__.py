"""Test helpers shipped with the package: fakes, the packet tracer, the namespace lab tools."""
