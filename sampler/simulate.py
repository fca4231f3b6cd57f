"""`tailgate simulate`: replays captured spans through configs offline and tallies what each would keep.

Each config gets its own trace buffer and decider, driven by a clock that follows the spans' own
timestamps; nothing is received or sent over the network.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from policies.base import Decision
from policies.registry import build_policies
from sampler.buffer import DecisionCache, LateSpan, SpanBatch, Trace, TraceBuffer
from sampler.config import Config
from sampler.decider import Decider
from sampler.errors import DecodeError, TailgateError
from sampler.metrics import Metrics
from sampler.otlp_wire import span_prefix
from sampler.receivers.otlp_decode import decode_json

# Traces decided per decide() call, as the gateway's tick loop does.
_DECIDE_SLICE = 2000
_MATCHED = (Decision.SAMPLED, Decision.INVERT_SAMPLED)


class CaptureError(TailgateError):
    """The capture file cannot be read or is not OTLP JSON lines."""


class SimulatedClock:
    """The decider's and the buffer's clock: seconds of span time, moved forward by the replay."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class PolicyTally:
    """What one policy did over the replay."""

    name: str
    type: str
    traces: int = 0  # traces it evaluated
    spans: int = 0  # spans of those traces
    matched: int = 0  # traces it said SAMPLED or INVERT_SAMPLED to
    kept: int = 0  # traces it kept: the deciding policy
    kept_spans: int = 0  # their spans, late spans included
    kept_bytes: int = 0  # their serialized bytes (framed), late spans included


@dataclass
class Tally:
    """What one config did over the replay."""

    config: str
    policies: list[PolicyTally]
    traces: int = 0
    spans: int = 0
    kept_traces: int = 0
    kept_spans: int = 0
    kept_bytes: int = 0
    # Kept trace id → index of the policy that kept it.
    kept_ids: dict[bytes, int] = field(default_factory=dict)


class Simulation:
    """One config replayed: a trace buffer and a decider on a simulated clock, tallying decisions."""

    def __init__(self, name: str, config: Config) -> None:
        sampling = config.tail_sampling
        policies = build_policies(sampling.policies, "tail_sampling.policies")
        self.tally = Tally(
            name, [PolicyTally(policy.name, getattr(policy, "type_name", "")) for policy in policies]
        )
        self.clock = SimulatedClock()
        decisions = DecisionCache(
            sampling.decision_cache.sampled_cache_size, sampling.decision_cache.non_sampled_cache_size
        )
        attribute_keys = frozenset().union(*(policy.attribute_keys for policy in policies))
        self.buffer = TraceBuffer(sampling, attribute_keys, decisions, self.clock)
        self.decider = Decider(
            self.buffer,
            policies,
            [],
            decisions,
            Metrics(),
            self.clock,
            sampling.decision_tick,
            record_policy=False,
            sample_on_first_match=sampling.sample_on_first_match,
            adjusted_counts=False,
            observer=self._observe,
        )
        self.buffer.connect(self.decider.decide_safely, self._late)

    def add(self, batches: list[SpanBatch], now: float) -> None:
        """Buffer one request's spans arriving at `now`, after deciding the traces due before it."""
        self._decide_due(now)
        self.clock.now = max(self.clock.now, now)
        self.tally.spans += self.buffer.add_spans(batches).accepted

    def finish(self) -> Tally:
        """Decide every trace still buffered, each at its deadline."""
        self._decide_due(math.inf)
        return self.tally

    def _decide_due(self, until: float) -> None:
        """Decide the traces whose deadlines come before `until`, moving the clock to each deadline."""
        buffer = self.buffer
        while (deadline := buffer.next_deadline()) is not None and deadline <= until:
            self.clock.now = max(self.clock.now, deadline)
            self.decider.decide_safely(buffer.pop_due(self.clock.now, _DECIDE_SLICE))

    def _observe(self, trace: Trace, verdicts: Sequence[Decision | None], kept_by: int | None) -> None:
        tally = self.tally
        tally.traces += 1
        for policy, verdict in zip(tally.policies, verdicts, strict=True):
            if verdict is not None:
                policy.traces += 1
                policy.spans += trace.span_count
                if verdict in _MATCHED:
                    policy.matched += 1
        if kept_by is not None:
            tally.kept_ids[trace.trace_id] = kept_by
            tally.kept_traces += 1
            tally.kept_spans += trace.span_count
            tally.kept_bytes += trace.nbytes
            keeper = tally.policies[kept_by]
            keeper.kept += 1
            keeper.kept_spans += trace.span_count
            keeper.kept_bytes += trace.nbytes

    def _late(self, spans: list[LateSpan]) -> None:
        """Late spans of kept traces: counted with the policy that kept their trace."""
        by_name = {policy.name: policy for policy in self.tally.policies}
        for late in spans:
            keeper = by_name[late.kept.policy]
            # Framed, as Trace.nbytes counts the spans of a trace.
            size = len(span_prefix(len(late.payload))) + len(late.payload)
            keeper.kept_spans += 1
            keeper.kept_bytes += size
            self.tally.kept_spans += 1
            self.tally.kept_bytes += size


def read_capture(path: str, progress: Progress | None = None) -> Iterator[tuple[list[SpanBatch], float]]:
    """Each line of an OTLP JSON lines file as span batches and its time: its latest span end (seconds)."""
    try:
        file = Path(path).open("rb")  # noqa: SIM115 - closed by the with below, after a clear error
    except OSError as error:
        raise CaptureError(f"cannot read capture {path}: {error.strerror}") from None
    with file:
        done = 0
        try:
            for number, line in enumerate(file, start=1):
                done += len(line)
                if progress is not None:
                    progress.update(done)
                if not line.strip():
                    continue
                try:
                    batches = decode_json(line)
                except DecodeError as error:
                    raise CaptureError(f"capture {path} line {number}: {error}") from None
                end = max((span.end_time_unix_nano for batch in batches for span in batch.spans), default=0)
                yield batches, end / 1e9
        except OSError as error:
            raise CaptureError(f"cannot read capture {path}: {error.strerror}") from None


def simulate(
    capture: str, configs: Sequence[tuple[str, Config]], progress: Progress | None = None
) -> list[Tally]:
    """Replay `capture` through every config (name, config) in one pass; their tallies in order."""
    simulations = [Simulation(name, config) for name, config in configs]
    try:
        for batches, now in read_capture(capture, progress):
            for simulation in simulations:
                simulation.add(batches, now)
    finally:
        if progress is not None:
            progress.close()
    return [simulation.finish() for simulation in simulations]


class Progress:
    """A progress bar of bytes read on a terminal's stderr; silent when stderr is not a terminal."""

    WIDTH = 30
    INTERVAL = 0.1  # seconds between redraws

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self._drawn = 0.0

    @classmethod
    def for_file(cls, path: str) -> Progress:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        return cls(size)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._drawn < self.INTERVAL:
            return
        self._drawn = now
        share = min(done / self.total, 1.0)
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {share:4.0%} {_size(done)} / {_size(self.total)}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.WIDTH + 40) + "\r")
            self.stream.flush()


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def to_json(capture: str, tallies: Sequence[Tally]) -> dict[str, Any]:
    """The tallies as a JSON document; kept trace ids as sorted hex."""
    return {
        "capture": capture,
        "configs": [
            {
                "config": tally.config,
                "traces": tally.traces,
                "spans": tally.spans,
                "kept_traces": tally.kept_traces,
                "kept_spans": tally.kept_spans,
                "kept_bytes": tally.kept_bytes,
                "keep_rate": _rate(tally.kept_traces, tally.traces),
                "policies": [
                    {
                        "name": policy.name,
                        "type": policy.type,
                        "traces": policy.traces,
                        "spans": policy.spans,
                        "matched": policy.matched,
                        "kept": policy.kept,
                        "kept_spans": policy.kept_spans,
                        "kept_bytes": policy.kept_bytes,
                        "keep_rate": _rate(policy.kept, policy.traces),
                    }
                    for policy in tally.policies
                ],
                "kept_trace_ids": sorted(trace_id.hex() for trace_id in tally.kept_ids),
            }
            for tally in tallies
        ],
    }


def kept_id_lines(tallies: Sequence[Tally]) -> Iterator[str]:
    """One tab-separated line per kept trace per config: config, trace id (hex), keeping policy."""
    for tally in tallies:
        for trace_id, index in sorted(tally.kept_ids.items()):
            yield f"{tally.config}\t{trace_id.hex()}\t{tally.policies[index].name}\n"


def to_table(tallies: Sequence[Tally]) -> str:
    """The overall figures of the configs side by side, then each config's per-policy table."""
    overall_rows = [
        ("traces seen", [f"{t.traces:,}" for t in tallies]),
        ("spans seen", [f"{t.spans:,}" for t in tallies]),
        ("traces kept", [f"{t.kept_traces:,}" for t in tallies]),
        ("spans kept", [f"{t.kept_spans:,}" for t in tallies]),
        ("keep rate", [_percent(t.kept_traces, t.traces) for t in tallies]),
        ("bytes kept", [_size(t.kept_bytes) for t in tallies]),
    ]
    sections = [
        _format_table(
            ["", *(t.config for t in tallies)], [[label, *values] for label, values in overall_rows]
        )
    ]
    header = ["policy", "type", "traces", "spans", "matched", "kept", "keep rate", "spans kept", "bytes kept"]
    for tally in tallies:
        rows = [
            [
                p.name,
                p.type,
                f"{p.traces:,}",
                f"{p.spans:,}",
                f"{p.matched:,}",
                f"{p.kept:,}",
                _percent(p.kept, p.traces),
                f"{p.kept_spans:,}",
                _size(p.kept_bytes),
            ]
            for p in tally.policies
        ]
        sections.append(f"{tally.config}\n{_format_table(header, rows)}")
    return "\n\n".join(sections) + "\n"


def _percent(part: int, whole: int) -> str:
    return f"{100 * _rate(part, whole):.1f} %"


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first two columns (names) left-aligned, numbers right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if index == 0 or (index == 1 and header[0] == "policy") else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
