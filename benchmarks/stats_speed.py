"""Time of the run-level statistics at the paper's size (CPU): the three pooled metrics under every
metric option, and the paired comparison of base against tuned (bootstrap of 1,000 resamples and
the full `paired_comparison` with its permutation test), on N=100 random samples of the 28-layer
layer-granularity graph (57 x 113 nodes, 3,221 real edges; heavy-tailed scores for "tuned").

    .venv/bin/python benchmarks/stats_speed.py [--repeat 3]

Prints a Markdown table (best of --repeat, wall seconds); BENCHMARKS.md "Statistics at the paper's
size" holds the numbers of record.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eapcore.graph import Graph  # noqa: E402
from eapcore.specs import MetricSettings  # noqa: E402
from eapcore.stats import analysis as A  # noqa: E402
from eapcore.stats import metrics as M  # noqa: E402

OPTIONS = [MetricSettings(), MetricSettings(entropy="per_sample"), MetricSettings(entropy="histogram", histogram_bins=7),
           MetricSettings(kurtosis="pearson"), MetricSettings(kurtosis_of="absolute"),
           MetricSettings(entropy="histogram", kurtosis="pearson", kurtosis_of="absolute", histogram_bins=100)]


def scores(rng: np.random.Generator, n: int, mask: np.ndarray, heavy: bool) -> np.ndarray:
    """Real-edge scores float64 [n, E] of random [n, F, B] scores (t(3) when heavy), per-sample scale."""
    shape = (n, *mask.shape)
    s = rng.standard_t(3, size=shape) if heavy else rng.normal(size=shape)
    s = (s * rng.uniform(0.5, 2.0, size=(n, 1, 1))).astype(np.float32)
    return M.real_edge_scores(s * mask[None], mask)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="questions per side")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    mask = Graph(28, 4, 2, "layer").real_edge_mask
    mask = mask.numpy() if hasattr(mask, "numpy") else np.asarray(mask)
    rng = np.random.default_rng(15)
    base, tuned = scores(rng, args.n, mask, False), scores(rng, args.n, mask, True)
    idx = A.bootstrap_indices(args.n, 1000, np.random.default_rng(0))
    rows = [
        (f"pooled metrics, {len(OPTIONS)} option sets", best(lambda: [M.compute_metrics(base, o) for o in OPTIONS], args.repeat)),
        ("paired bootstrap, 1,000 resamples", best(lambda: A.bootstrap_replicates(base, tuned, idx, idx), args.repeat)),
        ("`paired_comparison` (bootstrap 1,000 + permutation 9,999)",
         best(lambda: A.paired_comparison(base, tuned, n_bootstrap=1000), args.repeat)),
    ]
    print(f"{platform.processor() or platform.machine()}, {args.n} samples, {mask.shape[0]} x {mask.shape[1]} nodes, "
          f"{int(mask.sum())} real edges; best of {args.repeat}\n")
    print("| computation | seconds |\n|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
