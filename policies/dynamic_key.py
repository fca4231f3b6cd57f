"""The sample key of a trace for the dynamic samplers: the values of the configured `key_fields`.

A field is one of:
- `status`: the trace's status, `ERROR` if any span has status ERROR, else `OK` if any has OK, else
  `UNSET` (from the trace summary: cheap);
- `name`: the names of the trace's spans (parses the spans);
- `root.<field>`: `<field>` read on the root span alone: `root.name` its name, `root.status` its
  status code, `root.<attribute>` the attribute on the root span, else on its resource (parses the
  spans; nothing when the root span has not arrived);
- anything else: an attribute key, every value it has on any span or resource of the trace (extracted
  at ingest: cheap). Attributes named `status` or `name`, or starting with `root.`, are thus out of
  reach, as in Refinery, where span fields and attributes share one namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from policies.base import STATUS_ERROR, STATUS_OK, STATUS_UNSET, AttributeValue, SpanRecord, TraceView

ROOT_PREFIX = "root."
STATUS_FIELD = "status"
NAME_FIELD = "name"
# As Refinery: a key stops growing at this many values, which only a field of runaway cardinality
# reaches (every trace would then be a key of its own anyway).
MAX_KEY_VALUES = 100

_SCALAR_KINDS = frozenset({"string_value", "int_value", "double_value", "bool_value"})
_STATUS_NAMES = {
    Status.STATUS_CODE_UNSET: "UNSET",
    Status.STATUS_CODE_OK: "OK",
    Status.STATUS_CODE_ERROR: "ERROR",
}

# Reads one field's values from a trace and (when it has arrived) its root span.
Extractor = Callable[[TraceView, SpanRecord | None], Iterable[AttributeValue]]


class KeyBuilder:
    """Builds the key string of a trace from its field values, cheaply where the summary suffices."""

    def __init__(self, fields: Sequence[str], use_trace_length: bool) -> None:
        self.fields = tuple(dict.fromkeys(fields))
        self.use_trace_length = use_trace_length
        self.attribute_keys = frozenset(field for field in self.fields if _is_attribute(field))
        self.needs_root = any(field.startswith(ROOT_PREFIX) for field in self.fields)
        self._extractors = [_extractor(field) for field in self.fields]

    def key(self, trace: TraceView) -> str:
        """Per field, its distinct values sorted, each followed by `•`; fields end with `,`.

        With `use_trace_length` the span count follows. A key is never empty.
        """
        root = root_span(trace.spans()) if self.needs_root else None
        parts: list[str] = []
        budget = MAX_KEY_VALUES
        for extract in self._extractors:
            values = sorted({_text(value) for value in extract(trace, root)})[:budget]
            budget -= len(values)
            parts.extend(f"{value}•" for value in values)
            parts.append(",")
        if self.use_trace_length:
            parts.append(str(trace.span_count))
        return "".join(parts) or ","


def root_span(records: Sequence[SpanRecord]) -> SpanRecord | None:
    """The first span without a parent (an empty or all-zero parent span id), if any."""
    for record in records:
        if not any(record.span.parent_span_id):
            return record
    return None


def _is_attribute(field: str) -> bool:
    return field not in (STATUS_FIELD, NAME_FIELD) and not field.startswith(ROOT_PREFIX)


def _extractor(field: str) -> Extractor:
    if field == STATUS_FIELD:
        return _trace_status
    if field == NAME_FIELD:
        return _span_names
    if field.startswith(ROOT_PREFIX):
        return _root_extractor(field.removeprefix(ROOT_PREFIX))

    def attribute(trace: TraceView, root: SpanRecord | None) -> Iterable[AttributeValue]:
        return trace.attribute_values(field)

    return attribute


def _root_extractor(field: str) -> Extractor:
    def read_root(trace: TraceView, root: SpanRecord | None) -> Iterable[AttributeValue]:
        if root is None:
            return ()
        if field == NAME_FIELD:
            return (root.span.name,)
        if field == STATUS_FIELD:
            return (_STATUS_NAMES.get(root.span.status.code, "UNSET"),)
        value = _find(root.span.attributes, field)
        if value is None:
            value = _find(root.resource.attributes, field)
        return () if value is None else (value,)

    return read_root


def _trace_status(trace: TraceView, root: SpanRecord | None) -> Iterable[AttributeValue]:
    codes = trace.status_codes
    for bit, name in ((STATUS_ERROR, "ERROR"), (STATUS_OK, "OK"), (STATUS_UNSET, "UNSET")):
        if codes & bit:
            return (name,)
    return ()


def _span_names(trace: TraceView, root: SpanRecord | None) -> Iterable[AttributeValue]:
    return [record.span.name for record in trace.spans()]


def _find(attributes: Iterable[KeyValue], key: str) -> AttributeValue | None:
    """The scalar value of the first attribute named `key`; None when absent or not a scalar."""
    for attribute in attributes:
        if attribute.key == key:
            return _scalar_value(attribute.value)
    return None


def _scalar_value(value: AnyValue) -> AttributeValue | None:
    kind = value.WhichOneof("value")
    if kind in _SCALAR_KINDS:
        scalar: AttributeValue = getattr(value, kind)
        return scalar
    return None


def _text(value: AttributeValue) -> str:
    """A value as it appears in a key; booleans as `true`/`false`, as in Refinery's keys."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
