"""The Refinery-style dynamic samplers `dynamic`, `ema_dynamic` and `throughput`: per-key sample rates
learned from how often each key occurs, and a keep decision that every node makes alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BeforeValidator, Field, StrictInt

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView
from policies.dynamic_key import ROOT_PREFIX, KeyBuilder
from policies.dynamic_rates import average_rate_goal, moving_averages, sample_rates
from policies.probabilistic import DEFAULT_HASH_SALT, fnv1a_64

# The key that traces share once `max_keys` keys are in the table; built keys are never empty.
OVERFLOW_KEY = ""

_MAX_HASH = (1 << 64) - 1
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: Any) -> Any:
    """A Go duration string as Refinery takes them ("15s", "1m30s", "500ms") in seconds; a number is
    seconds already."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 15s, not a boolean")
    if not isinstance(value, str):
        return value
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"invalid duration {value!r} (use e.g. 15s, 1m30s, 500ms)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _names_a_field(field: str) -> str:
    if not field or field == ROOT_PREFIX:
        raise ValueError(f"names no field ({field!r})")
    return field


KeyField = Annotated[str, AfterValidator(_names_a_field)]
Duration = Annotated[float, BeforeValidator(duration_seconds), Field(gt=0, allow_inf_nan=False)]
SampleRate = Annotated[StrictInt, Field(ge=1)]


class KeyedParams(ParamsModel):
    """Parameters every dynamic sampler has: how the key is built and counted.

    - `key_fields`: the fields whose values make up a trace's sample key (see `policies.dynamic_key`:
      attribute keys, `status`, `name`, `root.<field>`); none: one key for all traces.
    - `use_trace_length`: the span count is part of the key too.
    - `use_span_count`: count (and, for `throughput`, aim at) spans instead of traces.
    - `max_keys`: keys with a place of their own in the table; further keys share one (default 500).
    - `hash_salt`: salt of the trace-id hash, as in `probabilistic` (default `default-hash-seed`).
    """

    key_fields: list[KeyField] = Field(default_factory=list)
    use_trace_length: bool = False
    use_span_count: bool = False
    max_keys: Annotated[StrictInt, Field(gt=0)] = 500
    hash_salt: str = ""


class DynamicParams(KeyedParams):
    """- `goal_sample_rate`: the average rate to reach, one trace kept in N (default 10).
    - `adjustment_interval`: how long counts are collected before rates are recomputed from them
      alone (Refinery's ClearFrequency; default 30s).
    """

    goal_sample_rate: SampleRate = 10
    adjustment_interval: Duration = 30.0


class MovingAverageParams(KeyedParams):
    """Parameters of the samplers that smooth counts with an exponential moving average.

    - `adjustment_interval`: how often the averages take in the last counts (default 15s).
    - `weight`: in (0, 1], how far each interval moves the averages towards its counts (default 0.5;
      1: no smoothing).
    - `ageout_value`: keys whose average falls below it leave the table (default: `weight`).
    - `burst_multiple`: counts within one interval reaching this multiple of the averages' sum
      recompute at once (default 2; 0 or less: never).
    - `burst_detection_delay`: intervals to wait before bursts are detected (default 3).
    """

    adjustment_interval: Duration = 15.0
    weight: float = Field(default=0.5, gt=0, le=1)
    ageout_value: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    burst_multiple: float = Field(default=2.0, allow_inf_nan=False)
    burst_detection_delay: Annotated[StrictInt, Field(ge=0)] = 3


class EMADynamicParams(MovingAverageParams):
    """- `goal_sample_rate`: the average rate to reach, one trace kept in N (default 10)."""

    goal_sample_rate: SampleRate = 10


class ThroughputParams(MovingAverageParams):
    """- `goal_throughput_per_sec`: traces (spans with `use_span_count`) to keep per second, on this
      gateway (default 100).
    - `initial_sample_rate`: the rate of every trace until the first interval ends (default 10).
    """

    goal_throughput_per_sec: float = Field(default=100.0, gt=0, allow_inf_nan=False)
    initial_sample_rate: SampleRate = 10


class KeyedSampler:
    """What the three samplers share: a sample key per trace, counts per key over each
    `adjustment_interval` of the decider's clock, the rates learned from them, and the decision.

    A trace of rate R is kept when FNV-1a 64 of the salt and its trace id is at most (2^64-1)/R
    (integer division): the `probabilistic` policy's hash, so gateways whose rates agree keep the same
    traces. Rates are recomputed when `now` passes the end of an interval (intervals start at the first
    trace seen; an interval without traffic counts as such), never by a background task, so a policy
    driven by span timestamps instead of the clock behaves the same offline.

    The key table holds at most `max_keys` keys: those with a learned rate keep their place, new keys
    take the free places, and the traces of any further keys are counted together under one shared
    overflow key, which gets a rate like any other key.
    """

    type_name: ClassVar[str]
    Params: ClassVar[type[ParamsModel]]

    def __init__(self, name: str, params: KeyedParams, adjustment_interval: float, initial_rate: int) -> None:
        self.name = name
        self._keys = KeyBuilder(params.key_fields, params.use_trace_length)
        self.attribute_keys: frozenset[str] = self._keys.attribute_keys
        self.use_span_count = params.use_span_count
        self.max_keys = params.max_keys
        self.adjustment_interval = adjustment_interval
        self.initial_rate = initial_rate
        self._salt_state = fnv1a_64((params.hash_salt or DEFAULT_HASH_SALT).encode())
        self._rates: dict[str, int] = {}
        self._have_data = False
        self._counts: dict[str, float] = {}
        self._new_keys = 0  # keys in _counts without a learned rate
        self._next_update: float | None = None
        self._intervals = 0
        self._burst_sum = 0.0
        self._burst_threshold = 0.0  # 0: no burst detection
        self._burst_delay = 0
        self._last: tuple[bytes, int] = (b"", 1)

    @property
    def rates(self) -> Mapping[str, int]:
        """The learned rate of each key in the table (keys not in it get rate 1 once data is in)."""
        return MappingProxyType(self._rates)

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        self._advance(now)
        key = self._bucket(self._keys.key(trace), admit=True)
        count = trace.span_count if self.use_span_count else 1
        self._counts[key] = self._counts.get(key, 0.0) + count
        self._burst_sum += count
        if self._bursting():
            self._recompute()
            self._next_update = now + self.adjustment_interval
        rate = self._rate(key)
        self._last = (trace.trace_id, rate)
        if fnv1a_64(trace.trace_id, self._salt_state) <= _MAX_HASH // rate:
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED

    def keep_probability(self, trace: TraceView) -> float:
        """1/rate of the trace's key when it was decided (looked up again for another trace)."""
        trace_id, rate = self._last
        if trace_id != trace.trace_id:
            rate = self._rate(self._bucket(self._keys.key(trace), admit=False))
        return 1.0 / rate

    def _rate(self, key: str) -> int:
        if not self._have_data:
            return self.initial_rate
        return self._rates.get(key, 1)

    def _bucket(self, key: str, admit: bool) -> str:
        """`key` if it has a place in the table (taking a free one when `admit`), else the overflow key."""
        if key in self._counts or key in self._rates:
            return key
        tracked = len(self._rates) - (OVERFLOW_KEY in self._rates)
        if tracked + self._new_keys < self.max_keys:
            if admit:
                self._new_keys += 1
            return key
        return OVERFLOW_KEY

    def _advance(self, now: float) -> None:
        if self._next_update is None:
            self._next_update = now + self.adjustment_interval
            return
        if now < self._next_update:
            return
        idle = int((now - self._next_update) // self.adjustment_interval)
        self._recompute()
        if idle:
            self._recompute()
        self._intervals += 1 + idle
        self._next_update += (1 + idle) * self.adjustment_interval

    def _recompute(self) -> None:
        counts = self._counts
        self._counts = {}
        self._new_keys = 0
        self._burst_sum = 0.0
        self._learn(counts)

    def _bursting(self) -> bool:
        return (
            self._burst_threshold > 0
            and self._burst_sum >= self._burst_threshold
            and self._intervals >= self._burst_delay
        )

    def _learn(self, counts: dict[str, float]) -> None:
        """Take in the counts of the interval that ended (empty when it had no traffic)."""
        raise NotImplementedError


class Dynamic(KeyedSampler):
    """Refinery's DynamicSampler (dynsampler-go AvgSampleRate): rates from the counts of the last
    `adjustment_interval` alone, averaging `goal_sample_rate` with rare keys kept more.

    Until the first interval ends every trace gets `goal_sample_rate`; after an interval without
    traffic the rates are forgotten and every key gets rate 1 until the next one ends.
    """

    type_name: ClassVar[str] = "dynamic"
    Params: ClassVar[type[ParamsModel]] = DynamicParams

    def __init__(self, name: str, params: DynamicParams, build_sub: SubPolicyBuilder) -> None:
        super().__init__(name, params, params.adjustment_interval, params.goal_sample_rate)
        self.goal_sample_rate = params.goal_sample_rate

    def _learn(self, counts: dict[str, float]) -> None:
        if not counts:
            self._rates = {}
            return
        self._rates = sample_rates(counts, average_rate_goal(counts, self.goal_sample_rate))
        self._have_data = True


class MovingAverageSampler(KeyedSampler):
    """Rates from an exponential moving average of per-key counts, with burst detection.

    At each interval's end every key's average moves `weight` of the way to its new count; keys whose
    average falls below `ageout_value` (default: `weight`) leave the table. An interval without traffic
    leaves the averages alone. Once `burst_detection_delay` intervals have ended, a count within an
    interval reaching `burst_multiple` × the sum of the averages recomputes at once and restarts the
    interval; `burst_multiple` <= 0 turns that off.
    """

    def __init__(self, name: str, params: MovingAverageParams, initial_rate: int) -> None:
        super().__init__(name, params, params.adjustment_interval, initial_rate)
        self.weight = params.weight
        self.ageout_value = params.weight if params.ageout_value is None else params.ageout_value
        self.burst_multiple = params.burst_multiple
        self._burst_delay = params.burst_detection_delay
        self._averages: dict[str, float] = {}

    def _learn(self, counts: dict[str, float]) -> None:
        if not counts:
            return
        self._averages = moving_averages(self._averages, counts, self.weight, self.ageout_value)
        total = sum(max(1.0, value) for value in self._averages.values())
        self._burst_threshold = total * self.burst_multiple
        self._rates = sample_rates(self._averages, self._goal_count(self._averages))
        self._have_data = True

    def _goal_count(self, averages: dict[str, float]) -> float:
        """How many of the counted items an interval should let through."""
        raise NotImplementedError


class EMADynamic(MovingAverageSampler):
    """Refinery's EMADynamicSampler (dynsampler-go EMASampleRate): `dynamic` over moving averages,
    so rates follow traffic changes smoothly; every trace gets `goal_sample_rate` until the first
    interval ends."""

    type_name: ClassVar[str] = "ema_dynamic"
    Params: ClassVar[type[ParamsModel]] = EMADynamicParams

    def __init__(self, name: str, params: EMADynamicParams, build_sub: SubPolicyBuilder) -> None:
        super().__init__(name, params, params.goal_sample_rate)
        self.goal_sample_rate = params.goal_sample_rate

    def _goal_count(self, averages: dict[str, float]) -> float:
        return average_rate_goal(averages, self.goal_sample_rate)


class Throughput(MovingAverageSampler):
    """Refinery's EMAThroughputSampler (dynsampler-go EMAThroughput): rates that let about
    `goal_throughput_per_sec` traces (spans with `use_span_count`) through per second, spread over the
    keys as `dynamic` spreads them; every trace gets `initial_sample_rate` until the first interval ends.
    Rates are rounded up, so the kept throughput lands at or somewhat below the goal.
    """

    type_name: ClassVar[str] = "throughput"
    Params: ClassVar[type[ParamsModel]] = ThroughputParams

    def __init__(self, name: str, params: ThroughputParams, build_sub: SubPolicyBuilder) -> None:
        super().__init__(name, params, params.initial_sample_rate)
        self.goal_throughput_per_sec = params.goal_throughput_per_sec

    def _goal_count(self, averages: dict[str, float]) -> float:
        return self.goal_throughput_per_sec * self.adjustment_interval
