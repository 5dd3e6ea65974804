"""Intervals and tests for accuracies: Wilson intervals of one model's accuracy on n images, mean ± std
and Welch intervals over seeds, the exact McNemar test of two models on the same images."""
from __future__ import annotations

import math
import statistics

import torch


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% for z = 1.96): (low, high) as fractions."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(flags: torch.Tensor) -> dict:
    """{"accuracy", "ci95": [low, high], "correct", "n"} of a bool vector of per-sample correctness."""
    k, n = int(flags.sum()), flags.numel()
    return {"accuracy": k / n, "ci95": list(wilson(k, n)), "correct": k, "n": n}


def mean_std(vals: list) -> dict | None:
    """{"mean", "std", "n", "values"} of the values that are not None (std 0 for one value); None if none."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


# two-sided 95% quantiles of Student's t by degrees of freedom (1..30; 1.96 beyond)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def welch_interval(a: dict, b: dict) -> tuple[float, float, float]:
    """(difference of means a − b, low, high): the Welch 95% interval of a difference of two means over
    independent seeds, a and b mean_std dicts with n ≥ 2 each."""
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    d = a["mean"] - b["mean"]
    if va + vb == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    half = t975(df) * (va + vb) ** 0.5
    return d, d - half, d + half


def t975(df: float) -> float:
    """The two-sided 95% Student-t quantile at df degrees of freedom (from the table's next lower entry,
    which errs wide; the normal quantile beyond 30)."""
    return T975[max(k for k in T975 if k <= max(1, int(df)))] if df < 31 else 1.96


def paired_interval(diffs: list) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean of paired differences, e.g. one per seed where
    both arms trained with that seed; n ≥ 2."""
    n, m = len(diffs), statistics.fmean(diffs)
    half = t975(n - 1) * statistics.stdev(diffs) / n ** 0.5
    return m, m - half, m + half


def mcnemar(a: str, b: str) -> dict:
    """Exact two-sided McNemar test of two models' per-sample bit strings ("1" = right) on the same
    images: {"only_a", "only_b", "p"} (the samples only a / only b gets right, and the p-value)."""
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_a": only_a, "only_b": only_b, "p": p}
