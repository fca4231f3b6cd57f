"""tailgate: a tail-based sampling gateway for distributed tracing."""

__version__ = "0.1.0"
