"""Istio policy: typed immutable resources, loading with precise errors, the compiled Snapshot."""
