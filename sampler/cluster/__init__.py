"""Cluster membership and ownership of trace ids among members."""
