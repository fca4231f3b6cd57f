"""The decider: evaluates the policies once per trace at its deadline and hands kept traces to exporters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from policies.base import Decision, Policy, TraceView, Weighted
from policies.combine import deciding_policy
from sampler.adjusted import MAX_ADJUSTED_COUNT, AdjustedCounts, AttributeLimits
from sampler.buffer import (
    DecisionCache,
    IngestResult,
    Kept,
    LateSpan,
    RewriteRun,
    Trace,
    TraceBuffer,
    kept_span_groups,
)
from sampler.config import AttributeLimitsConfig, TailSamplingConfig
from sampler.exporters.base import Exporter
from sampler.logthrottle import LogThrottle
from sampler.metrics import Metrics
from sampler.otlp_wire import Scope, SpanGroup, scope_with_attribute, span_prefix

log = logging.getLogger(__name__)

# Traces decided per slice of the tick loop before yielding to the event loop, so a burst of due
# traces does not stall ingest.
_DECIDE_SLICE = 2000
# Scopes with the keeping policy recorded, cached; the cache starts over when it reaches this size.
_MAX_POLICY_SCOPES = 10_000

# Called once per decided trace with each policy's verdict (None: not evaluated) and the index of the
# policy that kept it (None: dropped); `tailgate simulate` tallies decisions through it.
DecisionObserver = Callable[[Trace, Sequence[Decision | None], int | None], None]
KeepProbability = Callable[[TraceView], float]
Export = Callable[[list[SpanGroup], int], None]


class Decider:
    """Applies policies to due traces, records decisions, forwards kept spans."""

    def __init__(
        self,
        buffer: TraceBuffer,
        policies: Sequence[Policy],
        exporters: Sequence[Exporter],
        decisions: DecisionCache,
        metrics: Metrics,
        clock: Callable[[], float],
        tick: float,
        record_policy: bool,
        sample_on_first_match: bool = False,
        drop_pending_on_shutdown: bool = False,
        adjusted_counts: bool = True,
        observer: DecisionObserver | None = None,
        attribute_limits: AttributeLimitsConfig | None = None,
    ) -> None:
        self.buffer = buffer
        self.policies = list(policies)
        self.exporters = list(exporters)
        self.decisions = decisions
        self.metrics = metrics
        self.clock = clock
        self.tick = tick
        self.record_policy = record_policy
        self._policy_scopes: dict[tuple[Scope, str], Scope] = {}
        self.drop_pending_on_shutdown = drop_pending_on_shutdown
        self._adjusted: AdjustedCounts | None = None
        self.use_policies(policies, sample_on_first_match, adjusted_counts)
        self._limits: AttributeLimits | None = None
        self.use_limits(attribute_limits or AttributeLimitsConfig())
        # Traces buffered when a reload added attribute keys: their earlier spans are read for those keys
        # when they are decided (see `reconfigure`).
        self._stale_attributes: set[Trace] = set()
        self._stale_until = 0.0
        self._observer = observer
        self._kept_traces = metrics.traces_decided.labels("kept")
        self._dropped_traces = metrics.traces_decided.labels("dropped")
        self._kept_spans = metrics.spans_decided.labels("kept")
        self._dropped_spans = metrics.spans_decided.labels("dropped")
        self._late_kept = metrics.late_spans.labels("kept")
        self._late_dropped = metrics.late_spans.labels("dropped")
        self._invalid_spans = metrics.invalid_spans
        self._invalid_log = LogThrottle()
        self._task: asyncio.Task[None] | None = None

    def use_policies(
        self, policies: Sequence[Policy], sample_on_first_match: bool, adjusted_counts: bool
    ) -> None:
        """Evaluate `policies` from the next decision on, in the order these options give."""
        self.policies = list(policies)
        self._evaluators = [policy.evaluate for policy in self.policies]
        self._attribute_keys = attribute_keys(self.policies)
        # As the Collector: drop policies are evaluated first, and a drop ends the evaluation.
        self._drop_first = [i for i, policy in enumerate(self.policies) if _is_drop(policy)]
        self._others = [i for i in range(len(self.policies)) if i not in self._drop_first]
        self._sample_on_first_match = sample_on_first_match
        self._in_order = bool(self._drop_first) or sample_on_first_match
        if not adjusted_counts:
            self._adjusted = None
        elif self._adjusted is None:
            self._adjusted = AdjustedCounts()
        # Looked up once: which policies keep a sample with a known probability.
        self._keep_probabilities: list[KeepProbability | None] = [
            policy.keep_probability if adjusted_counts and isinstance(policy, Weighted) else None
            for policy in self.policies
        ]

    def use_limits(self, limits: AttributeLimitsConfig) -> None:
        """Cut kept spans to these attribute limits from the next decision on."""
        self._limits = None
        if limits.max_attributes_per_span or limits.max_attribute_value_length:
            counter = self.metrics.truncated_attributes
            self._limits = AttributeLimits(
                limits.max_attributes_per_span,
                limits.max_attribute_value_length,
                counter.labels("dropped"),
                counter.labels("shortened"),
            )

    def use_settings(self, settings: TailSamplingConfig) -> None:
        """Take the `tail_sampling` settings besides the policies and the buffer's: attribute limits, the
        decision tick, record_policy, drop_pending_traces_on_shutdown."""
        self.use_limits(settings.attribute_limits)
        self.tick = settings.decision_tick
        self.record_policy = settings.record_policy
        self.drop_pending_on_shutdown = settings.drop_pending_traces_on_shutdown

    def reconfigure(self, policies: Sequence[Policy], settings: TailSamplingConfig) -> None:
        """Switch to a reloaded `tail_sampling` block (its decision cache sizes aside).

        Called on the event loop between two decisions, so no trace is decided half by the old policies;
        buffered traces stay and are decided by the new ones. The buffer extracts the attribute keys the
        new policies read from then on; a trace buffered before gets the keys added here from its earlier
        spans when it is decided (parsed in full, once).
        """
        added = attribute_keys(policies) - attribute_keys(self.policies)
        self.use_policies(policies, settings.sample_on_first_match, settings.adjusted_counts)
        self.use_settings(settings)
        if added:
            self._stale_attributes = set(self.buffer.traces.values())
            # Each leaves within its decision wait, decided here or handed to another member (which this
            # decider does not see): then those no longer buffered are let go.
            wait = max(self.buffer.settings.decision_wait, settings.decision_wait)
            self._stale_until = self.clock() + wait + 1.0
        self.buffer.reconfigure(settings, attribute_keys(policies))

    def _read_added_keys(self, traces: list[Trace], reason: str | None) -> None:
        """Give traces buffered before a reload the values of the keys it added, from all their spans.

        The set empties as they are decided; those that left the buffer otherwise are let go in `decide`.
        """
        stale = self._stale_attributes
        keys = self._attribute_keys
        evaluated = reason not in _UNEVALUATED
        for trace in traces:
            if trace in stale:
                stale.discard(trace)
                if evaluated:
                    trace.read_attributes(keys)

    def decide(self, traces: list[Trace], reason: str | None = None) -> None:
        """Decide `traces` now; `reason` names why when it is before their deadline."""
        now = self.clock()
        if self._stale_attributes:
            self._read_added_keys(traces, reason)
            if now > self._stale_until and reason is None:
                # Those handed to another member meanwhile are not decided here: let go, not held.
                buffered = self.buffer.traces
                self._stale_attributes = {t for t in self._stale_attributes if buffered.get(t.trace_id) is t}
                self._stale_until = now + self.buffer.settings.decision_wait + 1.0
        evaluators = self._evaluators
        record = self.decisions.record
        verdict_rows: list[list[Decision | None]] = []
        exports: list[Export] = [exporter.export for exporter in self.exporters]
        kept_spans = 0
        kept_traces = 0
        dropped_spans = 0
        invalid_spans = 0
        in_order = self._in_order
        unevaluated = reason in _UNEVALUATED
        observer = self._observer
        kept: list[tuple[Trace, Kept]] = []  # with the deciding policy and the keep probability
        for trace in traces:
            if trace.attributes is not None and not unevaluated:
                trace.complete_attributes(self._attribute_keys)
            if unevaluated:
                verdicts: list[Decision | None] = [None] * len(evaluators)
            elif in_order:
                verdicts = self._evaluate_in_order(trace, now)
            else:
                verdicts = self._evaluate_all(trace, now)
            verdict_rows.append(verdicts)
            # Most traces have no keeping verdict at all: a C-level membership test rules that out.
            if Decision.SAMPLED in verdicts or Decision.INVERT_SAMPLED in verdicts:
                index = _deciding_index(verdicts)
                if index is not None:
                    # Asked now, before the policies decide the next traces (a burst may change rates).
                    kept.append(
                        (trace, Kept(self.policies[index].name, self._probability(verdicts, index, trace)))
                    )
                    kept_spans += trace.span_count
                    kept_traces += 1
                    if observer is not None:
                        observer(trace, verdicts, index)
                    continue
            record(trace.trace_id, None)
            dropped_spans += trace.span_count
            if observer is not None:
                observer(trace, verdicts, None)
        if kept:
            invalid_spans = self._keep(kept, exports)
        for trace in traces:
            trace.release()
        if reason is None:
            self.metrics.decision_delay.observe_many([max(0.0, now - trace.deadline) for trace in traces])
        if invalid_spans:
            self.count_invalid(invalid_spans)
        self._count(len(traces), kept_traces, kept_spans, dropped_spans, reason, verdict_rows)

    def _keep(self, records: list[tuple[Trace, Kept]], exports: list[Export]) -> int:
        """Record each trace as kept by its policy and hand its spans to the exporters, one call per trace
        (exporters batch and bound their queues by whole traces); returns how many spans were left out as
        invalid. The traces' spans are checked together (kept_span_groups)."""
        record = self.decisions.record
        for trace, decision in records:
            record(trace.trace_id, decision)
        if not exports:
            return 0
        traces = [trace for trace, _ in records]
        rewrites = [self._rewrite(decision.probability) for _, decision in records]
        invalid = 0
        for (_, decision), (groups, left_out) in zip(
            records, kept_span_groups(traces, rewrites), strict=True
        ):
            invalid += left_out
            if groups:
                groups = self._mark(decision.policy, groups)
                exported = sum(count for _, _, count in groups)
                for export in exports:
                    export(groups, exported)
        return invalid

    def _rewrite(self, tail_probability: float) -> RewriteRun | None:
        """What to do to a kept trace's framed spans before export: cut them to the attribute limits,
        then write their adjusted counts; None when neither is on."""
        adjusted, limits = self._adjusted, self._limits
        if adjusted is None and limits is None:
            return None
        if limits is None:
            assert adjusted is not None
            return partial(adjusted.rewrite_run, tail_probability=tail_probability)

        def rewrite(entries: bytes, spans: Sequence[Span]) -> bytes:
            entries, spans = limits.limit_run(entries, spans)
            if adjusted is None:
                return entries
            return adjusted.rewrite_run(entries, spans, tail_probability)

        return rewrite

    def _probability(self, verdicts: list[Decision | None], deciding: int, trace: Trace) -> float:
        """The probability with which a kept trace was kept: the largest keep probability among the
        policies that said SAMPLED (a trace an exact policy keeps is kept for certain, whatever a
        probabilistic one said of it); the deciding policy's when it was kept by INVERT_SAMPLED alone."""
        if verdicts[deciding] is not Decision.SAMPLED:
            return self._keep_probability(deciding, trace)
        probability = 0.0
        for index, verdict in enumerate(verdicts):
            if verdict is Decision.SAMPLED:
                probability = max(probability, self._keep_probability(index, trace))
                if probability == 1.0:
                    break
        return probability

    def _keep_probability(self, index: int, trace: Trace) -> float:
        """The probability with which policy `index` keeps traces like `trace`: its `keep_probability`
        when it is Weighted (clamped to [2^-56, 1]; a failure or NaN counts as 1), else 1."""
        keep_probability = self._keep_probabilities[index]
        if keep_probability is None:
            return 1.0
        try:
            probability = keep_probability(trace)
        except Exception:
            log.exception("keep_probability of policy %r failed", self.policies[index].name)
            return 1.0
        if not probability <= 1.0:  # also NaN
            return 1.0
        return max(probability, 1 / MAX_ADJUSTED_COUNT)

    def _evaluate_all(self, trace: Trace, now: float) -> list[Decision | None]:
        """Every policy's verdict, in order."""
        verdicts: list[Decision | None] = []
        for index, evaluate in enumerate(self._evaluators):
            try:
                verdicts.append(evaluate(trace, now))
            except Exception:
                self._failed(index, trace)
                verdicts.append(None)
        return verdicts

    def _evaluate_in_order(self, trace: Trace, now: float) -> list[Decision | None]:
        """Drop policies first (a drop ends it), then the others in order; with sample_on_first_match the
        first that samples ends it. Policies not evaluated get None."""
        evaluators = self._evaluators
        verdicts: list[Decision | None] = [None] * len(evaluators)
        for index in self._drop_first:
            try:
                verdicts[index] = evaluators[index](trace, now)
            except Exception:
                self._failed(index, trace)
            if verdicts[index] is Decision.DROPPED:
                return verdicts
        first_match = self._sample_on_first_match
        # In config order, a policy evaluated first (a `rules` with a drop rule) that sampled is the first
        # match for every policy after it: those are not asked.
        stop = len(evaluators)
        if first_match:
            stop = next((i for i in self._drop_first if verdicts[i] is Decision.SAMPLED), stop)
        for index in self._others:
            if index > stop:
                break
            try:
                verdicts[index] = evaluators[index](trace, now)
            except Exception:
                self._failed(index, trace)
            if first_match and verdicts[index] is Decision.SAMPLED:
                break
        return verdicts

    def _failed(self, index: int, trace: Trace) -> None:
        """A policy that raised (a faulty plugin, an OTTL condition in `error_mode: propagate`): logged and
        counted; its verdict stays None. As in the OTel Collector, the other policies go on, each evaluated
        once (a second evaluation would charge a rate limit twice)."""
        policy = self.policies[index]
        log.exception("policy %r failed on trace %s", policy.name, trace.trace_id.hex())
        self.metrics.policy_decisions.labels(policy.name, "error").inc()

    def _count(
        self,
        decided: int,
        kept_traces: int,
        kept_spans: int,
        dropped_spans: int,
        reason: str | None,
        verdict_rows: list[list[Decision | None]],
    ) -> None:
        # Counted once per batch: prometheus_client takes a lock per increment.
        if kept_traces:
            self._kept_traces.inc(kept_traces)
            self._kept_spans.inc(kept_spans)
        if decided > kept_traces:
            self._dropped_traces.inc(decided - kept_traces)
            self._dropped_spans.inc(dropped_spans)
        if reason is not None and decided:
            self.metrics.early_decisions.labels(reason).inc(decided)
        if reason in _UNEVALUATED:
            return
        for policy, column in zip(self.policies, zip(*verdict_rows, strict=True), strict=False):
            for verdict, count in Counter(column).items():
                # None: not evaluated (a drop or a first match ended it), or raised (counted then).
                if verdict is not None:
                    self.metrics.policy_decisions.labels(policy.name, verdict.value).inc(count)

    def _mark(self, policy_name: str, groups: list[SpanGroup]) -> list[SpanGroup]:
        return [(self._policy_scope(scope, policy_name), entries, count) for scope, entries, count in groups]

    def _policy_scope(self, scope: Scope, policy_name: str) -> Scope:
        """Record the keeping policy as the OTel Collector does: `tailsampling.policy` on the scope."""
        if not self.record_policy:
            return scope
        key = (scope, policy_name)
        marked = self._policy_scopes.get(key)
        if marked is None:
            if len(self._policy_scopes) >= _MAX_POLICY_SCOPES:
                self._policy_scopes.clear()
            marked = self._policy_scopes[key] = scope_with_attribute(
                scope, "tailsampling.policy", policy_name
            )
        return marked

    def forward_late(self, spans: list[LateSpan]) -> None:
        """Send late spans of kept traces straight to the exporters, marked as their trace was."""
        if not self.exporters:
            return
        adjusted, limits = self._adjusted, self._limits
        groups: list[SpanGroup] = []
        for (policy, probability), scope, payload, span in spans:
            if limits is not None:
                payload, span = limits.limit_span(payload, span)
            if adjusted is None:
                framed = span_prefix(len(payload)) + payload
            else:
                framed = adjusted.rewrite_span(payload, span, probability)
            groups.append((self._policy_scope(scope, policy), framed, 1))
        for exporter in self.exporters:
            exporter.export(groups, len(groups))

    def count_invalid(self, spans: int) -> None:
        self._invalid_spans.inc(spans)
        if self._invalid_log.allow():
            log.warning("left out %d spans of kept traces that are not valid OTLP", spans)

    def count_late(self, result: IngestResult) -> None:
        """Count what became of a request's late spans."""
        if result.late_kept:
            self._late_kept.inc(result.late_kept)
        if result.late_dropped:
            self._late_dropped.inc(result.late_dropped)
        if result.late_invalid:
            self.count_invalid(result.late_invalid)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            # One slice at a time, so that no popped trace is ever left undecided at an await.
            while due := self.buffer.pop_due(self.clock(), _DECIDE_SLICE):
                self.decide_safely(due)
                await asyncio.sleep(0)

    def decide_safely(self, traces: list[Trace], reason: str | None = None) -> None:
        """`decide`, logging instead of raising: the decider must outlive any one bad trace."""
        try:
            self.decide(traces, reason)
        except Exception:
            log.exception("deciding %d traces failed; their spans are lost", len(traces))
            self.metrics.decision_errors.inc(len(traces))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tailgate-decider")

    async def stop(self, deadline: float) -> None:
        """Stop the tick loop and decide everything still buffered.

        Slice by slice, each when the exporters have room for it, so that a full buffer is not
        refused by exporter queues sized for steady traffic; until `deadline` (monotonic clock).
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        remaining = self.buffer.pop_all()
        if self.drop_pending_on_shutdown:
            log.info("dropping %d buffered traces (drop_pending_traces_on_shutdown)", len(remaining))
            self.decide_safely(remaining, "shutdown_dropped")
            return
        # Half the smallest queue per chunk, so that deciding the next overlaps sending the last.
        capacity = min((exporter.capacity for exporter in self.exporters), default=0)
        for chunk in _chunks(remaining, _DECIDE_SLICE, capacity // 2):
            spans = sum(trace.span_count for trace in chunk)
            try:
                async with asyncio.timeout_at(_loop_time_at(deadline)):
                    await asyncio.gather(*(exporter.wait_for_room(spans) for exporter in self.exporters))
            except TimeoutError:
                pass  # out of time: decide anyway; what exporters refuse is counted as dropped
            self.decide_safely(chunk, "shutdown")


# Early-decision reasons that drop a trace without evaluating the policies.
_UNEVALUATED = frozenset({"maximum_trace_size_bytes", "shutdown_dropped"})


def _deciding_index(verdicts: list[Decision | None]) -> int | None:
    """Index of the policy that keeps the trace (see `deciding_policy`), None when it is not kept."""
    voters = [index for index, verdict in enumerate(verdicts) if verdict is not None]
    deciding = deciding_policy([verdict for verdict in verdicts if verdict is not None])
    return None if deciding is None else voters[deciding]


def attribute_keys(policies: Sequence[Policy]) -> frozenset[str]:
    """The attribute keys the buffer extracts at ingest for `policies`."""
    return frozenset().union(*(policy.attribute_keys for policy in policies))


def _is_drop(policy: Policy) -> bool:
    """Whether the policy can say DROPPED (`drop`, and `rules` with a drop rule): evaluated first, so that
    a drop holds whatever the others say, sample_on_first_match or not."""
    kind = getattr(policy, "type_name", None)
    return kind == "drop" or (
        kind == "rules" and any(rule.action == "drop" for rule in getattr(policy, "rules", ()))
    )


def _chunks(traces: list[Trace], max_traces: int, max_spans: int) -> list[list[Trace]]:
    """Consecutive runs of traces, each of at most `max_traces` traces and (unless one trace alone is
    larger) at most `max_spans` spans; `max_spans` 0 means no span limit."""
    chunks: list[list[Trace]] = []
    chunk: list[Trace] = []
    spans = 0
    for trace in traces:
        if chunk and (len(chunk) >= max_traces or (max_spans and spans + trace.span_count > max_spans)):
            chunks.append(chunk)
            chunk, spans = [], 0
        chunk.append(trace)
        spans += trace.span_count
    if chunk:
        chunks.append(chunk)
    return chunks


def _loop_time_at(deadline: float) -> float:
    """The event loop's clock value at `deadline` on the monotonic clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
