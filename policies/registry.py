"""Maps config `type:` names to policy classes (built-ins and `tailgate.policies` plugins) and
builds policies from the `tail_sampling.policies` list, every error naming its key path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from policies.always_sample import AlwaysSample
from policies.and_policy import And
from policies.base import ParamsModel, Policy, PolicyType, SubPolicyBuilder
from policies.boolean_attribute import BooleanAttribute
from policies.bytes_limiting import BytesLimiting
from policies.composite import Composite
from policies.drop_policy import Drop
from policies.dynamic import Dynamic, EMADynamic, Throughput
from policies.latency import Latency
from policies.not_policy import Not
from policies.numeric_attribute import NumericAttribute
from policies.ottl_condition import OttlCondition
from policies.probabilistic import Probabilistic
from policies.rate_limiting import RateLimiting
from policies.rules import Rules
from policies.span_count import SpanCount
from policies.status_code import StatusCode
from policies.string_attribute import StringAttribute
from policies.trace_flags import TraceFlags
from policies.trace_state import TraceState
from sampler.errors import ConfigError, validation_message

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tailgate.policies"

_BUILTINS: tuple[PolicyType, ...] = (
    AlwaysSample,
    And,
    BooleanAttribute,
    BytesLimiting,
    Composite,
    Drop,
    Dynamic,
    EMADynamic,
    Latency,
    Not,
    NumericAttribute,
    OttlCondition,
    Probabilistic,
    RateLimiting,
    Rules,
    SpanCount,
    StatusCode,
    StringAttribute,
    Throughput,
    TraceFlags,
    TraceState,
)
POLICY_TYPES: dict[str, PolicyType] = {kind.type_name: kind for kind in _BUILTINS}

_LIST_ITEM = re.compile(r"^(.*)\[\d+\]$")


def _plugin_problem(name: str, loaded: Any) -> str | None:
    """Why `loaded` cannot serve as policy type `name`, or None when it can."""
    if not isinstance(loaded, type):
        return f"{loaded!r} is not a class"
    if getattr(loaded, "type_name", None) != name:
        declared = getattr(loaded, "type_name", None)
        return f"its type_name {declared!r} differs from the entry-point name"
    params = getattr(loaded, "Params", None)
    if not (isinstance(params, type) and issubclass(params, ParamsModel)):
        return "its Params is not a subclass of policies.base.ParamsModel"
    return None


def load_entry_point_policies() -> dict[str, PolicyType]:
    """Policy classes registered by installed distributions in the `tailgate.policies` group.

    The entry-point name is the config `type:` name. A plugin that fails to import, is not a usable
    policy class, or reuses a built-in name is skipped with a warning rather than failing startup:
    a config that uses it still fails with "unknown policy type", which names the key path, while
    configs that do not are unaffected by a broken package elsewhere in the environment. Built-ins
    cannot be shadowed, so a `type:` name means the same thing wherever tailgate runs.
    """
    found: dict[str, PolicyType] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        where = f"policy plugin {entry.name!r} ({entry.value})"
        if entry.name in POLICY_TYPES:
            log.warning("%s ignored: %r is a built-in policy type", where, entry.name)
            continue
        if entry.name in found:
            log.warning("%s ignored: another plugin already registered %r", where, entry.name)
            continue
        try:
            loaded = entry.load()
        except Exception as error:  # any import-time failure of third-party code
            log.warning("%s ignored: cannot load: %s: %s", where, type(error).__name__, error)
            continue
        problem = _plugin_problem(entry.name, loaded)
        if problem is not None:
            log.warning("%s ignored: %s", where, problem)
            continue
        found[entry.name] = loaded
    return found


def policy_types() -> dict[str, PolicyType]:
    """Every policy type a config may name: the built-ins, then the plugins."""
    return {**POLICY_TYPES, **load_entry_point_policies()}


def build_policy(spec: dict[str, Any], path: str, *, types: Mapping[str, PolicyType] | None = None) -> Policy:
    """Build one policy from its config dict; `path` names it, e.g. `tail_sampling.policies[2]`."""
    return _build(spec, path, policy_types() if types is None else types)


def build_policies(
    specs: Sequence[dict[str, Any]], path: str, *, types: Mapping[str, PolicyType] | None = None
) -> list[Policy]:
    """Build a list of policies; the ConfigError lists the problems of all of them, one per line."""
    return _build_list(specs, path, policy_types() if types is None else types)


def _build_list(specs: Any, path: str, types: Mapping[str, PolicyType]) -> list[Policy]:
    if not isinstance(specs, list):
        raise ConfigError(f"{path}: must be a list of policies")
    policies: list[Policy] = []
    problems: list[str] = []
    first_use: dict[str, str] = {}
    for index, spec in enumerate(specs):
        item_path = f"{path}[{index}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name:
            if name in first_use:
                problems.append(f"{item_path}.name: duplicate policy name {name!r} (also {first_use[name]})")
            first_use.setdefault(name, item_path)
        try:
            policies.append(_build(spec, item_path, types))
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("\n".join(problems))
    return policies


def _sub_builder(parent_path: str, types: Mapping[str, PolicyType]) -> SubPolicyBuilder:
    """The builder a composite policy gets: resolves relative paths, checks sibling names differ."""
    names_by_list: dict[str, dict[str, str]] = {}

    def build_sub(spec: dict[str, Any], relative_path: str) -> Policy:
        path = f"{parent_path}.{relative_path}"
        item = _LIST_ITEM.match(relative_path)
        name = spec.get("name") if isinstance(spec, dict) else None
        duplicate = None
        if item is not None and isinstance(name, str) and name:
            siblings = names_by_list.setdefault(item.group(1), {})
            if name in siblings:
                duplicate = f"{path}.name: duplicate policy name {name!r} (also {siblings[name]})"
            siblings.setdefault(name, path)
        try:
            policy = _build(spec, path, types)
        except ConfigError as error:
            if duplicate is not None:
                raise ConfigError(f"{duplicate}\n{error}") from None
            raise
        if duplicate is not None:
            raise ConfigError(duplicate)
        return policy

    return build_sub


def _build(spec: Any, path: str, types: Mapping[str, PolicyType]) -> Policy:
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: must be a mapping with `name` and `type`")
    problems: list[str] = []

    name = spec.get("name")
    if name is None:
        problems.append(f"{path}.name: required")
    elif not isinstance(name, str) or not name:
        problems.append(f"{path}.name: must be a non-empty string")

    kind = spec.get("type")
    policy_type: PolicyType | None = None
    if kind is None:
        problems.append(f"{path}.type: required")
    elif not isinstance(kind, str):
        problems.append(f"{path}.type: must be a string")
    elif kind not in types:
        known = ", ".join(sorted(types))
        problems.append(f"{path}.type: unknown policy type {kind!r} (known: {known})")
    else:
        policy_type = types[kind]

    for key in spec:
        if key in ("name", "type") or key == kind:
            continue
        if key in types and isinstance(kind, str):
            problems.append(
                f"{path}.{key}: unknown key (the parameters of a {kind!r} policy go under {kind!r})"
            )
        else:
            problems.append(f"{path}.{key}: unknown key")

    params: BaseModel | None = None
    if policy_type is not None:
        block_path = f"{path}.{kind}"
        block = spec.get(kind)
        if block is None:  # absent, or a bare `type_name:` line in YAML
            block = {}
        if not isinstance(block, dict):
            problems.append(f"{block_path}: must be a mapping")
        else:
            try:
                params = policy_type.Params.model_validate(block)
            except ValidationError as error:
                problems.append(validation_message(error, block_path))

    policy: Policy | None = None
    if policy_type is not None and params is not None:
        # Built even when the name or another key is wrong, so that the problems of sub-policies
        # are reported in the same run; the policy is then discarded.
        try:
            built = policy_type(
                name if isinstance(name, str) else "", params, _sub_builder(f"{path}.{kind}", types)
            )
        except ConfigError as error:
            problems.append(str(error))
        except ValueError as error:  # a plugin rejecting its parameters in its constructor
            problems.append(f"{path}.{kind}: {error}")
        else:
            if isinstance(built, Policy):
                policy = built
            else:
                problems.append(f"{path}.type: policy type {kind!r} did not build a Policy")

    if problems or policy is None:
        raise ConfigError("\n".join(problems))
    return policy
