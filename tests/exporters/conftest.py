"""Fixtures for exporter tests: a real OTLP/HTTP downstream on loopback, a fresh Metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sampler.metrics import Metrics

from .helpers import Downstream


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    server = Downstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make_downstream() -> AsyncIterator[Callable[[int], Awaitable[Downstream]]]:
    """Start a downstream on a given port later in the test (for the server-comes-up case)."""
    servers: list[Downstream] = []

    async def start(port: int) -> Downstream:
        server = Downstream()
        servers.append(server)
        await server.start(port)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()
