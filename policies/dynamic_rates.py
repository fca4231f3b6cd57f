"""Per-key sample rates from per-key counts, as Honeycomb's dynsampler-go computes them.

Pure functions over plain dicts: the policies in `policies.dynamic` own the counts and the clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def sample_rates(counts: Mapping[str, float], goal_count: float) -> dict[str, int]:
    """Integer sample rates that let about `goal_count` of the counted items through, rare keys first.

    dynsampler-go's shared calculation: each key's share of `goal_count` is proportional to
    log10 of its count (counts below 1 read as 1), and at least 1. A key whose count fits its share
    gets rate 1 and passes what it left unused on to the keys visited after it; a key over its share
    gets the rate that brings it under (rounded up) and passes on the remainder. Every key is thus
    represented, and frequent keys are sampled hardest.

    Keys are visited from the least to the most frequent (ties by key), so that what rare keys leave
    unused goes to the frequent keys that can use it. dynsampler-go visits keys in alphabetical
    order, which wastes what the keys sorted after the frequent ones leave, and lets less than the
    goal through by an amount that depends on how the keys happen to be spelled.
    """
    log_sum = sum(math.log10(max(1.0, count)) for count in counts.values())
    if log_sum <= 0:
        # Every key was seen at most once: each one's share is a whole item.
        return dict.fromkeys(counts, 1)
    goal_ratio = goal_count / log_sum
    rates: dict[str, int] = {}
    keys_remaining = len(counts)
    extra = 0.0
    for key in sorted(counts, key=lambda key: (counts[key], key)):
        count = max(1.0, counts[key])
        share = extra / keys_remaining
        goal_for_key = max(1.0, math.log10(count) * goal_ratio) + share
        extra -= share
        keys_remaining -= 1
        if count <= goal_for_key:
            rates[key] = 1
            extra += goal_for_key - count
        else:
            rate = math.ceil(count / goal_for_key)
            rates[key] = rate
            extra += goal_for_key - count / rate
    return rates


def average_rate_goal(counts: Mapping[str, float], goal_sample_rate: float) -> float:
    """The items to let through for an average rate of `goal_sample_rate` over `counts`."""
    return sum(max(1.0, count) for count in counts.values()) / goal_sample_rate


def moving_averages(
    averages: Mapping[str, float], counts: Mapping[str, float], weight: float, age_out: float
) -> dict[str, float]:
    """The exponential moving average of per-key counts after one more interval of `counts`.

    Each tracked key moves `weight` of the way towards its new count (0 when it was not seen); keys
    whose average falls below `age_out` are dropped, and so are new keys that start below it.
    """
    updated: dict[str, float] = {}
    for key, average in averages.items():
        value = weight * counts.get(key, 0.0) + (1.0 - weight) * average
        if value >= age_out:
            updated[key] = value
    for key, count in counts.items():
        if key not in averages and weight * count >= age_out:
            updated[key] = weight * count
    return updated
