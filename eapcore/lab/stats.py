"""Accuracy with Wilson 95% intervals and the exact McNemar test on paired outcomes."""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Two-sided exact McNemar test of paired outcomes a (e.g. base) vs b (tuned) on the same items.

    Returns the discordant counts (a only, b only) and the binomial p-value."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must have equal length")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def summarize(outcomes: Sequence[bool]) -> dict[str, float]:
    k, n = sum(bool(x) for x in outcomes), len(outcomes)
    lo, hi = wilson(k, n)
    return {"correct": k, "n": n, "accuracy": k / n if n else 0.0, "ci95_low": lo, "ci95_high": hi}
