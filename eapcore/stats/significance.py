"""Per-cell tests of a relative-change map: which cells' changes do the questions support?

A map compares side a with side b (a run's base with its tuned model, or one run with another).
A cell is a set of real edges (one edge, a layer x module block, a head, ...). Its value on
question n is c_n = sum_{e in cell} |s_{n,e}| (float64), and the map shows the cell's relative
change 100 (sum_n c^b_n - sum_n c^a_n) / sum_n c^a_n ("b vs a", `metrics.relative_change`).

Tests, two-sided, one per cell:
- paired (the same questions on both sides, rows in the same order): Wilcoxon signed-rank test of
  d_n = c^b_n - c^a_n; zero differences are dropped (Wilcoxon's convention), leaving n_nz pairs.
  The p-value is exact when n_nz <= EXACT_MAX_N and no two |d_n| tie: under H0 each of the 2^n_nz
  sign patterns of the ranks is equally likely, and the table of W+ counts comes from a dynamic
  programme. Exact matters here because Benjamini-Hochberg looks at the smallest p-values among
  thousands of cells, where the normal approximation of a small sample is least accurate (at n = 12
  it puts the smallest possible p, 2^-11 = 4.9e-4, at 2.2e-3). Otherwise (more pairs, or ties, where
  the exact table does not apply) the normal approximation with the tie-corrected variance
  sum(midrank^2) / 4, without continuity correction (scipy.stats.wilcoxon's defaults).
  No non-zero difference at all: p = 1 (nothing to reject).
- unpaired (different questions): Mann-Whitney U of c^a vs c^b, normal approximation with tie
  correction and continuity correction (scipy.stats.mannwhitneyu(method="asymptotic")); all values
  tied: p = 1.
Multiple testing: Benjamini-Hochberg adjusted p-values (q-values, scipy.stats.
false_discovery_control) over the cells of one map; a cell passes at FDR level alpha when
q <= alpha. The expected share of false discoveries among the passing cells is then <= alpha
(BH under independence or positive dependence of the cells' tests).

Noise floor: the same map and tests for a pair with no systematic difference by construction: the
two sides' labels exchanged at random (fixed seed), within each question when paired (so every
|d_n| is kept and only its direction is random), across the pooled questions otherwise. Under the
hypothesis "a and b are the same model up to noise" the exchanged pair has the same distribution
as the real one, so its map shows what this run's noise alone draws.

All statistics are vectorised over cells and computed in column blocks (BLOCK cells), so a
head-granularity full edge matrix stays within memory.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from scipy import sparse, special, stats

from eapcore.stats.metrics import relative_change

EXACT_MAX_N = 50  # signed-rank: exact null distribution up to this many non-zero differences
BLOCK = 1 << 15  # cells per block of the vectorised tests
NOISE_SEED = 0


# ---- cell values -----------------------------------------------------------------------------------

def cell_sums(x: np.ndarray, cells: np.ndarray | None, n_cells: int) -> np.ndarray:
    """Per-question cell values: x [N, E] real-edge scores, cells int [E] (the cell of each edge,
    -1: in no cell; None: each edge its own cell) -> float64 [N, n_cells] sums of |x| per cell."""
    x = np.asarray(x)
    if cells is None:
        return np.abs(x.astype(np.float64))
    cells = np.asarray(cells)
    keep = np.nonzero(cells >= 0)[0]
    onehot = sparse.csr_matrix((np.ones(keep.size), (keep, cells[keep])), shape=(x.shape[1], n_cells))
    out = np.empty((x.shape[0], n_cells))
    for i in range(0, x.shape[0], 16):  # 16 questions at a time: float64 copies stay small
        out[i:i + 16] = np.asarray(np.abs(x[i:i + 16].astype(np.float64)) @ onehot)
    return out


# ---- ranks and the two rank tests ---------------------------------------------------------------------

def midranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share the mean of their ranks) of each row of x [C, N] ->
    float64 [C, N] (scipy.stats.rankdata(method="average") row by row)."""
    n = x.shape[1]
    order = np.argsort(x, axis=1)
    s = np.take_along_axis(x, order, axis=1)
    differs = s[:, 1:] != s[:, :-1]
    ranked = np.broadcast_to(np.arange(1.0, n + 1.0), s.shape).copy()  # rank of each sorted position
    tied = np.nonzero(~differs.all(axis=1))[0]  # rows with ties: average over each run of equal values
    if tied.size:
        idx = np.broadcast_to(np.arange(n), (tied.size, n))
        first = np.ones((tied.size, n), bool)
        first[:, 1:] = differs[tied]  # position starts a run of equal values
        last = np.ones((tied.size, n), bool)
        last[:, :-1] = differs[tied]  # position ends one
        start = np.maximum.accumulate(np.where(first, idx, 0), axis=1)
        end = np.minimum.accumulate(np.where(last, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]
        ranked[tied] = (start + end) / 2.0 + 1.0
    ranks = np.empty(s.shape)
    np.put_along_axis(ranks, order, ranked, axis=1)
    return ranks


@lru_cache(maxsize=1)
def _signed_rank_cdf() -> np.ndarray:
    """P(W+ <= k) under H0 for n = 0..EXACT_MAX_N pairs: float64 [EXACT_MAX_N + 1, K + 1],
    K = EXACT_MAX_N (EXACT_MAX_N + 1) / 2 (rows padded with 1 past n (n + 1) / 2).

    counts_n(k) = number of subsets of {1..n} summing to k = counts_{n-1}(k) + counts_{n-1}(k - n),
    exact in float64 (at most 2^50 < 2^53)."""
    top = EXACT_MAX_N * (EXACT_MAX_N + 1) // 2
    counts = np.zeros(top + 1)
    counts[0] = 1.0
    cdf = np.empty((EXACT_MAX_N + 1, top + 1))
    for n in range(EXACT_MAX_N + 1):
        if n:
            counts[n:] = counts[n:] + counts[:-n].copy()
        cdf[n] = np.cumsum(counts) / 2.0 ** n
    return cdf


def _signed_rank_block(d: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d [C, N] differences, signs [K, N] (+1/-1 per question) -> p [K, C] of d * signs, n_nz [C],
    exact [C]."""
    a = np.abs(d)
    nonzero = a > 0
    n_nz = nonzero.sum(axis=1)
    ranks = midranks(a) - (~nonzero).sum(axis=1, keepdims=True)  # zeros take the lowest ranks
    ranks = np.where(nonzero, ranks, 0.0)
    sq = (ranks * ranks).sum(axis=1)
    no_ties = sq == n_nz * (n_nz + 1) * (2 * n_nz + 1) / 6.0  # midranks are exact in float64
    exact = no_ties & (n_nz <= EXACT_MAX_N)
    mean, sd = n_nz * (n_nz + 1) / 4.0, np.sqrt(sq / 4.0)
    cdf = _signed_rank_cdf()
    n_ex = np.where(exact, n_nz, 0)
    p = np.empty((len(signs), len(d)))
    for k, sign in enumerate(signs):
        w = (ranks * ((d * sign) > 0)).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (w - mean) / sd
        p_normal = special.erfc(np.abs(z) / np.sqrt(2.0))
        w_int = np.rint(np.where(exact, w, 0)).astype(np.int64)
        low = cdf[n_ex, w_int]  # P(W+ <= w)
        high = 1.0 - np.where(w_int > 0, cdf[n_ex, np.maximum(w_int - 1, 0)], 0.0)  # P(W+ >= w)
        p_exact = np.minimum(1.0, 2.0 * np.minimum(low, high))
        p[k] = np.where(n_nz == 0, 1.0, np.where(exact, p_exact, p_normal))
    return p, n_nz, exact


def signed_rank_test(d: np.ndarray, flips: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Two-sided Wilcoxon signed-rank test of each column of d [N, C] (paired differences, b - a).

    flips: optional [K, N] of +1/-1: the same test on d * flips[k][:, None] as well (they share
    the ranks of |d|). Returns {"p": [C], "p_flipped": [K, C], "n": non-zero pairs [C] int,
    "exact": [C] bool}; conventions in the module docstring."""
    d = np.asarray(d, dtype=np.float64)
    signs = np.ones((1, d.shape[0])) if flips is None else np.vstack([np.ones(d.shape[0]), flips])
    p = np.empty((len(signs), d.shape[1]))
    n_nz = np.empty(d.shape[1], dtype=np.int64)
    exact = np.empty(d.shape[1], dtype=bool)
    for j in range(0, d.shape[1], BLOCK):
        block = slice(j, j + BLOCK)
        p[:, block], n_nz[block], exact[block] = _signed_rank_block(np.ascontiguousarray(d[:, block].T), signs)
    return {"p": p[0], "p_flipped": p[1:], "n": n_nz, "exact": exact}


def rank_sum_test(a: np.ndarray, b: np.ndarray, permutations: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Two-sided Mann-Whitney U test of each column of a [Na, C] against b [Nb, C].

    permutations: optional [K, Na + Nb] orderings of the pooled rows; for each, the test of its
    first Na rows against the rest as well (same ranks). Returns {"p": [C], "p_permuted": [K, C]}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = len(a), len(b)
    n = na + nb
    orders = [np.arange(n)] + ([] if permutations is None else list(permutations))
    p = np.empty((len(orders), a.shape[1]))
    mu = na * nb / 2.0
    for j in range(0, a.shape[1], BLOCK):
        block = slice(j, j + BLOCK)
        ranks = midranks(np.ascontiguousarray(np.concatenate([a[:, block], b[:, block]]).T))  # [C, n]
        ties = n * (n + 1) * (2 * n + 1) / 6.0 - (ranks * ranks).sum(axis=1)  # sum(t^3 - t) / 12
        var = na * nb / 12.0 * ((n + 1) - 12.0 * ties / (n * (n - 1)))
        sd = np.sqrt(np.clip(var, 0.0, None))
        for k, order in enumerate(orders):
            u_b = ranks[:, order[na:]].sum(axis=1) - nb * (nb + 1) / 2.0
            u = np.maximum(u_b, na * nb - u_b) - 0.5  # continuity correction
            with np.errstate(divide="ignore", invalid="ignore"):
                z = (u - mu) / sd
            p[k, block] = np.where(sd > 0, np.minimum(1.0, special.erfc(z / np.sqrt(2.0))), 1.0)
    return {"p": p[0], "p_permuted": p[1:]}


def fdr_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q) of the finite entries of p (any shape); NaN stays."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def smallest_p(n: int, paired: bool = True) -> float:
    """The smallest two-sided p the paired test can give with n questions (exact range), used to
    say when no cell of a large map can pass; NaN outside the exact range or unpaired."""
    return 2.0 ** (1 - n) if paired and 0 < n <= EXACT_MAX_N else float("nan")


# ---- one map: both sides, its tests and its noise floor -----------------------------------------

def _cell_blocks(a: np.ndarray, b: np.ndarray, cells: np.ndarray | None, n_cells: int):
    """(cell slice, cell values of a, of b) per block: one block when edges are summed into cells,
    BLOCK edges at a time when each edge is its own cell (the full edge matrix)."""
    if cells is not None:
        yield slice(0, n_cells), cell_sums(a, cells, n_cells), cell_sums(b, cells, n_cells)
        return
    for j in range(0, n_cells, BLOCK):
        block = slice(j, min(j + BLOCK, n_cells))
        yield block, cell_sums(a[:, block], None, 0), cell_sums(b[:, block], None, 0)


def compare_cells(a: np.ndarray, b: np.ndarray, cells: np.ndarray | None, n_cells: int, *, paired: bool,
                  seed: int = NOISE_SEED) -> dict[str, Any]:
    """The relative-change map of side b against side a with its per-cell tests and noise floor.

    a [Na, E], b [Nb, E]: real-edge scores (paired: Na == Nb, row n the same question on both
    sides); cells, n_cells: as in `cell_sums` (None: n_cells = E). Returns arrays [n_cells]:
    mean_a, mean_b (mean over questions of the cell value), relative_change (%, b vs a), p, q
    (BH over the map's cells), noise_change, noise_p, noise_q (the map and tests of the
    label-exchanged pair); n (paired: non-zero differences per cell, else Na + Nb), exact (paired:
    exact p per cell); and paired, n_a, n_b, relabel (the noise floor's exchange: paired, bool [Na]
    questions whose sides were swapped; unpaired, the order [Na + Nb] of the pooled questions a,
    then b, whose first Na rows became side a)."""
    na, nb = len(a), len(b)
    if paired and na != nb:
        raise ValueError(f"a paired comparison needs the same questions on both sides; got {na} and {nb}")
    rng = np.random.default_rng(seed)
    swap = rng.random(na) < 0.5  # paired noise floor: sides exchanged within these questions
    order = rng.permutation(na + nb)  # unpaired: pooled questions dealt out again
    out = {k: np.empty(n_cells) for k in ("mean_a", "mean_b", "noise_mean_a", "noise_mean_b", "p", "noise_p")}
    out["n"], out["exact"] = np.full(n_cells, na + nb), np.zeros(n_cells, bool)
    for block, ca, cb in _cell_blocks(a, b, cells, n_cells):
        if paired:
            test = signed_rank_test(cb - ca, np.where(swap, -1.0, 1.0)[None])
            out["p"][block], out["noise_p"][block] = test["p"], test["p_flipped"][0]
            out["n"][block], out["exact"][block] = test["n"], test["exact"]
            noise_a, noise_b = np.where(swap[:, None], cb, ca), np.where(swap[:, None], ca, cb)
        else:
            test = rank_sum_test(ca, cb, order[None])
            out["p"][block], out["noise_p"][block] = test["p"], test["p_permuted"][0]
            pooled = np.concatenate([ca, cb])[order]
            noise_a, noise_b = pooled[:na], pooled[na:]
        for key, values in (("mean_a", ca), ("mean_b", cb), ("noise_mean_a", noise_a), ("noise_mean_b", noise_b)):
            out[key][block] = values.mean(axis=0)
    noise_a, noise_b = out.pop("noise_mean_a"), out.pop("noise_mean_b")
    return {**out, "relative_change": relative_change(out["mean_a"], out["mean_b"]), "q": fdr_adjust(out["p"]),
            "noise_change": relative_change(noise_a, noise_b), "noise_q": fdr_adjust(out["noise_p"]),
            "paired": paired, "n_a": na, "n_b": nb, "relabel": swap if paired else order}
