"""combine / deciding_policy: the OTel Collector's precedence over per-policy decisions."""

from __future__ import annotations

import pytest

from policies.base import Decision
from policies.combine import combine, deciding_policy

S, N, IS, INS, D = (
    Decision.SAMPLED,
    Decision.NOT_SAMPLED,
    Decision.INVERT_SAMPLED,
    Decision.INVERT_NOT_SAMPLED,
    Decision.DROPPED,
)


@pytest.mark.parametrize(
    ("decisions", "keep", "index"),
    [
        ([], False, None),
        ([N, N], False, None),
        ([N, S], True, 1),
        ([S, S], True, 0),
        ([S, D], False, None),
        ([D, S, IS], False, None),
        ([S, INS], False, None),
        ([INS, IS], False, None),
        ([IS], True, 0),
        ([IS, IS], True, 0),
        # An inverted match alone does not override another policy's plain "no"...
        ([IS, N], False, None),
        # ...but a plain "yes" keeps the trace, and is the policy recorded.
        ([IS, N, S], True, 2),
        ([IS, S], True, 1),
    ],
)
def test_final_decision(decisions, keep, index) -> None:
    assert combine(decisions) is keep
    assert deciding_policy(decisions) == index
