"""The only code that touches the kernel or runs commands."""
