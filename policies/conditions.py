"""The condition engine of `ottl_condition` and `rules`: field accessors over parsed spans and the
operators that compare their values, each compiled once at config time to a small closure.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from policies import re2
from policies.base import SpanRecord
from sampler.errors import TailgateError

Context = TypeVar("Context")
# A field's value on one span (or span event): str, bool, int, float, bytes, None when absent, or
# an OTLP AnyValue message for array and map attribute values.
Getter = Callable[[Context], object]
Predicate = Callable[[Context], bool]

# OTLP enum values by their proto names, as OTTL spells them.
SPAN_KINDS = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
STATUS_CODES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}

COMPARISON_OPERATORS = ("==", "!=", "<", "<=", ">", ">=")
_ORDERINGS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_NUMBERS = (int, float)


class ConditionError(TailgateError):
    """A condition cannot be evaluated on a span, e.g. arithmetic on a missing attribute."""


def any_value(value: Any) -> object:
    """An OTLP AnyValue as a Python value: scalars mapped, arrays and maps left as the message."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value" or kind == "kvlist_value":
        return value
    return getattr(value, kind)


def attribute(attributes: Iterable[Any], key: str) -> object:
    """The value of `key` among OTLP KeyValues, None when absent."""
    for pair in attributes:
        if pair.key == key:
            return any_value(pair.value)
    return None


def span_attribute(key: str) -> Getter[SpanRecord]:
    return lambda record: attribute(record.span.attributes, key)


def resource_attribute(key: str) -> Getter[SpanRecord]:
    return lambda record: attribute(record.resource.attributes, key)


def scope_attribute(key: str) -> Getter[SpanRecord]:
    return lambda record: attribute(record.scope.attributes, key)


def is_root(record: SpanRecord) -> bool:
    """Whether the span has no parent: an empty or all-zero parent span id."""
    return not any(record.span.parent_span_id)


def root_spans(records: Sequence[SpanRecord]) -> list[SpanRecord]:
    return [record for record in records if is_root(record)]


def _kind_of(value: object) -> type | None:
    """The comparison class of a value: bool, a number, str, bytes, None, or the object's own type."""
    kind = type(value)
    if kind is int or kind is float:
        return float
    return None if value is None else kind


def compare(op: str, left: object, right: object) -> bool:
    """`left op right` by OTTL's comparison rules.

    Integers and floats compare as numbers, strings and bytes by their code points, false < true;
    nil equals only nil (and then also satisfies <= and >=); values of different kinds are only
    ever "!=". Arrays and maps support just == and !=.
    """
    left_kind, right_kind = _kind_of(left), _kind_of(right)
    if left_kind is not right_kind:
        return op == "!="
    if left_kind is None:
        return op in ("==", "<=", ">=")
    if op == "==":
        return _equal(left, right)
    if op == "!=":
        return not _equal(left, right)
    if left_kind in (float, str, bool, bytes):
        if type(left) is not type(right):
            return _ORDERINGS[op](float(left), float(right))  # type: ignore[arg-type]
        return _ORDERINGS[op](left, right)
    return False


def _equal(left: object, right: object) -> bool:
    if type(left) is not type(right) and isinstance(left, _NUMBERS):
        return float(left) == float(right)  # type: ignore[arg-type]
    return left == right


def int64(value: int) -> int:
    """An integer literal as OTTL and OTLP's int_value have them: ValueError when it is wider than 64 bits
    (not a value a span can hold or compare)."""
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"integer {value} is out of the 64-bit range")
    return value


def comparison(getter: Getter[Context], op: str, literal: object) -> Predicate[Context]:
    """`getter op literal` as a predicate, the literal's kind resolved once."""
    if op not in COMPARISON_OPERATORS:
        raise ValueError(f"unknown comparison operator {op!r}")
    literal_type = type(literal)
    if literal_type is int:
        int64(literal)  # type: ignore[arg-type]
    if op == "==" and literal_type is str:

        def equal_text(context: Context) -> bool:
            value = getter(context)
            return type(value) is str and value == literal

        return equal_text
    if op in _ORDERINGS and literal_type in _NUMBERS:
        order = _ORDERINGS[op]
        as_float = float(literal)  # type: ignore[arg-type]

        def numeric(context: Context) -> bool:
            value = getter(context)
            kind = type(value)
            if kind is literal_type:
                return order(value, literal)
            return kind in _NUMBERS and order(float(value), as_float)  # type: ignore[arg-type]

        return numeric
    return lambda context: compare(op, getter(context), literal)


def values_comparison(left: Getter[Context], op: str, right: Getter[Context]) -> Predicate[Context]:
    """`left op right` with both sides read from the span."""
    return lambda context: compare(op, left(context), right(context))


def contains(getter: Getter[Context], text: str) -> Predicate[Context]:
    def check(context: Context) -> bool:
        value = getter(context)
        return type(value) is str and text in value

    return check


def starts_with(getter: Getter[Context], prefix: str) -> Predicate[Context]:
    def check(context: Context) -> bool:
        value = getter(context)
        return type(value) is str and value.startswith(prefix)

    return check


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """An RE2 regular expression (as OTTL and Refinery read them), with the error a config message can
    quote."""
    try:
        return re.compile(re2.translate(pattern))
    except (re.error, ValueError) as error:
        raise ValueError(f"not a valid regular expression {pattern!r}: {error}") from None


def matches(
    getter: Getter[Context], pattern: re.Pattern[str], *, scalars: bool = False
) -> Predicate[Context]:
    """Whether the value matches `pattern` anywhere (unanchored, as Go's MatchString).

    Strings are searched; with `scalars`, integers, floats and booleans are searched in their
    string form, as OTTL's IsMatch converts them.
    """
    search = pattern.search

    def check(context: Context) -> bool:
        value = getter(context)
        if type(value) is not str:
            if not scalars:
                return False
            value = scalar_text(value)
            if value is None:
                return False
        return search(value) is not None

    return check


def scalar_text(value: object) -> str | None:
    """A bool, int or float as Go's strconv formats it (true, 42, 0.5, 1000000), else None."""
    kind = type(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        number = float(value)  # type: ignore[arg-type]
        if number != number or number in (float("inf"), float("-inf")):
            return {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}[str(number)]
        return format(Decimal(repr(number)), "f")
    return None


def exists(getter: Getter[Context]) -> Predicate[Context]:
    return lambda context: getter(context) is not None


def not_exists(getter: Getter[Context]) -> Predicate[Context]:
    return lambda context: getter(context) is None


def all_of(predicates: Sequence[Predicate[Context]]) -> Predicate[Context]:
    """True when every predicate holds, stopping at the first that does not."""
    return _joined(predicates, all)


def any_of(predicates: Sequence[Predicate[Context]]) -> Predicate[Context]:
    """True when some predicate holds, stopping at the first that does."""
    return _joined(predicates, any)


def _joined(
    predicates: Sequence[Predicate[Context]], join: Callable[[Iterable[bool]], bool]
) -> Predicate[Context]:
    if len(predicates) == 1:
        return predicates[0]
    checks = tuple(predicates)
    return lambda context: join(check(context) for check in checks)


def negate(predicate: Predicate[Context]) -> Predicate[Context]:
    return lambda context: not predicate(context)
