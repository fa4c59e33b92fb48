"""eapcore.stats.significance against independent computations: enumeration of all sign patterns,
scipy's own tests column by column, a Benjamini-Hochberg written out, cell sums by loops; and the
tests' behaviour on pairs with and without a real difference."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from eapcore.stats import significance as S


def _enumerated_signed_rank_p(d: np.ndarray) -> float:
    """Two-sided exact p of W+ over all 2^n sign patterns of the ranks of the non-zero |d|."""
    d = d[d != 0]
    ranks = scipy.stats.rankdata(np.abs(d))
    w = ranks[d > 0].sum()
    null = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))])
    return min(1.0, 2 * min(np.mean(null <= w + 1e-9), np.mean(null >= w - 1e-9)))


def test_midranks_equal_scipy_rankdata_with_ties():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 4, (30, 9)), rng.normal(size=(30, 9))]).astype(float)
    np.testing.assert_array_equal(S.midranks(x), scipy.stats.rankdata(x, axis=1))


def test_signed_rank_exact_equals_enumeration_with_zeros():
    rng = np.random.default_rng(1)
    d = rng.normal(0.4, 1.0, size=(9, 40))
    d[rng.random(d.shape) < 0.15] = 0.0  # zero differences are dropped
    res = S.signed_rank_test(d)
    want = [_enumerated_signed_rank_p(d[:, j]) for j in range(d.shape[1])]
    np.testing.assert_allclose(res["p"], want, rtol=1e-12)
    assert res["exact"].all()
    np.testing.assert_array_equal(res["n"], (d != 0).sum(axis=0))


@pytest.mark.parametrize("n, method", [(30, "exact"), (80, "asymptotic")])
def test_signed_rank_equals_scipy_columnwise(n, method):
    """Exact up to 50 non-zero pairs without ties, the normal approximation beyond, as scipy's
    wilcoxon(method=...) of each column on its own."""
    rng = np.random.default_rng(n)
    d = rng.normal(0.3, 1.0, size=(n, 60))
    res = S.signed_rank_test(d)
    want = [scipy.stats.wilcoxon(d[:, j], method=method).pvalue for j in range(d.shape[1])]
    np.testing.assert_allclose(res["p"], want, rtol=1e-10)
    assert res["exact"].all() == (method == "exact")


def test_signed_rank_ties_use_the_tie_corrected_normal_approximation():
    rng = np.random.default_rng(3)
    d = rng.integers(-4, 5, size=(25, 50)).astype(float)  # ties and zeros in every column
    res = S.signed_rank_test(d)
    assert not res["exact"].any()
    want = [scipy.stats.wilcoxon(d[:, j], method="asymptotic").pvalue for j in range(d.shape[1])]
    np.testing.assert_allclose(res["p"], want, rtol=1e-10)


def test_signed_rank_flips_and_degenerate_columns():
    rng = np.random.default_rng(4)
    d = rng.normal(size=(12, 20))
    d[:, 0] = 0.0  # no difference at all: nothing to reject
    flips = np.where(rng.random((2, 12)) < 0.5, -1.0, 1.0)
    res = S.signed_rank_test(d, flips)
    assert res["p"][0] == 1.0 and res["n"][0] == 0
    for k in range(2):  # the flipped tests are the tests of the flipped differences
        np.testing.assert_allclose(res["p_flipped"][k], S.signed_rank_test(d * flips[k][:, None])["p"])
    all_positive = np.abs(d[:, 1:]) + 0.1
    assert S.signed_rank_test(all_positive)["p"] == pytest.approx(S.smallest_p(12))  # 2^(1-n)
    assert S.smallest_p(12) == 2.0 ** -11 and np.isnan(S.smallest_p(60)) and np.isnan(S.smallest_p(12, paired=False))


def test_rank_sum_equals_scipy_mannwhitneyu_and_its_permutations():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 6, size=(14, 40)).astype(float)
    b = rng.integers(1, 7, size=(9, 40)).astype(float)
    a[:, :20], b[:, :20] = rng.normal(size=(14, 20)), rng.normal(0.8, 1.0, size=(9, 20))  # half without ties
    order = rng.permutation(23)
    res = S.rank_sum_test(a, b, order[None])
    np.testing.assert_allclose(res["p"], scipy.stats.mannwhitneyu(a, b, axis=0, method="asymptotic").pvalue,
                               rtol=1e-10)
    pooled = np.concatenate([a, b])[order]
    np.testing.assert_allclose(res["p_permuted"][0], scipy.stats.mannwhitneyu(
        pooled[:14], pooled[14:], axis=0, method="asymptotic").pvalue, rtol=1e-10)
    same = np.ones((5, 3))
    assert (S.rank_sum_test(same, same)["p"] == 1.0).all()  # all values tied: nothing to reject


def test_fdr_adjust_equals_benjamini_hochberg_written_out():
    rng = np.random.default_rng(6)
    p = rng.uniform(size=50) ** 3
    p[[3, 17]] = np.nan
    q = S.fdr_adjust(p)
    finite = p[np.isfinite(p)]
    m = finite.size
    order = np.argsort(finite)
    want = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):  # q_(i) = min over j >= i of p_(j) m / j
        running = min(running, finite[order[rank - 1]] * m / rank)
        want[order[rank - 1]] = running
    np.testing.assert_allclose(q[np.isfinite(p)], want, rtol=1e-12)
    assert np.isnan(q[[3, 17]]).all()


def test_cell_sums_equal_loops():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20, 30)).astype(np.float32)
    cells = rng.integers(-1, 4, size=30)
    got = S.cell_sums(x, cells, 4)
    for c in range(4):
        np.testing.assert_allclose(got[:, c], [sum(abs(float(v)) for v, k in zip(row, cells) if k == c) for row in x])
    np.testing.assert_array_equal(S.cell_sums(x, None, 30), np.abs(x.astype(np.float64)))


def _pair(rng, n=40, cells=50, effect=0.0):
    """Real-edge-like scores of two sides sharing each question's scale; side b larger by `effect`
    on the first half of the edges."""
    scale = rng.lognormal(0, 0.5, size=(n, 1))
    a = rng.normal(size=(n, cells)) * scale
    b = rng.normal(size=(n, cells)) * scale
    b[:, : cells // 2] *= 1 + effect
    return a.astype(np.float32), b.astype(np.float32)


def test_compare_cells_finds_a_real_change_and_its_noise_floor_does_not():
    rng = np.random.default_rng(8)
    a, b = _pair(rng, effect=1.0)
    res = S.compare_cells(a, b, None, 50, paired=True)
    np.testing.assert_allclose(res["relative_change"], 100 * (np.abs(b).astype(float).mean(0) - np.abs(a).astype(float).mean(0))
                               / np.abs(a).astype(float).mean(0), rtol=1e-9)
    want_p = [scipy.stats.wilcoxon(np.abs(b[:, j]).astype(float) - np.abs(a[:, j]), method="exact").pvalue
              for j in range(50)]
    np.testing.assert_allclose(res["p"], want_p, rtol=1e-9)
    np.testing.assert_allclose(res["q"], scipy.stats.false_discovery_control(want_p))
    passes = res["q"] <= 0.05
    assert passes[:25].sum() >= 20 and passes[25:].sum() <= 1  # the changed half, not the other
    assert (res["noise_q"] <= 0.05).sum() == 0  # the swapped pair has no systematic difference
    # the noise floor: the same map and test with the two sides exchanged in the questions `relabel` names
    swap = res["relabel"]
    assert swap.dtype == bool and 5 < swap.sum() < 35
    xa = np.where(swap[:, None], np.abs(b), np.abs(a)).astype(float)
    xb = np.where(swap[:, None], np.abs(a), np.abs(b)).astype(float)
    np.testing.assert_allclose(res["noise_change"], 100 * (xb.mean(0) - xa.mean(0)) / xa.mean(0), rtol=1e-9)
    np.testing.assert_allclose(res["noise_p"], [scipy.stats.wilcoxon(xb[:, j] - xa[:, j], method="exact").pvalue
                                                for j in range(50)], rtol=1e-9)


def test_compare_cells_under_no_difference_passes_nothing():
    rng = np.random.default_rng(9)
    a, b = _pair(rng, n=30, cells=400, effect=0.0)
    res = S.compare_cells(a, b, None, 400, paired=True)
    assert 0.01 < (res["p"] < 0.05).mean() < 0.10  # calibrated: about 5 % of null cells below 0.05
    assert (res["q"] <= 0.05).sum() == 0
    same = S.compare_cells(a, a, None, 400, paired=True)
    assert (same["p"] == 1).all() and (same["relative_change"] == 0).all() and (same["n"] == 0).all()


def test_compare_cells_unpaired_and_blocks():
    rng = np.random.default_rng(10)
    a, _ = _pair(rng, n=20, cells=70)
    _, b = _pair(rng, n=13, cells=70, effect=1.5)
    cells = np.repeat(np.arange(7), 10)
    res = S.compare_cells(a, b, cells, 7, paired=False)
    ca, cb = S.cell_sums(a, cells, 7), S.cell_sums(b, cells, 7)
    np.testing.assert_allclose(res["p"], scipy.stats.mannwhitneyu(ca, cb, axis=0, method="asymptotic").pvalue)
    pooled = np.concatenate([ca, cb])[res["relabel"]]  # noise floor: the pooled questions dealt out again
    np.testing.assert_allclose(res["noise_p"], scipy.stats.mannwhitneyu(pooled[:20], pooled[20:], axis=0,
                                                                        method="asymptotic").pvalue)
    np.testing.assert_allclose(res["noise_change"], 100 * (pooled[20:].mean(0) - pooled[:20].mean(0)) / pooled[:20].mean(0))
    assert res["n_a"] == 20 and res["n_b"] == 13 and not res["exact"].any()
    with pytest.raises(ValueError, match="same questions"):
        S.compare_cells(a, b, cells, 7, paired=True)
    # the full matrix runs in blocks of edges: the same numbers as one block
    full = S.compare_cells(a, b, None, 70, paired=False)
    blocked = S.BLOCK
    try:
        S.BLOCK = 16
        small = S.compare_cells(a, b, None, 70, paired=False)
    finally:
        S.BLOCK = blocked
    for k in ("p", "q", "noise_p", "noise_change", "relative_change"):
        np.testing.assert_allclose(small[k], full[k], rtol=1e-12)
