"""eapcore.stats.analysis against direct computations written out here (loops, enumeration, scipy)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from eapcore.stats import analysis as A
from eapcore.stats import metrics as M
from eapcore.specs import MetricSettings
from test_metrics import OPTIONS, make_graph, make_mask, random_scores, ref_metrics, ref_shannon


# ---- paired tests and effect sizes ----------------------------------------------------------------

def test_paired_tests_match_enumeration():
    rng = np.random.default_rng(1)
    n = 8
    base = rng.normal(size=n)
    tuned = base + rng.normal(0.6, 1.0, size=n)
    d = tuned - base
    # permutation: all 2^n within-pair swaps flip the sign of d_i
    observed = abs(d.mean())
    flips = [abs(np.mean(d * np.array(signs))) for signs in itertools.product([1, -1], repeat=n)]
    p_perm = np.mean([f >= observed - 1e-12 for f in flips])
    assert A.paired_permutation_p(base, tuned, 9999, seed=0) == pytest.approx(p_perm)
    # Wilcoxon exact: distribution of W+ over all sign assignments of the ranks of |d|
    ranks = scipy.stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    dist = [sum(r for r, sgn in zip(ranks, signs) if sgn) for signs in itertools.product([0, 1], repeat=n)]
    p_w = min(1.0, 2 * min(np.mean([w <= w_plus for w in dist]), np.mean([w >= w_plus for w in dist])))
    assert A.wilcoxon_p(base, tuned) == pytest.approx(p_w)
    # effect sizes
    assert A.cohens_dz(base, tuned) == pytest.approx(d.mean() / np.sqrt(sum((x - d.mean()) ** 2 for x in d) / (n - 1)))
    assert A.paired_rank_biserial(base, tuned) == pytest.approx((w_plus - (ranks.sum() - w_plus)) / ranks.sum())
    assert A.paired_rank_biserial(tuned, base) == pytest.approx(-A.paired_rank_biserial(base, tuned))


def test_paired_tests_degenerate_cases():
    x = np.arange(5.0)
    assert A.wilcoxon_p(x, x) == 1.0
    assert math.isnan(A.cohens_dz(x, x)) and math.isnan(A.paired_rank_biserial(x, x))
    assert A.paired_rank_biserial(x, x + 1) == 1.0


def test_group_tests_match_direct_computation():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=4), rng.normal(1.0, 1.0, size=4)
    u = sum((bj > ai) + 0.5 * (bj == ai) for ai in a for bj in b)
    assert A.rank_biserial(a, b) == pytest.approx(2 * u / 16 - 1)
    pooled = np.sqrt((3 * np.var(a, ddof=1) + 3 * np.var(b, ddof=1)) / 6)
    assert A.cohens_d(a, b) == pytest.approx((b.mean() - a.mean()) / pooled)
    # independent permutation: all C(8, 4) relabellings
    both = np.concatenate([a, b])
    observed = abs(b.mean() - a.mean())
    stats_ = [abs(both[list(c)].mean() - np.delete(both, list(c)).mean())
              for c in itertools.combinations(range(8), 4)]
    p = np.mean([s >= observed - 1e-12 for s in stats_])
    assert A.independent_permutation_p(a, b, 9999, seed=0) == pytest.approx(p)


def test_paired_comparison_fields_and_values():
    rng = np.random.default_rng(3)
    graph = make_graph(2)
    mask = make_mask(graph)
    base = M.real_edge_scores(random_scores(rng, 12, graph), mask)
    tuned = M.real_edge_scores(1.5 * random_scores(rng, 12, graph), mask)
    settings = MetricSettings(entropy="per_sample")
    out = A.paired_comparison(base, tuned, settings, n_bootstrap=300, seed=4)
    per_b, per_t = M.per_sample_metrics(base, settings), M.per_sample_metrics(tuned, settings)
    for name in M.METRICS:
        r = out[name]
        want_b, want_t = ref_metrics(base.tolist(), settings)[name], ref_metrics(tuned.tolist(), settings)[name]
        assert r["base"] == pytest.approx(want_b) and r["tuned"] == pytest.approx(want_t)
        assert r["p_value"] == pytest.approx(scipy.stats.wilcoxon(per_t[name], per_b[name]).pvalue)
        assert r["n"] == r["n_samples"] == 12 and r["confidence"] == 0.95
        assert r["ci_low"] <= r["relative_change"] <= r["ci_high"] or name != "activation_intensity"
    assert out["activation_intensity"]["relative_change"] > 0 and out["activation_intensity"]["effect_size_dz"] > 0
    assert out == A.paired_comparison(base, tuned, settings, n_bootstrap=300, seed=4)  # fixed seed
    no_ci = A.paired_comparison(base, tuned, settings, n_bootstrap=0)
    assert math.isnan(no_ci["kurtosis"]["ci_low"])
    with pytest.raises(ValueError, match="equal shapes"):
        A.paired_comparison(base, tuned[:5])


def test_bootstrap_replicates_recompute_the_pooled_metrics():
    rng = np.random.default_rng(5)
    b, t = rng.standard_t(3, size=(6, 20)), rng.standard_t(3, size=(6, 20)) * 1.2
    idx = A.bootstrap_indices(6, 5, np.random.default_rng(0))
    assert idx.shape == (5, 6)
    for settings in OPTIONS:
        rep = A.bootstrap_replicates(b, t, idx, idx, settings)
        for r in range(5):
            mb, mt = ref_metrics(b[idx[r]].tolist(), settings), ref_metrics(t[idx[r]].tolist(), settings)
            for name in M.METRICS:
                assert rep[name][r] == pytest.approx(100 * (mt[name] - mb[name]) / abs(mb[name]), rel=1e-8)


def test_bootstrap_ci_is_the_percentile_interval():
    rng = np.random.default_rng(6)
    b, t = rng.normal(size=(15, 30)), rng.normal(size=(15, 30)) * 1.1
    out = A.paired_comparison(b, t, n_bootstrap=400, seed=7, confidence=0.9)
    idx = A.bootstrap_indices(15, 400, np.random.default_rng(7))
    rep = A.bootstrap_replicates(b, t, idx, idx)
    for name in M.METRICS:
        assert out[name]["ci_low"] == pytest.approx(np.percentile(rep[name], 5))
        assert out[name]["ci_high"] == pytest.approx(np.percentile(rep[name], 95))


def test_group_comparison():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(9, 30)), 2.0 * rng.normal(size=(13, 30))
    out = A.group_comparison(a, b, n_bootstrap=200, seed=1)
    per_a, per_b = M.per_sample_metrics(a), M.per_sample_metrics(b)
    for name in M.METRICS:
        r = out[name]
        assert r["n_a"] == 9 and r["n_b"] == 13
        assert r["a"] == pytest.approx(ref_metrics(a.tolist(), MetricSettings())[name])
        assert r["p_value"] == pytest.approx(scipy.stats.mannwhitneyu(per_b[name], per_a[name]).pvalue)
        assert r["ci_low"] <= r["ci_high"]
    ai = out["activation_intensity"]
    assert ai["relative_change"] == pytest.approx(100 * (ai["b"] - ai["a"]) / ai["a"]) and ai["relative_change"] > 50
    assert ai["rank_biserial"] > 0.5 and ai["cohen_d"] > 0
    with pytest.raises(ValueError, match="same real edges"):
        A.group_comparison(a, b[:, :10])


def test_select_samples():
    s = np.arange(12.0).reshape(4, 3)
    assert np.array_equal(A.select_samples(s, [7, 3, 9, 1], [9, 7]), s[[2, 0]])
    with pytest.raises(KeyError, match="not in the scores"):
        A.select_samples(s, [7, 3, 9, 1], [5])


# ---- where in the network --------------------------------------------------------------------------

def test_parse_node():
    assert A.parse_node("input", 4) == (-1, "input", -1)
    assert A.parse_node("logits", 4) == (4, "logits", -1)
    assert A.parse_node("a2", 4) == (2, "attention", -1)
    assert A.parse_node("m3", 4) == (3, "mlp", -1)
    assert A.parse_node("a1.k", 4) == (1, "k", -1)
    assert A.parse_node("a12.h7", 14) == (12, "attention", 7)
    assert A.parse_node("a0.h3.q", 4) == (0, "q", 3)
    assert A.parse_node("a1.kv1.v", 4) == (1, "v", 1)
    with pytest.raises(ValueError):
        A.parse_node("b3", 4)


def test_edge_relative_change_and_zero_base():
    rng = np.random.default_rng(9)
    graph = make_graph(2)
    mask = make_mask(graph)
    base, tuned = random_scores(rng, 4, graph), random_scores(rng, 4, graph)
    base[:, 0, 0] = 0.0  # input -> a0.q is real; its base mean |s| is 0
    rc = A.edge_relative_change(base, tuned, mask)
    for f in range(mask.shape[0]):
        for b in range(mask.shape[1]):
            mb = np.mean([abs(float(base[n, f, b])) for n in range(4)])
            mt = np.mean([abs(float(tuned[n, f, b])) for n in range(4)])
            if not mask[f, b] or mb == 0:
                assert math.isnan(rc[f, b])
            else:
                assert rc[f, b] == pytest.approx(100 * (mt - mb) / mb)
    assert mask[0, 0] and math.isnan(rc[0, 0])


def test_node_entropy_matches_loop():
    rng = np.random.default_rng(12)
    graph = make_graph(3)
    mask = make_mask(graph)
    scores = random_scores(rng, 4, graph)
    out = A.node_entropy(scores, mask, graph)
    assert list(out.node) == graph["forward"]
    for f in range(mask.shape[0]):
        means = [np.mean(np.abs(scores[:, f, b])) for b in range(mask.shape[1]) if mask[f, b]]
        assert out.entropy[f] == pytest.approx(ref_shannon(means))
        assert out.n_edges[f] == len(means)
        if len(means) > 1:
            assert out.normalised_entropy[f] == pytest.approx(ref_shannon(means) / math.log(len(means)))
        else:
            assert math.isnan(out.normalised_entropy[f])


def test_pattern_diversity_and_pca():
    rng = np.random.default_rng(13)
    s = rng.normal(size=(6, 20))
    p = [np.abs(r) / np.abs(r).sum() for r in s]
    pairs = [1 - p[i] @ p[j] / np.linalg.norm(p[i]) / np.linalg.norm(p[j])
             for i in range(6) for j in range(i + 1, 6)]
    assert A.pattern_diversity(s) == pytest.approx(np.mean(pairs))
    same = np.tile(s[:1], (4, 1)) * np.array([[1.0], [2.0], [-3.0], [0.5]])  # same pattern, scaled
    assert A.pattern_diversity(same) == pytest.approx(0.0, abs=1e-12)
    coords, ratio = A.pca_2d(s[:4], s[4:])
    assert [c.shape for c in coords] == [(4, 2), (2, 2)]
    assert 0 < ratio[1] <= ratio[0] and ratio.sum() <= 1 + 1e-12
    stacked = np.concatenate(coords)
    centred = np.array(p) - np.mean(p, axis=0)
    total_var = (centred ** 2).sum()
    assert (stacked ** 2).sum(axis=0) / total_var == pytest.approx(ratio)
    with pytest.raises(ValueError):
        A.pattern_diversity(s[:1])


# ---- across pairs -------------------------------------------------------------------------------------

def test_cross_pair_correlation():
    gains = {"A": 5.0, "B": 12.0, "C": 1.0, "D": 7.0, "E": 3.0, "F": 9.0}
    rng = np.random.default_rng(14)
    rows = [{"pair": p, "metric": m, "dataset": "math", "relative_change": g * (1 + 0.2 * rng.normal()),
             "accuracy_gain": g} for p, g in gains.items() for m in M.METRICS]
    out = A.cross_pair_correlation(rows, by=["dataset"])
    assert len(out) == 3 and set(out.metric) == set(M.METRICS)
    for _, r in out.iterrows():
        x = [row["relative_change"] for row in rows if row["metric"] == r.metric]
        y = [row["accuracy_gain"] for row in rows if row["metric"] == r.metric]
        assert r.n_pairs == 6 and r.caveat == ""
        assert r.pearson_r == pytest.approx(scipy.stats.pearsonr(x, y).statistic)
        assert r.spearman_p == pytest.approx(scipy.stats.spearmanr(x, y).pvalue)
    few = A.cross_pair_correlation([r for r in rows if r["pair"] in "ABCD"])
    assert (few.n_pairs == 4).all() and few.caveat.str.startswith("only 4 pairs").all()
    assert few.pearson_r.notna().all()
    two = A.cross_pair_correlation([r for r in rows if r["pair"] in "AB"])
    assert two.pearson_r.isna().all() and two.caveat.str.startswith("only 2 pairs").all()
    with pytest.raises(ValueError, match="twice"):
        A.cross_pair_correlation(rows + rows[:1])


# ---- the paper's size ----------------------------------------------------------------------------------

def test_paper_sized_comparison_is_consistent():
    """N=100 of the 28-layer graph (time: benchmarks/stats_speed.py): 1,000 paired replicates per
    metric, and the comparison's interval around its own relative change."""
    rng = np.random.default_rng(15)
    graph = make_graph(28)
    mask = make_mask(graph)
    base = M.real_edge_scores(random_scores(rng, 100, graph), mask)
    tuned = M.real_edge_scores(random_scores(rng, 100, graph, heavy=True), mask)
    idx = A.bootstrap_indices(100, 1000, np.random.default_rng(0))
    reps = A.bootstrap_replicates(base, tuned, idx, idx)
    assert all(v.shape == (1000,) and np.isfinite(v).all() for v in reps.values())
    out = A.paired_comparison(base, tuned, n_bootstrap=1000)
    assert set(out) == set(reps)
    for metric, row in out.items():
        expected = M.relative_change(M.compute_metrics(base)[metric], M.compute_metrics(tuned)[metric])
        assert row["relative_change"] == pytest.approx(expected)
        assert row["ci_low"] <= row["relative_change"] <= row["ci_high"], metric
