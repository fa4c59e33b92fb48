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

import argparse
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.special import xlogy

from eapcore.specs import MetricSettings

METRICS: tuple[str, ...] = ("activation_intensity", "information_complexity", "kurtosis")
METRIC_LABELS = {"activation_intensity": "Activation intensity",
                 "information_complexity": "Information complexity",
                 "kurtosis": "Distribution kurtosis"}
METRIC_UNITS = {"activation_intensity": "mean |s| (loss units)", "information_complexity": "entropy (nats)",
                "kurtosis": "excess kurtosis"}


class ScoreFile(NamedTuple):
    """One `attribute` output directory. scores float32 [N, F, B]; mask bool [F, B]."""

    scores: np.ndarray
    mask: np.ndarray
    graph: dict[str, Any]
    manifest: dict[str, Any]


def load_scores(directory: str | Path) -> ScoreFile:
    """Read an `attribute` output directory (DESIGN.md) and check its parts agree."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    for name in ("scores.safetensors", "graph.json", "manifest.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name} (not an `attribute` output directory)")
    tensors = load_file(directory / "scores.safetensors")
    for key in ("scores", "real_edge_mask"):
        if key not in tensors:
            raise ValueError(f"{directory}/scores.safetensors: no tensor {key!r} (has {sorted(tensors)})")
    scores, mask = tensors["scores"], tensors["real_edge_mask"].astype(bool)
    graph = json.loads((directory / "graph.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    f, b = len(graph["forward"]), len(graph["backward"])
    if scores.ndim != 3 or scores.shape[1:] != (f, b) or mask.shape != (f, b):
        raise ValueError(f"{directory}: scores {scores.shape} / mask {mask.shape} do not match the "
                         f"graph's {f} forward x {b} backward nodes")
    ids = manifest.get("sample_ids")
    if ids is not None and len(ids) != scores.shape[0]:
        raise ValueError(f"{directory}: {scores.shape[0]} score matrices but {len(ids)} sample_ids")
    return ScoreFile(scores, mask, graph, manifest)


def real_edge_scores(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, F, B] scores and bool [F, B] mask -> float64 [N, E] (real edges, row-major cell order)."""
    scores = np.asarray(scores)
    mask = np.asarray(mask, dtype=bool)
    if scores.ndim != 3 or scores.shape[1:] != mask.shape:
        raise ValueError(f"scores {scores.shape} must be [N, F, B] with mask [F, B] = {mask.shape}")
    return scores[:, mask].astype(np.float64)


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


# ---- CLI ----------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def check_paired(base: ScoreFile, tuned: ScoreFile) -> None:
    """Raise ValueError unless base and tuned share graph, mask and sample ids (same order)."""
    keys = ("granularity", "n_layers", "n_heads", "n_kv_heads", "forward", "backward")
    diff = [k for k in keys if base.graph.get(k) != tuned.graph.get(k)]
    if diff:
        raise ValueError(f"base and tuned graphs differ in {diff}; scores are not comparable")
    if not np.array_equal(base.mask, tuned.mask):
        raise ValueError("base and tuned real_edge_mask differ")
    ids_b, ids_t = base.manifest.get("sample_ids"), tuned.manifest.get("sample_ids")
    if ids_b is None or ids_t is None:
        raise ValueError("manifest.json lacks sample_ids: cannot check the samples are paired")
    if list(ids_b) != list(ids_t):
        only_b = sorted(set(ids_b) - set(ids_t), key=str)[:5]
        only_t = sorted(set(ids_t) - set(ids_b), key=str)[:5]
        what = (f"only in base {only_b}, only in tuned {only_t}" if only_b or only_t
                else "same ids in a different order")
        raise ValueError(f"base and tuned sample_ids differ ({len(ids_b)} vs {len(ids_t)}; {what}); "
                         "the comparison is paired by question")


def metrics_result(base: ScoreFile, tuned: ScoreFile, settings: MetricSettings = MetricSettings(),
                   n_bootstrap: int = 1000, n_permutations: int = 9999, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, Any]:
    """The `metrics` command's JSON-ready result for two loaded score files (paired by question).

    Checks pairing (`check_paired`), then one object per metric as `analysis.paired_comparison`
    returns it, plus provenance; NaN becomes None.
    """
    from eapcore.stats.analysis import paired_comparison  # analysis builds on metrics

    check_paired(base, tuned)
    result = paired_comparison(real_edge_scores(base.scores, base.mask),
                               real_edge_scores(tuned.scores, tuned.mask), settings,
                               n_bootstrap=n_bootstrap, n_permutations=n_permutations,
                               confidence=confidence, seed=seed)
    return _jsonable({
        "base_model": base.manifest.get("model"), "tuned_model": tuned.manifest.get("model"),
        "granularity": base.graph.get("granularity"), "n_real_edges": int(base.mask.sum()),
        "sample_ids": list(base.manifest["sample_ids"]),
        "settings": {"entropy": settings.entropy, "kurtosis": settings.kurtosis,
                     "kurtosis_of": settings.kurtosis_of, "histogram_bins": settings.histogram_bins},
        "bootstrap": n_bootstrap, "permutations": n_permutations, "confidence": confidence,
        "seed": seed, **result,
    })


def command(argv: list[str]) -> int:
    """`python -m eapcore metrics --base DIR --tuned DIR --out FILE.json [options]`."""
    defaults = MetricSettings()
    p = argparse.ArgumentParser(prog="python -m eapcore metrics",
                                description="The paper's three metrics of base vs tuned EAP scores "
                                            "(paired by question), with tests and bootstrap CIs.")
    p.add_argument("--base", required=True, help="`attribute` output directory of the base model")
    p.add_argument("--tuned", required=True, help="`attribute` output directory of the tuned model")
    p.add_argument("--out", required=True, help="result JSON file")
    p.add_argument("--entropy", choices=("pooled", "per_sample", "histogram"), default=defaults.entropy)
    p.add_argument("--histogram-bins", type=int, default=defaults.histogram_bins)
    p.add_argument("--kurtosis", choices=("fisher", "pearson"), default=defaults.kurtosis)
    p.add_argument("--kurtosis-of", choices=("signed", "absolute"), default=defaults.kurtosis_of)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no CI)")
    p.add_argument("--permutations", type=int, default=9999, help="permutation-test resamples")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.histogram_bins < 1:
        p.error("--histogram-bins must be >= 1")
    if args.bootstrap < 0 or args.permutations < 1 or not 0 < args.confidence < 1:
        p.error("need --bootstrap >= 0, --permutations >= 1 and 0 < --confidence < 1")
    settings = MetricSettings(entropy=args.entropy, kurtosis=args.kurtosis,
                              kurtosis_of=args.kurtosis_of, histogram_bins=args.histogram_bins)
    try:
        result = metrics_result(load_scores(args.base), load_scores(args.tuned), settings,
                                n_bootstrap=args.bootstrap, n_permutations=args.permutations,
                                confidence=args.confidence, seed=args.seed)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", flush=True)
        return 2
    out = {"base_dir": str(args.base), "tuned_dir": str(args.tuned), **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for m in METRICS:
        r = result[m]
        print(f"{m:<24} base {_fmt(r['base'])}  tuned {_fmt(r['tuned'])}  "
              f"change {_fmt(r['relative_change'], '+.2f')}%  p {_fmt(r['p_value'], '.3g')}  n {r['n']}")
    print(f"wrote {args.out}")
    return 0


def _fmt(value: float | None, spec: str = ".6g") -> str:
    return "n/a" if value is None else format(value, spec)
