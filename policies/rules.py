"""The `rules` policy: Refinery-style ordered rules; the first that matches keeps, drops or samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from policies import conditions
from policies.base import Decision, ParamsModel, SpanRecord, SubPolicyBuilder, TraceView
from policies.conditions import Getter, Predicate
from policies.probabilistic import calculate_threshold, fnv1a_64

Operator = Literal[
    "=", "!=", ">", ">=", "<", "<=", "contains", "starts-with", "exists", "not-exists", "matches"
]
Scalar = str | bool | int | float

_COMPARISONS = {"=": "==", "!=": "!=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}
_TEXT_OPERATORS = frozenset({"contains", "starts-with", "matches"})
_PRESENCE_OPERATORS = frozenset({"exists", "not-exists"})
_KINDS = {name.removeprefix("SPAN_KIND_").lower(): value for name, value in conditions.SPAN_KINDS.items()}
_STATUSES = {
    name.removeprefix("STATUS_CODE_").lower(): value for name, value in conditions.STATUS_CODES.items()
}
FIELDS_HELP = "name, kind, status, duration_ms, attributes.<key> or resource.<key>"


def _text_or_none(value: str) -> str | None:
    return value or None


def _duration_ms(record: SpanRecord) -> float | None:
    span = record.span
    if not span.start_time_unix_nano or not span.end_time_unix_nano:
        return None
    return (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6


_BUILTIN_FIELDS: dict[str, Getter[SpanRecord]] = {
    "name": lambda record: _text_or_none(record.span.name),
    "kind": lambda record: record.span.kind,
    "status": lambda record: record.span.status.code,
    "duration_ms": _duration_ms,
}
# Fields whose values are OTLP enums, and the names a rule may give them by.
_ENUM_FIELDS = {"kind": _KINDS, "status": _STATUSES}


def field_getter(field: str) -> Getter[SpanRecord]:
    """The accessor of a rule field; ValueError naming the known fields when there is none."""
    if field in _BUILTIN_FIELDS:
        return _BUILTIN_FIELDS[field]
    prefix, _, key = field.partition(".")
    if key and prefix == "attributes":
        return conditions.span_attribute(key)
    if key and prefix == "resource":
        return conditions.resource_attribute(key)
    raise ValueError(f"unknown field {field!r} (known: {FIELDS_HELP})")


def _enum_value(field: str, value: object) -> int:
    """A kind or status given by name (server, SPAN_KIND_SERVER, error, ...) or number."""
    names = _ENUM_FIELDS[field]
    if type(value) is int:
        return value
    if isinstance(value, str):
        short = value.lower().removeprefix("span_kind_").removeprefix("status_code_")
        if short in names:
            return names[short]
    raise ValueError(f"{field} must be one of {', '.join(names)} (or its number), not {value!r}")


def _scalar(value: object) -> object:
    if value is not None and not isinstance(value, Scalar):
        raise ValueError("must be a string, a number or a boolean")
    return value


class RuleCondition(ParamsModel):
    field: str
    operator: Operator
    value: Annotated[Scalar | None, BeforeValidator(_scalar)] = None

    @field_validator("field")
    @classmethod
    def _known_field(cls, field: str) -> str:
        field_getter(field)
        return field

    @model_validator(mode="after")
    def _value_fits_operator(self) -> RuleCondition:
        compile_condition(self)
        return self


def compile_condition(condition: RuleCondition) -> Predicate[SpanRecord]:
    """One condition as a predicate over a span; ValueError when operator and value do not fit.

    A missing field fails every operator but not-exists.
    """
    op, value, field = condition.operator, condition.value, condition.field
    getter = field_getter(field)
    has_value = "value" in condition.model_fields_set
    if op in _PRESENCE_OPERATORS:
        if has_value:
            raise ValueError(f"operator {op} takes no value")
        return conditions.exists(getter) if op == "exists" else conditions.not_exists(getter)
    if not has_value or value is None:
        raise ValueError(f"operator {op} needs a value")
    if op in _TEXT_OPERATORS:
        if field in _ENUM_FIELDS or field == "duration_ms" or not isinstance(value, str):
            raise ValueError(f"operator {op} compares strings: it needs a string field and a string value")
        if op == "contains":
            return conditions.contains(getter, value)
        if op == "starts-with":
            return conditions.starts_with(getter, value)
        return conditions.matches(getter, conditions.compile_pattern(value))
    if field in _ENUM_FIELDS:
        value = _enum_value(field, value)
    elif field == "duration_ms" and type(value) not in (int, float):
        raise ValueError(f"duration_ms compares with a number, not {value!r}")
    present = conditions.comparison(getter, _COMPARISONS[op], value)
    if op == "!=":
        # Unlike OTTL's nil != "x", a rule on a missing field does not match.
        return lambda record: getter(record) is not None and present(record)
    return present


class Rule(ParamsModel):
    name: str = ""
    conditions: list[RuleCondition] = Field(default_factory=list)
    scope: Literal["span", "root"] = "span"
    action: Literal["keep", "drop", "sample"]
    sample_rate: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _rate_goes_with_sample(self) -> Rule:
        if self.action == "sample" and self.sample_rate is None:
            raise ValueError("action sample needs sample_rate (keep 1 trace in sample_rate)")
        if self.action != "sample" and self.sample_rate is not None:
            raise ValueError(f"sample_rate applies to action sample, not {self.action}")
        return self


class RulesParams(ParamsModel):
    rules: list[Rule] = Field(min_length=1)


@dataclass(frozen=True)
class _CompiledRule:
    """A rule ready to run: its span predicate, scope and verdict."""

    action: str
    scope: str
    span_match: Predicate[SpanRecord] | None  # None: no conditions, the rule matches every trace
    sample_rate: int
    threshold: int
    salt_state: int

    def decide(self, trace_id: bytes) -> Decision:
        if self.action == "keep":
            return Decision.SAMPLED
        if self.action == "drop":
            return Decision.DROPPED
        if fnv1a_64(trace_id, self.salt_state) <= self.threshold:
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED


class Rules:
    """Refinery-style rules, tried in order; the first rule that matches decides the trace.

    A rule matches when its conditions all hold on one span (scope `span`, the default) or on the
    root span (scope `root`: a span whose parent span id is empty or all zeros); a rule without
    conditions matches every trace, as a final catch-all. Its action `keep` gives SAMPLED, `drop`
    gives DROPPED (the trace is dropped whatever other policies say), and `sample` keeps 1 trace in
    `sample_rate` by hashing the trace id (FNV-1a 64, salted with the policy and rule name), so
    every node keeps the same traces, otherwise NOT_SAMPLED. When no rule matches: NOT_SAMPLED.

    Fields: `name`, `kind` (server, SPAN_KIND_SERVER or 2), `status` (ok, error, unset,
    STATUS_CODE_* or 0-2), `duration_ms` (of the span), `attributes.<key>` (span attribute) and
    `resource.<key>` (resource attribute). Values compare by OTTL's rules: numbers as numbers,
    strings with strings, booleans with booleans, other pairings are unequal.
    """

    type_name: ClassVar[str] = "rules"
    Params: ClassVar[type[ParamsModel]] = RulesParams

    def __init__(self, name: str, params: RulesParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.rules = tuple(self._compile(index, rule) for index, rule in enumerate(params.rules))
        self._last: tuple[bytes, _CompiledRule | None] | None = None

    def _compile(self, index: int, rule: Rule) -> _CompiledRule:
        predicates = [compile_condition(condition) for condition in rule.conditions]
        rate = rule.sample_rate or 1
        salt = f"{self.name}/{rule.name or index}"
        return _CompiledRule(
            action=rule.action,
            scope=rule.scope,
            span_match=conditions.all_of(predicates) if predicates else None,
            sample_rate=rate,
            threshold=calculate_threshold(1 / rate),
            salt_state=fnv1a_64(salt.encode()),
        )

    def first_match(self, trace: TraceView) -> _CompiledRule | None:
        """The first rule that matches the trace; spans are parsed only when a rule needs them."""
        spans: Sequence[SpanRecord] | None = None
        roots: Sequence[SpanRecord] | None = None
        for rule in self.rules:
            span_match = rule.span_match
            if span_match is None:
                return rule
            if spans is None:
                spans = trace.spans()
            if rule.scope == "root":
                if roots is None:
                    roots = conditions.root_spans(spans)
                candidates = roots
            else:
                candidates = spans
            if any(span_match(record) for record in candidates):
                return rule
        return None

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        rule = self.first_match(trace)
        self._last = (trace.trace_id, rule)
        return Decision.NOT_SAMPLED if rule is None else rule.decide(trace.trace_id)

    def keep_probability(self, trace: TraceView) -> float:
        """1/sample_rate when a `sample` rule kept the trace, else 1."""
        last = self._last
        rule = last[1] if last is not None and last[0] == trace.trace_id else self.first_match(trace)
        if rule is None or rule.action != "sample":
            return 1.0
        return 1 / rule.sample_rate
