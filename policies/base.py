"""What every policy sees and returns: the read-only trace view, the decision, and the Policy protocol."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

# Attribute values as policies see them: OTLP AnyValue scalars mapped to Python.
AttributeValue = str | bool | int | float

# Bits of TraceView.status_codes, one per OTLP Status.code seen on any span.
STATUS_UNSET = 1 << 0
STATUS_OK = 1 << 1
STATUS_ERROR = 1 << 2


class Decision(enum.Enum):
    """A policy's verdict, with the OTel Collector tail sampling processor's meanings."""

    NOT_SAMPLED = "not_sampled"
    SAMPLED = "sampled"
    INVERT_SAMPLED = "invert_sampled"
    INVERT_NOT_SAMPLED = "invert_not_sampled"
    DROPPED = "dropped"


class TraceView(Protocol):
    """The summary of one buffered trace, kept up to date as its spans arrive."""

    @property
    def trace_id(self) -> bytes: ...

    @property
    def span_count(self) -> int: ...

    @property
    def status_codes(self) -> int:
        """Bit set of STATUS_* flags: which span status codes occur in the trace."""
        ...

    @property
    def min_start_ns(self) -> int:
        """Earliest span start (Unix ns); 0 when no span had a start time."""
        ...

    @property
    def max_end_ns(self) -> int:
        """Latest span end (Unix ns)."""
        ...

    @property
    def root_seen(self) -> bool: ...

    def attribute_values(self, key: str) -> Sequence[AttributeValue]:
        """Values of `key` on any span or resource of the trace.

        Only keys that some policy listed in `attribute_keys` are extracted at ingest.
        """
        ...


class ParamsModel(BaseModel):
    """Base for a policy's parameter block; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Builds a sub-policy from its config dict; `path` is the key path used in error messages.
SubPolicyBuilder = Callable[[dict[str, Any], str], "Policy"]


@runtime_checkable
class Policy(Protocol):
    """A sampling policy: pure apart from state it owns (rate windows and the like)."""

    name: str
    # Attribute keys this policy reads through TraceView.attribute_values.
    attribute_keys: frozenset[str]

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        """Decide one trace; `now` is the decider's clock in seconds (monotonic)."""
        ...


class PolicyType(Protocol):
    """A policy class as the registry sees it: its config `type:` name, parameters and constructor."""

    type_name: ClassVar[str]
    Params: ClassVar[type[ParamsModel]]

    def __call__(self, name: str, params: Any, build_sub: SubPolicyBuilder) -> Policy: ...
