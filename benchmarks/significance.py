"""Time of the per-cell tests behind the relative-change maps (eapcore.stats.significance.
compare_cells: cell values, Wilcoxon signed-rank or Mann-Whitney per cell, Benjamini-Hochberg,
noise floor), once per run and view before the pages' cache holds it, on random scores of the
sizes a full edge matrix has.

    .venv/bin/python benchmarks/significance.py [--n 100] [--skip-7b]

Shapes (real edges E of the full matrix, one cell per edge): a 30-layer model at layer
granularity (SmolLM2-135M: 3,691), the same at head granularity (9 / 3 heads: 70,651), a
Qwen2-7B-like model at head granularity (28 layers, 28 / 4 heads: 408,227). Prints a Markdown table.
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
from eapcore.stats import significance  # noqa: E402

SHAPES = [("30 layers, layer granularity", Graph(30, 9, 3, "layer")),
          ("30 layers, head granularity (9 / 3 heads)", Graph(30, 9, 3, "head")),
          ("28 layers, head granularity (28 / 4 heads)", Graph(28, 28, 4, "head"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="questions per side")
    p.add_argument("--skip-7b", action="store_true", help="leave out the largest shape")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for label, graph in SHAPES[:2] if args.skip_7b else SHAPES:
        e = graph.n_real_edges
        a = rng.standard_normal((args.n, e), dtype=np.float32)
        b = a * rng.lognormal(0, 0.3, size=(args.n, e)).astype(np.float32)
        for paired in (True, False):
            t = time.perf_counter()
            significance.compare_cells(a, b, None, e, paired=paired)
            rows.append((label, e, "paired" if paired else "unpaired", time.perf_counter() - t))
            print(f"{label} {'paired' if paired else 'unpaired'}: {rows[-1][-1]:.2f} s", file=sys.stderr)
        del a, b
    print(f"\nMachine: {platform.node()} · {platform.processor() or platform.machine()} · n = {args.n} questions "
          "per side\n")
    print("| full edge matrix | real edges | test | seconds |\n|---|---|---|---|")
    for label, e, kind, sec in rows:
        print(f"| {label} | {e:,} | {kind} | {sec:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
