"""Sampling policies: one module per policy family, found by `type:` name through the registry."""
