"""Receivers: decode spans from the wire and hand them to the trace buffer."""
