"""Meshed HTTP clients."""
