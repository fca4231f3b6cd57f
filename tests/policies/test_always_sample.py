"""always_sample: keeps every trace; takes no parameters."""

from __future__ import annotations

import pytest

from policies.base import STATUS_ERROR, Decision
from policies.registry import build_policies
from sampler.errors import ConfigError


@pytest.mark.parametrize("spec_extra", [{}, {"always_sample": None}, {"always_sample": {}}])
def test_keeps_every_trace(build, make_trace, spec_extra) -> None:
    policy = build({"name": "all", "type": "always_sample", **spec_extra})
    assert policy.name == "all"
    assert policy.attribute_keys == frozenset()
    assert policy.evaluate(make_trace(), 0) is Decision.SAMPLED
    assert policy.evaluate(make_trace(span_count=0, status_codes=STATUS_ERROR), 0) is (Decision.SAMPLED)


def test_parameters_are_rejected() -> None:
    spec = {"name": "all", "type": "always_sample", "always_sample": {"percentage": 5}}
    with pytest.raises(ConfigError) as caught:
        build_policies([spec], "tail_sampling.policies")
    assert str(caught.value) == (
        "tail_sampling.policies[0].always_sample.percentage: Extra inputs are not permitted"
    )
