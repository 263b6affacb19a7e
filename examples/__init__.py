"""Runnable services meshed with meshlib (`make demo` runs examples/bookinfo)."""
