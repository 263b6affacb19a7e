"""Telemetry: propagation, tracing, metrics, access logs."""
