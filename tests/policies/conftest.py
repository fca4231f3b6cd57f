"""Fixtures for policy tests: a TraceView test double and a one-policy builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from policies.base import AttributeValue, Policy, SpanRecord
from policies.registry import build_policies
from sampler.errors import ConfigError


@dataclass(frozen=True)
class FakeTrace:
    """A TraceView with every summary field given directly."""

    trace_id: bytes = bytes(16)
    span_count: int = 1
    status_codes: int = 0
    min_start_ns: int = 0
    max_end_ns: int = 0
    root_seen: bool = True
    attributes: Mapping[str, Sequence[AttributeValue]] = field(default_factory=dict)
    nbytes: int = 0
    records: Sequence[SpanRecord] = ()

    def attribute_values(self, key: str) -> Sequence[AttributeValue]:
        return self.attributes.get(key, ())

    def spans(self) -> Sequence[SpanRecord]:
        return self.records


@pytest.fixture
def make_trace() -> type[FakeTrace]:
    return FakeTrace


@pytest.fixture
def build() -> Callable[[dict[str, Any]], Policy]:
    """Build one policy the way the config loader does, as `tail_sampling.policies[0]`."""

    def build_one(spec: dict[str, Any]) -> Policy:
        (policy,) = build_policies([spec], "tail_sampling.policies")
        return policy

    return build_one


def config_error(spec: dict[str, Any]) -> str:
    """The ConfigError message for one policy built as `tail_sampling.policies[0]`."""
    with pytest.raises(ConfigError) as caught:
        build_policies([spec], "tail_sampling.policies")
    return str(caught.value)
