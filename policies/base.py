"""What every policy sees and returns: the read-only trace view, the decision, the protocols."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pydantic import BaseModel, ConfigDict

from sampler.errors import ConfigError

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


class SpanRecord(NamedTuple):
    """One span of a trace parsed in full, with the resource and instrumentation scope it came under."""

    resource: Resource
    scope: InstrumentationScope
    span: Span


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

    @property
    def nbytes(self) -> int:
        """Serialized size of the trace's spans (protobuf, as received)."""
        ...

    def spans(self) -> Sequence[SpanRecord]:
        """Every span of the trace parsed in full (spans that are not valid OTLP are left out).

        Parsing costs far more than reading the summary: policies that need span details (names,
        kinds, trace state, per-span conditions) call it; the result is cached for the decision.
        """
        ...

    def attribute_values(self, key: str) -> Sequence[AttributeValue]:
        """Values of `key` on any span or resource of the trace.

        Only keys that some policy listed in `attribute_keys` are extracted at ingest.
        """
        ...


class ParamsModel(BaseModel):
    """Base for a policy's parameter block; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Builds a sub-policy from its config dict. `path` is relative to the parent's parameter block
# (e.g. "and_sub_policy[0]"); the registry prefixes the parent's own key path for error messages.
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


@runtime_checkable
class Weighted(Protocol):
    """A policy whose keeps are a sample: it tells with what probability it keeps a trace like this one.

    The decider asks each policy that said SAMPLED of a trace, once, right after the decision; the largest
    answer becomes the trace's adjusted count (`tailgate.sample_rate` = 1/p, and the tracestate `ot=th:`
    threshold).
    Policies without this method keep with probability 1.
    """

    def keep_probability(self, trace: TraceView) -> float:
        """In (0, 1]: the probability with which this policy keeps traces like `trace`."""
        ...


class PolicyType(Protocol):
    """A policy class as the registry sees it: its `type:` name, parameters and constructor.

    Implementations declare `type_name: ClassVar[str]` and `Params: ClassVar[type[ParamsModel]]`;
    the protocol spells them as read-only properties because mypy never matches a class object
    against ClassVar protocol members.
    """

    @property
    def type_name(self) -> str: ...

    @property
    def Params(self) -> type[ParamsModel]: ...

    def __call__(self, name: str, params: Any, build_sub: SubPolicyBuilder) -> Policy: ...


def build_sub_policies(specs: list[Any], key: str, build_sub: SubPolicyBuilder) -> tuple[Policy, ...]:
    """Build the sub-policies listed under `key`; the ConfigError lists the problems of all of them."""
    subs: list[Policy] = []
    problems: list[str] = []
    for index, spec in enumerate(specs):
        try:
            subs.append(build_sub(spec, f"{key}[{index}]"))
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("\n".join(problems))
    return tuple(subs)
