"""Uncertainty, the real edges' nodes and node entropy, answer groups and cross-pair correlation.

Inputs are real-edge score matrices `s` float64 [N, E] (`metrics.real_edge_scores`) or stored
`[N, F, B]` score tensors with their bool `[F, B]` mask and graph dict (graph.json).

- Paired comparisons (base vs tuned on the same questions): Wilcoxon signed-rank and a paired
  permutation test (scipy, permutation_type="samples", statistic mean(tuned - base)) on the
  per-sample metric values; Cohen's d_z and the matched-pairs rank-biserial; a percentile bootstrap
  CI of the relative change of the pooled metric, resampling questions with replacement (the same
  draw for both models).
- Group comparisons (independent samples, e.g. wrong vs correct answers): Mann-Whitney U and an
  independent permutation test; Cohen's d (pooled SD) and rank-biserial P(b > a) - P(b < a);
  bootstrap resampling each group on its own. "relative_change" is of b against a.
- Effect sizes and mean differences are signed "second minus first" (tuned - base, b - a).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy import stats
from scipy.special import xlogy

from eapcore.stats.metrics import (METRICS, compute_metrics, per_sample_metrics, relative_change,
                             resampled_metrics)
from eapcore.graph import parse_node as _graph_node
from eapcore.specs import MetricSettings

SMALL_N_PAIRS = 5  # below this many model pairs a cross-pair correlation gets a caveat


# ---- uncertainty ------------------------------------------------------------------------------

def bootstrap_indices(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """int [R, n]: R resamples of n indices drawn with replacement."""
    return rng.integers(0, n, size=(n_resamples, n))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices [R, k] -> how often each of n samples is drawn, float [R, n]."""
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def bootstrap_replicates(s_first: np.ndarray, s_second: np.ndarray, idx_first: np.ndarray,
                         idx_second: np.ndarray, settings: MetricSettings = MetricSettings()
                         ) -> dict[str, np.ndarray]:
    """Relative change (second vs first) of each pooled metric on resampled samples.

    idx_* int [R, n_*]: sample indices of each replicate (pass the same array twice for a paired
    bootstrap). Returns {metric: float64 [R]}.
    """
    first = resampled_metrics(s_first, _counts(idx_first, len(s_first)), settings)
    second = resampled_metrics(s_second, _counts(idx_second, len(s_second)), settings)
    return {m: relative_change(first[m], second[m]) for m in METRICS}


def _percentile_ci(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _finite_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def wilcoxon_p(base: np.ndarray, tuned: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired values [n]; 1.0 if all differences are 0."""
    d = tuned - base
    if d.size == 0:
        return float("nan")
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(tuned, base).pvalue)


def paired_permutation_p(base: np.ndarray, tuned: np.ndarray, n_resamples: int, seed: int) -> float:
    """Two-sided paired permutation p of mean(tuned - base) (labels swapped within pairs).

    scipy enumerates all 2^n swaps exactly when 2^n <= n_resamples.
    """
    if base.size == 0:
        return float("nan")
    res = stats.permutation_test((base, tuned), lambda x, y, axis: np.mean(y - x, axis=axis),
                                 permutation_type="samples", vectorized=True,
                                 n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return float(res.pvalue)


def independent_permutation_p(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> float:
    """Two-sided permutation p of mean(b) - mean(a), group labels shuffled."""
    if a.size == 0 or b.size == 0:
        return float("nan")
    res = stats.permutation_test((a, b), lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis),
                                 permutation_type="independent", vectorized=True,
                                 n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return float(res.pvalue)


def cohens_dz(base: np.ndarray, tuned: np.ndarray) -> float:
    """Paired effect size mean(d) / sd(d) (ddof 1), d = tuned - base; NaN if sd is 0 or n < 2."""
    d = tuned - base
    sd = d.std(ddof=1) if d.size > 1 else 0.0
    return float(d.mean() / sd) if sd > 0 else float("nan")


def paired_rank_biserial(base: np.ndarray, tuned: np.ndarray) -> float:
    """Matched-pairs rank-biserial (W+ - W-) / (W+ + W-) over non-zero d = tuned - base, in [-1, 1]."""
    d = tuned - base
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    ranks = stats.rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean b - mean a) / pooled SD (ddof 1 in each group); NaN if undefined."""
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return float("nan")
    pooled = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    return float((b.mean() - a.mean()) / pooled) if pooled > 0 else float("nan")


def rank_biserial(a: np.ndarray, b: np.ndarray) -> float:
    """P(b > a) - P(b < a) over all cross pairs (= 2 U_b / (n_a n_b) - 1)."""
    if a.size == 0 or b.size == 0:
        return float("nan")
    u_b = stats.mannwhitneyu(b, a).statistic
    return float(2.0 * u_b / (a.size * b.size) - 1.0)


def paired_comparison(base: np.ndarray, tuned: np.ndarray, settings: MetricSettings = MetricSettings(),
                      n_bootstrap: int = 1000, n_permutations: int = 9999, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, dict[str, Any]]:
    """Base vs tuned real-edge scores [N, E] of the same N questions in the same order.

    Returns {metric: {base, tuned, relative_change, difference (tuned - base; read it when |base|
    is near 0 and the relative change explodes), p_value (Wilcoxon on per-sample values),
    p_value_permutation, ci_low, ci_high (bootstrap of the relative change; NaN if n_bootstrap is
    0), confidence, effect_size_dz, rank_biserial, per_sample_base_mean, per_sample_tuned_mean,
    n (pairs with finite per-sample values, used by the tests), n_samples}}.
    """
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if base.shape != tuned.shape:
        raise ValueError(f"paired comparison needs equal shapes [N, E]; base {base.shape}, tuned {tuned.shape}")
    pooled_b, pooled_t = compute_metrics(base, settings), compute_metrics(tuned, settings)
    per_b, per_t = per_sample_metrics(base, settings), per_sample_metrics(tuned, settings)
    replicates = {}
    if n_bootstrap > 0:
        idx = bootstrap_indices(len(base), n_bootstrap, np.random.default_rng(seed))
        replicates = bootstrap_replicates(base, tuned, idx, idx, settings)
    out = {}
    for m in METRICS:
        b, t = _finite_pairs(per_b[m], per_t[m])
        low, high = _percentile_ci(replicates[m], confidence) if replicates else (float("nan"),) * 2
        out[m] = {
            "base": pooled_b[m], "tuned": pooled_t[m],
            "relative_change": relative_change(pooled_b[m], pooled_t[m]),
            "difference": pooled_t[m] - pooled_b[m],
            "p_value": wilcoxon_p(b, t),
            "p_value_permutation": paired_permutation_p(b, t, n_permutations, seed),
            "ci_low": low, "ci_high": high, "confidence": confidence,
            "effect_size_dz": cohens_dz(b, t), "rank_biserial": paired_rank_biserial(b, t),
            "per_sample_base_mean": float(b.mean()) if b.size else float("nan"),
            "per_sample_tuned_mean": float(t.mean()) if t.size else float("nan"),
            "n": int(b.size), "n_samples": int(len(base)),
        }
    return out


def group_comparison(a: np.ndarray, b: np.ndarray, settings: MetricSettings = MetricSettings(),
                     n_bootstrap: int = 1000, n_permutations: int = 9999, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """Two independent groups of real-edge scores a [N_a, E], b [N_b, E] (e.g. wrong vs correct).

    Returns {metric: {a, b (pooled metrics), relative_change (b vs a), difference (b - a),
    p_value (Mann-Whitney U on
    per-sample values), p_value_permutation, ci_low, ci_high, confidence, cohen_d, rank_biserial,
    per_sample_a_mean, per_sample_b_mean, n_a, n_b}}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"groups need the same real edges [N, E]; got {a.shape} and {b.shape}")
    pooled_a, pooled_b = compute_metrics(a, settings), compute_metrics(b, settings)
    per_a, per_b = per_sample_metrics(a, settings), per_sample_metrics(b, settings)
    replicates = {}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        idx_a = bootstrap_indices(len(a), n_bootstrap, rng)
        idx_b = bootstrap_indices(len(b), n_bootstrap, rng)
        replicates = bootstrap_replicates(a, b, idx_a, idx_b, settings)
    out = {}
    for m in METRICS:
        xa, xb = per_a[m][np.isfinite(per_a[m])], per_b[m][np.isfinite(per_b[m])]
        low, high = _percentile_ci(replicates[m], confidence) if replicates else (float("nan"),) * 2
        p = float(stats.mannwhitneyu(xb, xa).pvalue) if xa.size and xb.size else float("nan")
        out[m] = {
            "a": pooled_a[m], "b": pooled_b[m],
            "relative_change": relative_change(pooled_a[m], pooled_b[m]),
            "difference": pooled_b[m] - pooled_a[m],
            "p_value": p, "p_value_permutation": independent_permutation_p(xa, xb, n_permutations, seed),
            "ci_low": low, "ci_high": high, "confidence": confidence,
            "cohen_d": cohens_d(xa, xb), "rank_biserial": rank_biserial(xa, xb),
            "per_sample_a_mean": float(xa.mean()) if xa.size else float("nan"),
            "per_sample_b_mean": float(xb.mean()) if xb.size else float("nan"),
            "n_a": int(xa.size), "n_b": int(xb.size),
        }
    return out


def select_samples(s: np.ndarray, sample_ids: Sequence[Any], wanted: Sequence[Any]) -> np.ndarray:
    """Rows of s [N, ...] whose id (sample_ids, manifest order) is in `wanted`, in wanted's order."""
    position = {sid: i for i, sid in enumerate(sample_ids)}
    missing = [w for w in wanted if w not in position]
    if missing:
        raise KeyError(f"{len(missing)} wanted sample id(s) not in the scores, e.g. {missing[:5]}")
    return np.asarray(s)[[position[w] for w in wanted]]


# ---- where in the network ----------------------------------------------------------------------

SOURCE_TYPES = ("input", "attention", "mlp")
DEST_TYPES = ("q", "k", "v", "mlp", "logits")


def parse_node(name: str, n_layers: int) -> tuple[int, str, int]:
    """Node name -> (layer, type, head), from `eapcore.graph.parse_node`.

    layer: -1 for input, n_layers for logits. type: input | attention | mlp for sources,
    q | k | v | mlp | logits for destinations. head: query head (a{l}.h{h}[.q]) or key-value head
    (a{l}.kv{g}.k / .v) at head granularity, else -1.
    """
    info = _graph_node(name)
    if info.kind in ("input", "logits"):
        return (-1 if info.kind == "input" else n_layers), info.kind, -1
    head = -1 if info.head is None else info.head
    return info.layer, "mlp" if info.kind == "mlp" else info.port or "attention", head


def edge_mean_abs(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over samples of |s|: [N, F, B] -> float64 [F, B], NaN outside the real-edge mask."""
    scores, mask = np.asarray(scores), np.asarray(mask, dtype=bool)
    out = np.full(mask.shape, np.nan)
    out[mask] = np.abs(scores[:, mask].astype(np.float64)).mean(axis=0)
    return out


def edge_relative_change(base_scores: np.ndarray, tuned_scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paper Figure 2: per-edge 100 (mean|s|_tuned - mean|s|_base) / mean|s|_base, float64 [F, B].

    NaN outside the mask and where the base mean |s| is exactly 0 (undefined change).
    """
    return relative_change(edge_mean_abs(base_scores, mask), edge_mean_abs(tuned_scores, mask))


def edge_nodes(graph: dict[str, Any], mask: np.ndarray):
    """One row per real edge, in the order of `metrics.real_edge_scores` (row-major over the mask):
    src, dst, src_layer, src_type, src_head, dst_layer, dst_type, dst_head (`parse_node`)."""
    import pandas as pd

    mask = np.asarray(mask, dtype=bool)
    fwd, bwd, n_layers = graph["forward"], graph["backward"], int(graph["n_layers"])
    if mask.shape != (len(fwd), len(bwd)):
        raise ValueError(f"mask {mask.shape} does not match the graph ({len(fwd)} x {len(bwd)})")
    fi, bi = np.nonzero(mask)
    columns = {"src": np.asarray(fwd, dtype=object)[fi], "dst": np.asarray(bwd, dtype=object)[bi]}
    for prefix, names, idx in (("src", fwd, fi), ("dst", bwd, bi)):
        layer, kind, head = zip(*(parse_node(n, n_layers) for n in names))
        columns[f"{prefix}_layer"] = np.asarray(layer)[idx]
        columns[f"{prefix}_type"] = np.asarray(kind, dtype=object)[idx]
        columns[f"{prefix}_head"] = np.asarray(head)[idx]
    return pd.DataFrame(columns)


def node_entropy(scores: np.ndarray, mask: np.ndarray, graph: dict[str, Any]):
    """Paper Figure 3b: entropy (nats) of each source node's outgoing-edge distribution.

    p_e = mean_n |s_{n,e}| / sum over the node's real outgoing edges. Returns a DataFrame with
    node, layer, type, head, n_edges, entropy, normalised_entropy (entropy / log n_edges; NaN for
    one edge), in forward order.
    """
    import pandas as pd

    mask = np.asarray(mask, dtype=bool)
    m = np.where(mask, np.nan_to_num(edge_mean_abs(scores, mask)), 0.0)  # [F, B]
    total = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.log(total) - xlogy(m, m).sum(axis=1) / total
        n_edges = mask.sum(axis=1)
        normalised = np.where(n_edges > 1, entropy / np.log(n_edges), np.nan)
    info = [parse_node(n, int(graph["n_layers"])) for n in graph["forward"]]
    return pd.DataFrame({
        "node": graph["forward"], "layer": [i[0] for i in info], "type": [i[1] for i in info],
        "head": [i[2] for i in info], "n_edges": n_edges, "entropy": entropy,
        "normalised_entropy": normalised,
    })


def _normalised_patterns(s: np.ndarray) -> np.ndarray:
    """|s| rows scaled to sum 1: [N, E] -> float64 [N, E] (all-zero rows stay zero)."""
    x = np.abs(np.asarray(s, dtype=np.float64))
    total = x.sum(axis=1, keepdims=True)
    return np.divide(x, total, out=np.zeros_like(x), where=total > 0)


def pattern_diversity(s: np.ndarray) -> float:
    """Paper Figure 3a: mean pairwise cosine distance 1 - cos(p_n, p_m) over pairs n < m of the
    per-sample normalised |s| vectors (s [N, E], N >= 2). 0: identical patterns."""
    p = _normalised_patterns(s)
    if len(p) < 2:
        raise ValueError("pattern diversity needs at least 2 samples")
    norm = np.linalg.norm(p, axis=1)
    if np.any(norm == 0):
        raise ValueError("a sample has all-zero scores: its cosine distance is undefined")
    u = p / norm[:, None]
    upper = np.triu_indices(len(p), k=1)
    return float(np.mean(1.0 - (u @ u.T)[upper]))


def pca_2d(*groups: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Project the normalised |s| patterns of several groups (each [N_i, E]) onto the first two
    principal components of all of them together.

    Computed from the [N, N] Gram matrix of the centred patterns (N = all questions, E edges, and
    usually N << E), whose eigenvectors scaled by the singular values are the projections.
    Returns ([coords_i float64 [N_i, 2]], explained variance ratio [2]).
    """
    patterns = [_normalised_patterns(g) for g in groups]
    stacked = np.concatenate(patterns)
    centred = stacked - stacked.mean(axis=0)
    var, u = np.linalg.eigh(centred @ centred.T)  # ascending eigenvalues = squared singular values
    var, u = np.clip(var[::-1], 0, None), u[:, ::-1]
    k = min(2, len(var))
    ratio = np.zeros(2)
    if var.sum() > 0:
        ratio[:k] = var[:k] / var.sum()
    coords = np.zeros((len(stacked), 2))
    coords[:, :k] = u[:, :k] * np.sqrt(var[:k])
    bounds = np.cumsum([0] + [len(p) for p in patterns])
    return [coords[bounds[i]:bounds[i + 1]] for i in range(len(patterns))], ratio


# ---- across pairs ---------------------------------------------------------------------------

def few_pairs_caveat(n_pairs: int) -> str:
    """The warning for a correlation across fewer than SMALL_N_PAIRS model pairs ("" from there on)."""
    if n_pairs >= SMALL_N_PAIRS:
        return ""
    return f"only {n_pairs} pairs: the correlation is descriptive and its p-values are unreliable"


def cross_pair_correlation(rows: Any, by: Sequence[str] = ()):
    """Correlation across model pairs between each metric's relative change and accuracy gain.

    rows: long-format records / DataFrame with columns pair, metric, relative_change,
    accuracy_gain (tuned minus base accuracy, given by the caller) and the `by` columns (e.g.
    dataset, alpha). One result row per metric (x by): n_pairs, pearson_r, pearson_p,
    spearman_rho, spearman_p, caveat ("" when n_pairs >= 5). Fewer than 3 pairs: NaN statistics.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    keys = ["metric", *by]
    missing = {"pair", "relative_change", "accuracy_gain", *keys} - set(df.columns)
    if missing:
        raise ValueError(f"cross_pair_correlation: rows lack column(s) {sorted(missing)}")
    if df.duplicated([*keys, "pair"]).any():
        raise ValueError("cross_pair_correlation: a pair appears twice in one group; add `by` columns")
    out = []
    for group, sub in df.groupby(keys, sort=True):
        sub = sub[np.isfinite(sub["relative_change"].astype(float)) & np.isfinite(sub["accuracy_gain"].astype(float))]
        x, y = sub["relative_change"].to_numpy(float), sub["accuracy_gain"].to_numpy(float)
        n = len(sub)
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        row.update(n_pairs=n, pearson_r=np.nan, pearson_p=np.nan, spearman_rho=np.nan, spearman_p=np.nan)
        small = f"only {n} pairs: " if n < SMALL_N_PAIRS else ""
        if n < 3:
            row["caveat"] = small + "too few for a correlation"
        elif np.ptp(x) == 0 or np.ptp(y) == 0:
            row["caveat"] = small + "a constant value: correlation undefined"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
            row.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                       spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
            row["caveat"] = few_pairs_caveat(n)
        out.append(row)
    return pd.DataFrame(out)
