"""The `ottl_condition` policy: keeps traces with a span or span event matching an OTTL condition.

Tailgate reads the common subset of OTTL boolean conditions with its own small parser, compiled
once at config time; anything outside the subset is a config error quoting the expression.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import AfterValidator, Field, model_validator

from policies import conditions
from policies.base import Decision, ParamsModel, SpanRecord, SubPolicyBuilder, TraceView
from policies.conditions import ConditionError, Getter, Predicate
from sampler.logthrottle import LogThrottle

log = logging.getLogger(__name__)

ContextName = Literal["span", "spanevent"]


class EventRecord(NamedTuple):
    """A span event with the span it belongs to: what a `spanevent` condition reads."""

    event: Any
    record: SpanRecord


class _Unsupported(Exception):
    """An expression outside the supported subset; the message says why."""


class _Token(NamedTuple):
    kind: str
    text: str
    position: int


_TOKENS = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*")
    |(?P<bytes>0x[0-9a-fA-F]*)
    |(?P<float>\d*\.\d+(?:[eE][-+]?\d+)?)
    |(?P<int>\d+)
    |(?P<compare>==|!=|<=|>=|<|>)
    |(?P<punct>[-+*/()\[\],.{}])
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset({"and", "or", "not"})
_MIRRORED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)", re.DOTALL)
_ENUMS = {**conditions.SPAN_KINDS, **conditions.STATUS_CODES}
_NO_LITERAL = object()


def _tokens(text: str) -> Iterator[_Token]:
    position = 0
    while position < len(text):
        found = _TOKENS.match(text, position)
        if found is None:
            if text[position] == '"':
                raise _Unsupported(f"unterminated string at position {position}")
            raise _Unsupported(f"unexpected character {text[position]!r} at position {position}")
        kind = found.lastgroup
        assert kind is not None
        if kind != "space":
            yield _Token(kind, found.group(), position)
        position = found.end()


def _unquote(literal: str) -> str:
    """The value of a double-quoted OTTL string, with Go's escapes."""

    def replace(escape: re.Match[str]) -> str:
        code = escape.group(1)
        if code in _ESCAPES:
            return _ESCAPES[code]
        if code[0] in "xuU":
            return chr(int(code[1:], 16))
        if code[0] in "01234567" and len(code) == 3:
            return chr(int(code, 8))
        raise _Unsupported(f"unknown escape sequence \\{code} in string {literal}")

    return _ESCAPE.sub(replace, literal[1:-1])


@dataclass(frozen=True)
class _Paths:
    """The paths one OTTL context offers: plain fields, and maps indexed with a string key."""

    fields: Mapping[str, Getter[Any]]
    maps: Mapping[str, Callable[[str], Getter[Any]]]

    def resolve(self, path: str, keys: list[str]) -> Getter[Any]:
        if not keys:
            getter = self.fields.get(path)
            if getter is None:
                raise _Unsupported(f"unsupported path {path}")
            return getter
        attributes = self.maps.get(path)
        if attributes is None:
            raise _Unsupported(f"unsupported path {path}[...]")
        if len(keys) > 1:
            raise _Unsupported(f"nested keys are not supported ({path})")
        return attributes(keys[0])


def _span_paths() -> tuple[dict[str, Getter[SpanRecord]], dict[str, Callable[[str], Getter[SpanRecord]]]]:
    """Paths of OTTL's span context, each also under the context name (`span.name`)."""
    span_fields: dict[str, Getter[SpanRecord]] = {
        "name": lambda record: record.span.name,
        "kind": lambda record: record.span.kind,
        "status.code": lambda record: record.span.status.code,
        "status.message": lambda record: record.span.status.message,
        "start_time_unix_nano": lambda record: record.span.start_time_unix_nano,
        "end_time_unix_nano": lambda record: record.span.end_time_unix_nano,
        "trace_state": lambda record: record.span.trace_state,
        "dropped_attributes_count": lambda record: record.span.dropped_attributes_count,
        "dropped_events_count": lambda record: record.span.dropped_events_count,
        "dropped_links_count": lambda record: record.span.dropped_links_count,
    }
    fields = {**span_fields, **{f"span.{path}": getter for path, getter in span_fields.items()}}
    for scope in ("instrumentation_scope", "scope"):
        fields[f"{scope}.name"] = lambda record: record.scope.name
        fields[f"{scope}.version"] = lambda record: record.scope.version
    maps: dict[str, Callable[[str], Getter[SpanRecord]]] = {
        "attributes": conditions.span_attribute,
        "span.attributes": conditions.span_attribute,
        "resource.attributes": conditions.resource_attribute,
        "instrumentation_scope.attributes": conditions.scope_attribute,
        "scope.attributes": conditions.scope_attribute,
    }
    return fields, maps


def _on_record(getter: Getter[SpanRecord]) -> Getter[EventRecord]:
    return lambda context: getter(context.record)


def _on_record_map(attribute: Callable[[str], Getter[SpanRecord]]) -> Callable[[str], Getter[EventRecord]]:
    return lambda key: _on_record(attribute(key))


def _event_attribute(key: str) -> Getter[EventRecord]:
    return lambda context: conditions.attribute(context.event.attributes, key)


def _contexts() -> dict[str, _Paths]:
    span_fields, span_maps = _span_paths()
    event_fields: dict[str, Getter[EventRecord]] = {
        "name": lambda context: context.event.name,
        "time_unix_nano": lambda context: context.event.time_unix_nano,
        "dropped_attributes_count": lambda context: context.event.dropped_attributes_count,
    }
    # In the span event context `span.` names the event's span; plain names are the event's own.
    outer = ("span.", "resource.", "instrumentation_scope.", "scope.")
    fields = {path: _on_record(getter) for path, getter in span_fields.items() if path.startswith(outer)}
    fields.update(event_fields)
    fields.update({f"spanevent.{path}": getter for path, getter in event_fields.items()})
    maps = {
        path: _on_record_map(attribute) for path, attribute in span_maps.items() if path.startswith(outer)
    }
    maps["attributes"] = maps["spanevent.attributes"] = _event_attribute
    return {"span": _Paths(span_fields, span_maps), "spanevent": _Paths(fields, maps)}


_CONTEXTS = _contexts()


@dataclass(frozen=True)
class _Operand:
    """A compiled value: how to read it, its constant when it is one, its predicate when boolean."""

    get: Getter[Any]
    literal: object = _NO_LITERAL
    condition: Predicate[Any] | None = None


def _constant(value: object) -> _Operand:
    def get(context: Any) -> Any:
        return value

    return _Operand(get, value, get if type(value) is bool else None)


def _arithmetic(symbol: str, left: _Operand, right: _Operand) -> _Operand:
    """`left symbol right` on int64 or float64 values, as OTTL math expressions."""
    for side in (left, right):
        if side.literal is not _NO_LITERAL and type(side.literal) not in (int, float):
            raise _Unsupported(f"math on {side.literal!r} (only numbers)")
    read_left, read_right = left.get, right.get

    def compute(context: Any) -> object:
        a: Any = read_left(context)
        b: Any = read_right(context)
        kind = type(a)
        if kind is not type(b) or kind not in (int, float):
            raise ConditionError(f"cannot compute {a!r} {symbol} {b!r}: both must be int, or both float")
        if symbol == "+":
            return a + b
        if symbol == "-":
            return a - b
        if symbol == "*":
            return a * b
        if not b:
            raise ConditionError("division by zero")
        if kind is float:
            return a / b
        quotient = abs(a) // abs(b)  # Go's integer division truncates toward zero
        return quotient if (a < 0) == (b < 0) else -quotient

    return _Operand(compute)


class _Parser:
    """Recursive descent over the tokens of one condition; each rule returns compiled closures.

    condition  := or
    or         := and ("or" and)*
    and        := term ("and" term)*
    term       := "not" term | "(" condition ")" | comparison | boolean
    comparison := value ("==" | "!=" | "<" | "<=" | ">" | ">=") value
    value      := product (("+" | "-") product)*
    product    := factor (("*" | "/") factor)*
    factor     := literal | enum | path | IsMatch(value, "regex") | "(" value ")"
    """

    def __init__(self, text: str, paths: _Paths) -> None:
        self.tokens = list(_tokens(text))
        self.index = 0
        self.paths = paths

    def parse(self) -> Predicate[Any]:
        if not self.tokens:
            raise _Unsupported("empty condition")
        condition = self.disjunction()
        if self.index < len(self.tokens):
            raise self.unexpected()
        return condition

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def at(self, kind: str, *texts: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == kind and (not texts or token.text in texts)

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise _Unsupported("unexpected end of expression")
        self.index += 1
        return token

    def expect(self, kind: str, text: str) -> None:
        if not self.at(kind, text):
            raise self.unexpected(f"expected {text!r}")
        self.index += 1

    def unexpected(self, expected: str = "") -> _Unsupported:
        token = self.peek()
        where = "end of expression" if token is None else f"{token.text!r} at position {token.position}"
        return _Unsupported(f"{expected}, found {where}" if expected else f"unexpected {where}")

    def disjunction(self) -> Predicate[Any]:
        return self.joined(self.conjunction, "or", conditions.any_of)

    def conjunction(self) -> Predicate[Any]:
        return self.joined(self.term, "and", conditions.all_of)

    def joined(
        self,
        operand: Callable[[], Predicate[Any]],
        keyword: str,
        join: Callable[[list[Predicate[Any]]], Predicate[Any]],
    ) -> Predicate[Any]:
        terms = [operand()]
        while self.at("name", keyword):
            self.index += 1
            terms.append(operand())
        return join(terms)

    def term(self) -> Predicate[Any]:
        if self.at("name", "not"):
            self.index += 1
            return conditions.negate(self.term())
        if self.at("punct", "("):
            start = self.index
            try:
                self.index += 1
                group = self.disjunction()
                self.expect("punct", ")")
                if not (self.at("compare") or self.at("punct", "+", "-", "*", "/")):
                    return group
            except _Unsupported as problem:
                self.index = start
                try:
                    return self.boolean()
                except _Unsupported:
                    raise problem from None
            # A parenthesised value, as in (end_time_unix_nano - start_time_unix_nano) > 0.
            self.index = start
        return self.boolean()

    def boolean(self) -> Predicate[Any]:
        left = self.value()
        if not self.at("compare"):
            if left.condition is not None:
                return left.condition
            raise self.unexpected("expected a comparison operator")
        op = self.take().text
        right = self.value()
        if right.literal is not _NO_LITERAL:
            if left.literal is not _NO_LITERAL:
                result = conditions.compare(op, left.literal, right.literal)
                return lambda context: result
            return conditions.comparison(left.get, op, right.literal)
        if left.literal is not _NO_LITERAL:
            return conditions.comparison(right.get, _MIRRORED[op], left.literal)
        return conditions.values_comparison(left.get, op, right.get)

    def value(self) -> _Operand:
        return self.arithmetic(self.product, "+", "-")

    def product(self) -> _Operand:
        return self.arithmetic(self.factor, "*", "/")

    def arithmetic(self, operand: Callable[[], _Operand], *symbols: str) -> _Operand:
        left = operand()
        while self.at("punct", *symbols):
            symbol = self.take().text
            left = _arithmetic(symbol, left, operand())
        return left

    def factor(self) -> _Operand:
        token = self.take()
        kind, text = token.kind, token.text
        if kind == "punct" and text in ("+", "-") and (self.at("int") or self.at("float")):
            number = self.take()
            signed = text + number.text
            return _constant(_int64(signed) if number.kind == "int" else float(signed))
        if kind == "string":
            return _constant(_unquote(text))
        if kind == "int":
            return _constant(_int64(text))
        if kind == "float":
            return _constant(float(text))
        if kind == "bytes":
            raise _Unsupported(f"byte literals are not supported ({text})")
        if kind == "punct" and text == "(":
            inner = self.value()
            self.expect("punct", ")")
            return inner
        if kind != "name" or text in _KEYWORDS:
            self.index -= 1
            raise self.unexpected("expected a value")
        if text in ("true", "false"):
            return _constant(text == "true")
        if text == "nil":
            return _constant(None)
        if self.at("punct", "("):
            return self.function(text)
        if text[0].isupper():
            if text not in _ENUMS:
                raise _Unsupported(f"unknown enum {text}")
            return _constant(_ENUMS[text])
        return self.path(text)

    def path(self, first: str) -> _Operand:
        parts = [first]
        while self.at("punct", "."):
            self.index += 1
            token = self.take()
            if token.kind != "name":
                raise _Unsupported(f"unexpected {token.text!r} in path at position {token.position}")
            parts.append(token.text)
        keys: list[str] = []
        while self.at("punct", "["):
            self.index += 1
            token = self.take()
            if token.kind != "string":
                raise _Unsupported(f"only string keys are supported, found {token.text!r}")
            keys.append(_unquote(token.text))
            self.expect("punct", "]")
        return _Operand(self.paths.resolve(".".join(parts), keys))

    def function(self, name: str) -> _Operand:
        if name != "IsMatch":
            raise _Unsupported(f"unknown function {name}")
        self.expect("punct", "(")
        target = self.value()
        self.expect("punct", ",")
        pattern = self.take()
        if pattern.kind != "string":
            raise _Unsupported("IsMatch takes a string literal as its pattern")
        self.expect("punct", ")")
        if self.at("punct", "["):
            raise _Unsupported("IsMatch returns a bool and cannot be indexed")
        try:
            compiled = conditions.compile_pattern(_unquote(pattern.text))
        except ValueError as error:
            raise _Unsupported(f"IsMatch: {error}") from None
        check = conditions.matches(target.get, compiled, scalars=True)
        return _Operand(check, condition=check)


def _int64(text: str) -> int:
    """An integer literal: OTTL's are 64-bit, as the values spans hold."""
    try:
        return conditions.int64(int(text))
    except ValueError as error:
        raise _Unsupported(str(error)) from None


def compile_condition(text: str, context: ContextName) -> Predicate[Any]:
    """One OTTL boolean condition as a predicate over a SpanRecord (`span`) or EventRecord
    (`spanevent`); ValueError quoting the expression when it is outside the supported subset.
    """
    try:
        return _Parser(text, _CONTEXTS[context]).parse()
    except _Unsupported as problem:
        raise ValueError(f"unsupported OTTL expression '{text}': {problem}") from None


def _span_condition(text: str) -> str:
    compile_condition(text, "span")
    return text


def _event_condition(text: str) -> str:
    compile_condition(text, "spanevent")
    return text


class OttlConditionParams(ParamsModel):
    error_mode: Literal["propagate", "ignore", "silent"] = "propagate"
    span: list[Annotated[str, AfterValidator(_span_condition)]] = Field(default_factory=list)
    spanevent: list[Annotated[str, AfterValidator(_event_condition)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_condition(self) -> OttlConditionParams:
        if not self.span and not self.spanevent:
            raise ValueError("expected at least one OTTL condition in span or spanevent")
        return self


class OttlCondition:
    """Samples a trace when any span meets any `span` condition, or any span event any `spanevent`
    condition, as in the OTel Collector; otherwise NOT_SAMPLED.

    Supported: paths `name`, `kind`, `status.code`, `status.message`, `start_time_unix_nano`,
    `end_time_unix_nano`, `trace_state`, the `dropped_*_count`s, `attributes["k"]`,
    `resource.attributes["k"]`, `instrumentation_scope.name|version|attributes["k"]` (also
    spelled with the context names `span.` and `scope.`); in `spanevent` conditions `name`,
    `time_unix_nano` and `attributes["k"]` are the event's and `span.*` its span's. Literals:
    strings, ints, floats, true, false, nil, the SPAN_KIND_* and STATUS_CODE_* enums; operators
    == != < <= > >=, math + - * /, and, or, not, parentheses, and the IsMatch converter.
    Comparisons follow OTTL's rules (see conditions.compare).

    An evaluation error (math on a missing or mismatched value) fails the policy for the trace with
    `error_mode: propagate` (the Collector's default); with `ignore` (logged) or `silent` the
    condition counts as false for that span and evaluation goes on.
    """

    type_name: ClassVar[str] = "ottl_condition"
    Params: ClassVar[type[ParamsModel]] = OttlConditionParams

    def __init__(self, name: str, params: OttlConditionParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.error_mode = params.error_mode
        self._throttle = LogThrottle()
        self._span_match = self._compile(params.span, "span")
        self._event_match = self._compile(params.spanevent, "spanevent")

    def _compile(self, texts: list[str], context: ContextName) -> Predicate[Any] | None:
        if not texts:
            return None
        compiled = [compile_condition(text, context) for text in texts]
        if self.error_mode == "propagate":
            return conditions.any_of(compiled)
        return conditions.any_of(
            [self._guarded(text, check) for text, check in zip(texts, compiled, strict=True)]
        )

    def _guarded(self, text: str, check: Predicate[Any]) -> Predicate[Any]:
        """`check`, with an evaluation error counting as false (logged unless error_mode is silent)."""
        silent = self.error_mode == "silent"

        def guarded(context: Any) -> bool:
            try:
                return check(context)
            except ConditionError as error:
                if not silent and self._throttle.allow():
                    log.warning("policy %r: OTTL condition '%s' failed: %s", self.name, text, error)
                return False

        return guarded

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        span_match, event_match = self._span_match, self._event_match
        for record in trace.spans():
            if span_match is not None and span_match(record):
                return Decision.SAMPLED
            if event_match is not None:
                for event in record.span.events:
                    if event_match(EventRecord(event, record)):
                        return Decision.SAMPLED
        return Decision.NOT_SAMPLED
