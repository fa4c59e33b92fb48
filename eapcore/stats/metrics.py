"""The paper's three metrics (Eq. 14-16) on stored per-sample EAP scores, and relative change.

Conventions (all maths in float64):
- `s` is the real-edge score matrix `[N, E]`: sample n, real edge e, taken from the stored
  `[N, F, B]` tensor with `real_edge_scores` (cells outside `real_edge_mask` never enter).
- Activation Intensity  AI = mean_{n,e} |s|.
- Information Complexity (MetricSettings.entropy; natural log, 0 log 0 = 0):
    pooled      H(p), p_{n,e} = |s_{n,e}| / sum_{n,e} |s|          (max log(N E))
    per_sample  mean_n H(p_n), p_{n,e} = |s_{n,e}| / sum_e |s_{n,e}|  (max log E)
    histogram   H(q), q_k = share of all |s_{n,e}| in bin k of `histogram_bins` equal-width bins
                spanning [0, max_{n,e} |s|] (last bin closed, as numpy.histogram)  (max log bins)
- Distribution Kurtosis K = mean_n kurt(x_n), x_n = s_{n,.} (kurtosis_of="signed") or |s_{n,.}|
  ("absolute"); population moments m4 / m2^2, minus 3 for kurtosis="fisher" (excess), as
  scipy.stats.kurtosis(bias=True). A constant row has undefined kurtosis (NaN), and so has K.
- Relative change = 100 (M_tuned - M_base) / |M_base|: positive when tuned is larger; NaN when
  M_base == 0.

Every pooled metric is computed by `resampled_metrics` from per-sample sufficient statistics, so
the headline value and its bootstrap replicates share one implementation.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import xlogy

from eapcore.specs import MetricSettings

METRICS: tuple[str, ...] = ("activation_intensity", "information_complexity", "kurtosis")
METRIC_LABELS = {"activation_intensity": "Activation intensity",
                 "information_complexity": "Information complexity",
                 "kurtosis": "Distribution kurtosis"}
METRIC_UNITS = {"activation_intensity": "mean |s| (loss units)", "information_complexity": "entropy (nats)",
                "kurtosis": "excess kurtosis"}


def real_edge_cells(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, F, B] scores and bool [F, B] mask -> [N, E] in the scores' dtype (real edges, row-major
    cell order)."""
    scores = np.asarray(scores)
    mask = np.asarray(mask, dtype=bool)
    if scores.ndim != 3 or scores.shape[1:] != mask.shape:
        raise ValueError(f"scores {scores.shape} must be [N, F, B] with mask [F, B] = {mask.shape}")
    return scores[:, mask]


def real_edge_scores(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, F, B] scores and bool [F, B] mask -> float64 [N, E] (real edges, row-major cell order)."""
    return real_edge_cells(scores, mask).astype(np.float64)


def relative_change(base: Any, tuned: Any) -> Any:
    """100 (tuned - base) / |base|, elementwise; NaN where base == 0. Scalars give a float."""
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(base == 0, np.nan, 100.0 * (tuned - base) / np.abs(base))
    return float(out) if out.ndim == 0 else out


# ---- per-sample quantities -------------------------------------------------------------------

def _check(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"expected a non-empty real-edge score matrix [N, E], got shape {s.shape}")
    return s


def _entropy_rows(x: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of non-negative x [R, K] normalised to sum 1; NaN if 0."""
    total = x.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(total) - xlogy(x, x).sum(axis=1) / total


def _kurtosis_rows(x: np.ndarray, fisher: bool) -> np.ndarray:
    """Population kurtosis m4 / m2^2 of each row of x [N, E] (minus 3 if fisher); NaN if m2 == 0."""
    d = x - x.mean(axis=1, keepdims=True)
    m2 = (d * d).mean(axis=1)
    m4 = (d ** 4).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(m2 > 0, m4 / (m2 * m2), np.nan)
    return k - 3.0 if fisher else k


def _histogram_rows(x: np.ndarray, top: np.ndarray, bins: int) -> np.ndarray:
    """Counts of each row n of x [N, E] (>= 0) in `bins` equal bins over [0, top[n, k]].

    top [N, K] -> counts [N, K, bins]. Bin j is [e_j, e_{j+1}) and the last bin is closed, exactly
    as numpy.histogram; values above top[n, k] are not counted.
    """
    edges = np.linspace(0.0, top, bins + 1, axis=-1)  # [N, K, bins + 1]
    out = np.empty(top.shape + (bins,))
    for n, row in enumerate(np.sort(x, axis=1)):
        below = np.searchsorted(row, edges[n], side="left")  # number of values < edge
        below[:, -1] = np.searchsorted(row, edges[n, :, -1], side="right")  # closed last bin
        out[n] = np.diff(below, axis=1)
    return out


def _histogram_entropy_rows(hist: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Entropy of each histogram row [R, bins]; NaN where its range top [R] is 0 (all |s| zero)."""
    return np.where(top > 0, _entropy_rows(hist), np.nan)


def _check_settings(settings: MetricSettings) -> None:
    if settings.entropy not in ("pooled", "per_sample", "histogram"):
        raise ValueError(f"unknown entropy option {settings.entropy!r}")
    if settings.kurtosis not in ("fisher", "pearson") or settings.kurtosis_of not in ("signed", "absolute"):
        raise ValueError(f"unknown kurtosis option {settings.kurtosis!r} / {settings.kurtosis_of!r}")
    if settings.histogram_bins < 1:
        raise ValueError(f"histogram_bins must be >= 1, not {settings.histogram_bins}")


def per_sample_metrics(s: np.ndarray, settings: MetricSettings = MetricSettings()) -> dict[str, np.ndarray]:
    """Each metric on each sample alone: {metric: float64 [N]} for paired / group tests.

    activation_intensity: mean_e |s_{n,e}|. information_complexity: Shannon entropy of sample n's
    normalised |s| (entropy="histogram": entropy of sample n's histogram over [0, max_e |s_{n,e}|]).
    kurtosis: the per-sample kurtosis the pooled K averages.
    """
    s = _check(s)
    _check_settings(settings)
    x = np.abs(s)
    if settings.entropy == "histogram":
        top = x.max(axis=1)
        entropy = _histogram_entropy_rows(_histogram_rows(x, top[:, None], settings.histogram_bins)[:, 0], top)
    else:
        entropy = _entropy_rows(x)
    return {
        "activation_intensity": x.mean(axis=1),
        "information_complexity": entropy,
        "kurtosis": _kurtosis_rows(x if settings.kurtosis_of == "absolute" else s,
                                   settings.kurtosis == "fisher"),
    }


# ---- pooled metrics --------------------------------------------------------------------------

def resampled_metrics(s: np.ndarray, counts: np.ndarray,
                      settings: MetricSettings = MetricSettings()) -> dict[str, np.ndarray]:
    """Pooled metrics of R multisets of samples: sample n taken counts[r, n] times.

    s float64 [N, E]; counts [R, N] (non-negative integers, each row summing > 0).
    Returns {metric: float64 [R]}; counts = ones([1, N]) gives the metrics of s itself.
    """
    s = _check(s)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != s.shape[0]:
        raise ValueError(f"counts must be [R, {s.shape[0]}], got {counts.shape}")
    x = np.abs(s)
    weight = counts.sum(axis=1)
    per = per_sample_metrics(s, settings)
    if settings.entropy == "pooled":
        # H = log S - (1/S) sum x log x, with S and the sum both additive over samples
        total = counts @ x.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = np.log(total) - (counts @ xlogy(x, x).sum(axis=1)) / total
    elif settings.entropy == "per_sample":
        entropy = counts @ per["information_complexity"] / weight
    else:
        entropy = _histogram_entropy(x, counts, settings.histogram_bins)
    return {
        "activation_intensity": counts @ per["activation_intensity"] / weight,
        "information_complexity": entropy,
        "kurtosis": counts @ per["kurtosis"] / weight,
    }


def _histogram_entropy(x: np.ndarray, counts: np.ndarray, bins: int) -> np.ndarray:
    """Histogram entropy of each multiset (bins over [0, its own max]) -> [R]."""
    row_max = x.max(axis=1)
    top = np.where(counts > 0, row_max[None, :], -np.inf).max(axis=1)  # [R]
    tops, which = np.unique(top, return_inverse=True)
    hist = _histogram_rows(x, np.broadcast_to(tops, (len(x), len(tops))), bins)  # [N, K, bins]
    out = np.empty(len(counts))
    for k in range(len(tops)):
        rows = which == k
        out[rows] = _histogram_entropy_rows(counts[rows] @ hist[:, k, :], top[rows])
    return out


def compute_metrics(s: np.ndarray, settings: MetricSettings = MetricSettings()) -> dict[str, float]:
    """The three pooled metrics of real-edge scores s [N, E]: {metric: float}."""
    s = _check(s)
    values = resampled_metrics(s, np.ones((1, s.shape[0])), settings)
    return {name: float(v[0]) for name, v in values.items()}


# ---- the summary table ------------------------------------------------------------------------

def long_rows(result: dict[str, Any], **labels: Any) -> list[dict[str, Any]]:
    """Rows of the long-format table from one `metrics` result (CLI JSON / paired comparison).

    labels (e.g. pair=, dataset=, alpha=) are copied into every row; one row per metric with
    base, tuned, relative_change, difference, p_value, p_value_permutation, ci_low, ci_high, n
    (missing fields -> None).
    """
    fields = ("base", "tuned", "relative_change", "difference", "p_value", "p_value_permutation",
              "ci_low", "ci_high", "n")
    return [{**labels, "metric": m, **{f: result[m].get(f) for f in fields}}
            for m in METRICS if m in result]


def summary_table(rows: Any, value: str = "relative_change",
                  index: tuple[str, ...] = ("pair", "metric"),
                  columns: tuple[str, ...] = ("dataset", "alpha")):
    """The paper's Table 1 as a pandas pivot of long-format rows (list of dicts or DataFrame).

    Default: rows pair x metric, columns dataset x alpha, cells `value`. Duplicated cells are an
    error (two runs claiming the same table cell).
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    missing = {value, *index, *columns} - set(df.columns)
    if missing:
        raise ValueError(f"summary_table: rows lack column(s) {sorted(missing)}")
    keys = [*index, *columns]
    dup = df.duplicated(keys)
    if dup.any():
        raise ValueError(f"summary_table: several rows for cell(s) {df.loc[dup, keys].to_dict('records')}")
    return df.pivot(index=list(index), columns=list(columns), values=value)
