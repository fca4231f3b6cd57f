"""The `composite` policy: sub-policies in order, each with its share of a spans-per-second budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from policies.base import Decision, ParamsModel, Policy, SubPolicyBuilder, TraceView, build_sub_policies

_SAMPLING = frozenset({Decision.SAMPLED, Decision.INVERT_SAMPLED})


class RateAllocation(ParamsModel):
    policy: str = Field(min_length=1)
    # 0 gives the sub-policy an equal share, as in the OTel Collector.
    percent: int = Field(ge=0, le=100)


def _problem(loc: tuple[str | int, ...], message: str, value: object) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)


class CompositeParams(ParamsModel):
    max_total_spans_per_second: int = Field(gt=0)
    # Items are checked by the registry as each sub-policy is built, with their own key paths.
    composite_sub_policy: list[Any] = Field(min_length=1)
    policy_order: list[str] | None = Field(default=None, min_length=1)
    rate_allocation: list[RateAllocation] = Field(default_factory=list)
    spill_unused_budget: bool = False

    def sub_policy_names(self) -> list[str | None]:
        """Each sub-policy's name, None where it has none (the registry reports that)."""
        names = [spec.get("name") if isinstance(spec, dict) else None for spec in self.composite_sub_policy]
        return [name if isinstance(name, str) and name else None for name in names]

    @model_validator(mode="after")
    def _names_and_percents(self) -> CompositeParams:
        names = self.sub_policy_names()
        known = {name for name in names if name is not None}
        listing = ", ".join(name for name in names if name is not None)
        problems: list[InitErrorDetails] = []
        if self.policy_order is not None:
            seen: set[str] = set()
            for index, name in enumerate(self.policy_order):
                if name not in known:
                    problems.append(
                        _problem(
                            ("policy_order", index), f"unknown sub-policy {name!r} (known: {listing})", name
                        )
                    )
                elif name in seen:
                    problems.append(_problem(("policy_order", index), f"{name!r} is listed twice", name))
                seen.add(name)
            missing = [name for name in names if name is not None and name not in seen]
            if missing:
                message = f"must list every sub-policy; missing {', '.join(map(repr, missing))}"
                problems.append(_problem(("policy_order",), message, self.policy_order))
        allocated: set[str] = set()
        for index, allocation in enumerate(self.rate_allocation):
            loc = ("rate_allocation", index, "policy")
            if allocation.policy not in known:
                message = f"unknown sub-policy {allocation.policy!r} (known: {listing})"
                problems.append(_problem(loc, message, allocation.policy))
            elif allocation.policy in allocated:
                message = f"{allocation.policy!r} has more than one allocation"
                problems.append(_problem(loc, message, allocation.policy))
            allocated.add(allocation.policy)
        total = sum(allocation.percent for allocation in self.rate_allocation)
        if total > 100:
            message = f"percents add up to {total}, more than 100"
            problems.append(_problem(("rate_allocation",), message, total))
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self


def allocations(params: CompositeParams) -> dict[str, int]:
    """Spans per second for each named sub-policy.

    A sub-policy gets `percent` of the total, truncated to whole spans, as in the Collector; one with
    percent 0 gets an equal share (total / number of sub-policies), as there, and so does one without an
    allocation, which the Collector gives no budget at all (it never keeps a trace).
    """
    total = params.max_total_spans_per_second
    names = [name for name in params.sub_policy_names() if name is not None]
    shares = {name: int(total / len(params.composite_sub_policy)) for name in names}
    for allocation in params.rate_allocation:
        if allocation.percent > 0:
            shares[allocation.policy] = int(allocation.percent / 100 * total)
    return shares


class Composite:
    """Sub-policies tried in `policy_order`; the first to sample the trace decides it.

    That sub-policy's verdict stands if the trace's spans still fit its budget for the current
    whole second of the decider's clock (and the total, `max_total_spans_per_second`): SAMPLED,
    and its spans are counted; if they do not fit, NOT_SAMPLED, without trying later sub-policies,
    as in the OTel Collector. INVERT_SAMPLED counts as sampling; other verdicts pass to the next
    sub-policy. The result is SAMPLED or NOT_SAMPLED.

    With `spill_unused_budget`, what an earlier sub-policy in `policy_order` has not used of its
    budget this second is open to the later ones: a sub-policy may keep a trace when, for itself
    and every sub-policy after it, the spans kept by it and those before it stay within their
    budgets added up. Budget flows down the order only, and never beyond the total.

    Keeps are rate-limited, not drawn with a known probability, so this policy is not Weighted:
    a trace it keeps counts with probability 1.
    """

    type_name: ClassVar[str] = "composite"
    Params: ClassVar[type[ParamsModel]] = CompositeParams

    def __init__(self, name: str, params: CompositeParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        built = build_sub_policies(params.composite_sub_policy, "composite_sub_policy", build_sub)
        subs = {sub.name: sub for sub in built}
        order = params.policy_order or list(subs)
        shares = allocations(params)
        self.sub_policies: tuple[Policy, ...] = tuple(subs[name] for name in order)
        self.budgets: tuple[int, ...] = tuple(shares[name] for name in order)
        self.max_total_spans_per_second = params.max_total_spans_per_second
        self.spill_unused_budget = params.spill_unused_budget
        self.attribute_keys = frozenset().union(*(sub.attribute_keys for sub in self.sub_policies))
        self._second: int | None = None
        self._used = [0] * len(self.sub_policies)
        self._total = 0

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        second = int(now)
        if second != self._second:
            self._second = second
            self._used = [0] * len(self.sub_policies)
            self._total = 0
        for index, sub in enumerate(self.sub_policies):
            if sub.evaluate(trace, now) in _SAMPLING:
                spans = trace.span_count
                if not self._fits(index, spans):
                    return Decision.NOT_SAMPLED
                self._used[index] += spans
                self._total += spans
                return Decision.SAMPLED
        return Decision.NOT_SAMPLED

    def _fits(self, index: int, spans: int) -> bool:
        if self._total + spans > self.max_total_spans_per_second:
            return False
        if not self.spill_unused_budget:
            return self._used[index] + spans <= self.budgets[index]
        return _fits_spilled(self.budgets, self._used, index, spans)


def _fits_spilled(budgets: Sequence[int], used: Sequence[int], index: int, spans: int) -> bool:
    """Whether `spans` more for sub-policy `index` keep every prefix of the order, from `index` on,
    within the budgets of that prefix added up."""
    budget = kept = 0
    for position, (share, taken) in enumerate(zip(budgets, used, strict=True)):
        budget += share
        kept += taken
        if position >= index and kept + spans > budget:
            return False
    return True
