"""The registry: type names, structural config errors with key paths, and entry-point plugins."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest

from policies.base import Decision, Policy
from policies.registry import (
    POLICY_TYPES,
    build_policies,
    build_policy,
    load_entry_point_policies,
)
from sampler.config import parse_config
from sampler.errors import ConfigError

KNOWN = (
    "always_sample, and, boolean_attribute, bytes_limiting, composite, drop, dynamic, ema_dynamic, "
    "latency, not, numeric_attribute, ottl_condition, probabilistic, rate_limiting, rules, span_count, "
    "status_code, string_attribute, throughput, trace_flags, trace_state"
)


def errors_of(specs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_policies(specs, "tail_sampling.policies")
    return str(caught.value).splitlines()


def test_builtin_type_names() -> None:
    assert ", ".join(sorted(POLICY_TYPES)) == KNOWN
    for name, kind in POLICY_TYPES.items():
        assert kind.type_name == name


def test_builds_policies_in_order(make_trace) -> None:
    specs = [
        {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "slow", "type": "latency", "latency": {"threshold_ms": 500}},
        {"name": "sample10", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
    ]
    policies = build_policies(specs, "tail_sampling.policies")
    assert [p.name for p in policies] == ["errors", "slow", "sample10"]
    assert all(isinstance(p, Policy) for p in policies)
    assert policies[0].evaluate(make_trace(), 0) is Decision.NOT_SAMPLED


def test_build_policy_single() -> None:
    policy = build_policy({"name": "all", "type": "always_sample"}, "x.policies[0]")
    assert policy.name == "all"


def test_unknown_type_lists_the_known_ones() -> None:
    specs = [
        {"name": "a", "type": "always_sample"},
        {"name": "slow", "type": "latencyy", "latencyy": {"threshold_ms": 1}},
    ]
    assert errors_of(specs) == [
        f"tail_sampling.policies[1].type: unknown policy type 'latencyy' (known: {KNOWN})"
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "always_sample"}, "tail_sampling.policies[0].name: required"),
        (
            {"name": "", "type": "always_sample"},
            "tail_sampling.policies[0].name: must be a non-empty string",
        ),
        (
            {"name": 7, "type": "always_sample"},
            "tail_sampling.policies[0].name: must be a non-empty string",
        ),
        ({"name": "x"}, "tail_sampling.policies[0].type: required"),
        ({"name": "x", "type": ["latency"]}, "tail_sampling.policies[0].type: must be a string"),
        (
            {"name": "x", "type": "always_sample", "comment": "hi"},
            "tail_sampling.policies[0].comment: unknown key",
        ),
        (
            {
                "name": "x",
                "type": "status_code",
                "status_code": {"status_codes": ["ERROR"]},
                "latency": {"threshold_ms": 5},
            },
            "tail_sampling.policies[0].latency: unknown key "
            "(the parameters of a 'status_code' policy go under 'status_code')",
        ),
        (
            {"name": "x", "type": "latency", "latency": "500ms"},
            "tail_sampling.policies[0].latency: must be a mapping",
        ),
        ("always_sample", "tail_sampling.policies[0]: must be a mapping with `name` and `type`"),
    ],
)
def test_structural_errors(spec, message) -> None:
    assert errors_of([spec]) == [message]


def test_every_problem_is_reported_one_per_line() -> None:
    specs = [
        {"name": "a", "type": "always_sample"},
        {"name": "a", "type": "latency", "latency": {"threshold_ms": -1}, "extra": 1},
        {"name": "ok", "type": "always_sample"},
        {"name": "b", "type": "status_code", "status_code": {"status_codes": ["BAD"]}},
    ]
    assert errors_of(specs) == [
        "tail_sampling.policies[1].name: duplicate policy name 'a' (also tail_sampling.policies[0])",
        "tail_sampling.policies[1].extra: unknown key",
        "tail_sampling.policies[1].latency.threshold_ms: Input should be greater than or equal to 0",
        "tail_sampling.policies[3].status_code.status_codes[0]: Input should be 'OK', 'ERROR' or 'UNSET'",
    ]


def test_policies_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"^tail_sampling\.policies: must be a list of policies$"):
        build_policies({"name": "a"}, "tail_sampling.policies")  # type: ignore[arg-type]


def test_parse_config_reports_policy_errors_with_their_path(tmp_path: Path) -> None:
    data = {
        "exporters": {"file": {"path": str(tmp_path / "out.jsonl")}},
        "tail_sampling": {
            "policies": [
                {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
                {"name": "slow", "type": "latency", "latency": {"threshold_ms": -3}},
            ]
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == (
        "tail_sampling.policies[1].latency.threshold_ms: Input should be greater than or equal to 0"
    )


PLUGIN_MODULE = """
from typing import ClassVar

from policies.base import Decision, ParamsModel


class KeepAllParams(ParamsModel):
    label: str = "kept"


class KeepAll:
    type_name: ClassVar[str] = "example_keep_all"
    Params: ClassVar[type[ParamsModel]] = KeepAllParams

    def __init__(self, name, params, build_sub):
        self.name = name
        self.label = params.label
        self.attribute_keys = frozenset({"plugin.key"})

    def evaluate(self, trace, now):
        return Decision.SAMPLED


class WrongName(KeepAll):
    type_name: ClassVar[str] = "something_else"
"""


def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry_points: str) -> None:
    """A distribution installed by hand: its module and dist-info on a sys.path entry."""
    (tmp_path / "tailgate_example_policy.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "tailgate_example_policy-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tailgate-example-policy\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tailgate_example_policy", raising=False)


@pytest.fixture
def forget_plugin_module():
    yield
    sys.modules.pop("tailgate_example_policy", None)


def test_entry_point_plugin_is_built_and_evaluated(
    tmp_path, monkeypatch, make_trace, forget_plugin_module
) -> None:
    install_plugin(
        tmp_path,
        monkeypatch,
        "[tailgate.policies]\nexample_keep_all = tailgate_example_policy:KeepAll\n",
    )
    assert list(load_entry_point_policies()) == ["example_keep_all"]

    specs = [
        {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "plugin", "type": "example_keep_all", "example_keep_all": {"label": "mine"}},
        {
            "name": "nested",
            "type": "and",
            "and": {"and_sub_policy": [{"name": "inner", "type": "example_keep_all"}]},
        },
    ]
    errors, plugin, nested = build_policies(specs, "tail_sampling.policies")
    assert plugin.label == "mine"
    assert plugin.evaluate(make_trace(), 0) is Decision.SAMPLED
    assert errors.evaluate(make_trace(), 0) is Decision.NOT_SAMPLED
    assert nested.evaluate(make_trace(), 0) is Decision.SAMPLED
    assert nested.attribute_keys == frozenset({"plugin.key"})

    bad = [{"name": "plugin", "type": "example_keep_all", "example_keep_all": {"colour": 1}}]
    assert errors_of(bad) == [
        "tail_sampling.policies[0].example_keep_all.colour: Extra inputs are not permitted"
    ]


def test_broken_or_clashing_plugins_are_skipped_with_a_warning(
    tmp_path, monkeypatch, caplog, forget_plugin_module
) -> None:
    install_plugin(
        tmp_path,
        monkeypatch,
        """\
        [tailgate.policies]
        latency = tailgate_example_policy:KeepAll
        missing_class = tailgate_example_policy:DoesNotExist
        missing_module = tailgate_no_such_module:KeepAll
        renamed = tailgate_example_policy:WrongName
        example_keep_all = tailgate_example_policy:KeepAll
        """,
    )
    with caplog.at_level(logging.WARNING, logger="policies.registry"):
        loaded = load_entry_point_policies()
    assert list(loaded) == ["example_keep_all"]
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    assert "'latency' ignored: 'latency' is a built-in policy type" in warnings.replace(
        " (tailgate_example_policy:KeepAll)", ""
    )
    assert "'missing_class'" in warnings and "AttributeError" in warnings
    assert "'missing_module'" in warnings and "ModuleNotFoundError" in warnings
    assert "'renamed'" in warnings and "differs from the entry-point name" in warnings

    # The built-in keeps its meaning; a skipped plugin's name is simply unknown.
    (latency,) = build_policies([{"name": "slow", "type": "latency", "latency": {"threshold_ms": 5}}], "p")
    assert type(latency).__module__ == "policies.latency"
    assert errors_of([{"name": "m", "type": "missing_class"}]) == [
        "tail_sampling.policies[0].type: unknown policy type 'missing_class' "
        f"(known: {', '.join(sorted([*KNOWN.split(', '), 'example_keep_all']))})"
    ]
