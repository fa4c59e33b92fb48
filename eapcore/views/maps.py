"""Relative-change maps with per-cell tests: the heatmap views of one run (base vs tuned) and of
two runs (eapcore.views.compare).

A map compares side a with side b on the real edges of one graph. Its cells (`cells`):
- "dst": destination layer x destination type (q, k, v, mlp, logits; logits at layer L);
- "src": source layer x source type (input at layer -1, attention, mlp);
- "layers": source layer x destination layer of the edges into destinations of type `kind`;
- "heads" (head granularity): layer x head of the attention heads as sources (kind "source") or as
  q / k / v destinations (k and v per key-value head);
- "full": every edge its own cell, rows source nodes, columns destination nodes.
Each cell's values, change, q-values and noise floor come from eapcore.stats.significance
(`compare_cells`): a and b are the mean over the cell's edges of the per-edge mean |s| over
questions; relative_change = 100 (sum b - sum a) / sum a over the cell's edges.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from eapcore.runs.results import RunData
from eapcore.stats import analysis, significance

VIEWS = ("dst", "src", "layers", "heads", "full")
KINDS = {"layers": analysis.DEST_TYPES, "heads": ("source", "q", "k", "v")}
GRIDS = ("a", "b", "relative_change", "p_value", "q_value", "noise_change", "noise_q", "n_edges")


def cells(edges: pd.DataFrame, view: str, kind: str = "") -> tuple[np.ndarray | None, pd.DataFrame]:
    """The cell of every real edge in a view and the cells' labels.

    edges: `analysis.edge_nodes` of the graph. Returns (cell int [E] in cell order, -1 for edges
    the view does not draw; None for "full"), and a frame with one row per cell: its row and
    column label (columns named after the edge fields they come from). ValueError for an unknown
    view or kind, or a view the graph has no edges for."""
    if view == "full":
        return None, edges[["src", "dst"]]  # already in cell (mask) order
    if view in KINDS and kind not in KINDS[view]:
        raise ValueError(f"view {view!r} needs a kind out of {KINDS[view]}, not {kind!r}")
    keys, where = {
        "dst": (["dst_layer", "dst_type"], None),
        "src": (["src_layer", "src_type"], None),
        "layers": (["src_layer", "dst_layer"], edges["dst_type"] == kind),
        "heads": ((["src_layer", "src_head"], (edges["src_type"] == "attention") & (edges["src_head"] >= 0))
                  if kind == "source" else (["dst_layer", "dst_head"], (edges["dst_type"] == kind) & (edges["dst_head"] >= 0))),
    }.get(view, (None, None))
    if keys is None:
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    chosen = np.ones(len(edges), bool) if where is None else where.to_numpy()
    if not chosen.any():
        raise ValueError(f"the graph has no edges for view {view!r} {kind!r}"
                         + (" (head views need a head-granularity run)" if view == "heads" else ""))
    groups = edges[chosen].groupby(keys, sort=True)
    cell = np.full(len(edges), -1)
    cell[chosen] = groups.ngroup().to_numpy()
    return cell, groups.size().index.to_frame(index=False)


def _axis_order(values: pd.Series, field: str) -> list:
    """Row / column order: node types in graph order, numbers ascending."""
    present = set(values)
    if field == "dst_type":
        return [t for t in analysis.DEST_TYPES if t in present]
    if field == "src_type":
        return [t for t in analysis.SOURCE_TYPES if t in present]
    return sorted(present)


def change_map(a: np.ndarray, b: np.ndarray, graph: dict, mask: np.ndarray, view: str, kind: str = "", *,
               paired: bool) -> dict[str, Any]:
    """The map of side b against side a: real-edge scores a [Na, E], b [Nb, E] on `graph` / `mask`.

    Returns {grid: DataFrame rows x columns} for every name in GRIDS (a, b: mean |s| per edge of
    the cell; relative_change %; p_value, q_value: the cell's test and its Benjamini-Hochberg
    adjustment over the map; noise_change, noise_q: the same for the label-exchanged pair; n_edges)
    and "meta": {view, kind, paired, n_a, n_b, n_cells, exact_share (paired: share of cells with an
    exact p), smallest_p (paired, N <= 50: 2^(1-N), else NaN), best_q (smallest_p x n_cells capped
    at 1: no cell can have a smaller q-value; NaN with smallest_p)}. "full": rows source nodes,
    columns destination nodes, NaN off the mask."""
    edges = analysis.edge_nodes(graph, mask)
    cell, labels = cells(edges, view, kind)
    n_cells = len(labels)
    res = significance.compare_cells(a, b, cell, n_cells, paired=paired)
    n_edges = np.ones(n_cells) if cell is None else np.bincount(cell[cell >= 0], minlength=n_cells).astype(float)
    values = {"a": res["mean_a"] / n_edges, "b": res["mean_b"] / n_edges, "relative_change": res["relative_change"],
              "p_value": res["p"], "q_value": res["q"], "noise_change": res["noise_change"],
              "noise_q": res["noise_q"], "n_edges": n_edges}
    if view == "full":  # cells are the real edges in mask order
        mask = np.asarray(mask, dtype=bool)
        out: dict[str, Any] = {}
        for name, v in values.items():
            grid = np.full(mask.shape, np.nan)
            grid[mask] = v
            out[name] = pd.DataFrame(grid, index=pd.Index(graph["forward"], name="src"),
                                     columns=pd.Index(graph["backward"], name="dst"))
    else:
        row, col = labels.columns
        if view == "layers":  # every destination type's table on the same axes
            rows, cols = sorted(set(edges["src_layer"])), sorted(set(edges["dst_layer"]))
        else:
            rows, cols = _axis_order(labels[row], row), _axis_order(labels[col], col)
        index = pd.MultiIndex.from_frame(labels)
        out = {name: pd.Series(v, index=index).unstack(col).reindex(index=rows, columns=cols)
               for name, v in values.items()}
    smallest = significance.smallest_p(res["n_a"], paired)
    out["meta"] = {"view": view, "kind": kind, "paired": paired, "n_a": res["n_a"], "n_b": res["n_b"],
                   "n_cells": n_cells, "exact_share": float(res["exact"].mean()) if paired else 0.0,
                   "smallest_p": smallest, "best_q": float(np.minimum(1.0, smallest * n_cells))}
    return out


def run_map(data: RunData, view: str, kind: str = "", sample: int | None = None) -> dict[str, Any]:
    """A run's map, tuned (b) against base (a), paired by question; `sample` (a position in the
    run's samples): that question alone (its tests are then meaningless: p = 1)."""
    rows = slice(None) if sample is None else slice(sample, sample + 1)
    return change_map(data.real_edges["base"][rows], data.real_edges["tuned"][rows], data.base.graph, data.mask,
                      view, kind, paired=True)


def passing(grids: dict[str, Any], level: float | None, noise: bool = False) -> pd.DataFrame:
    """Bool grid: cells whose change passes at FDR level `level` (q <= level; every cell with a
    finite change when level is None, i.e. no test applied); noise=True: of the noise floor."""
    change, q = (grids["noise_change"], grids["noise_q"]) if noise else (grids["relative_change"], grids["q_value"])
    finite = change.notna()
    return finite if level is None else finite & (q <= level)


def edge_rows(grids: dict[str, Any], level: float | None = None) -> pd.DataFrame:
    """A "full" map as one row per real edge: src, dst, a, b, relative_change, p_value, q_value and
    (level given) passes; rows in graph order."""
    cols = [g for g in ("a", "b", "relative_change", "p_value", "q_value") if g in grids]
    long = pd.concat({g: grids[g].stack(future_stack=True) for g in cols}, axis=1)
    long = long[long["a"].notna()]
    long.index = long.index.set_names(["src", "dst"])
    if level is not None:
        long["passes"] = passing(grids, level).stack(future_stack=True).reindex(long.index).to_numpy()
    return long.reset_index()


def map_table(grids: dict[str, Any], level: float | None, names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """A map as a table, its sides named `names`: the full matrix one row per edge (`edge_rows`,
    sorted by |change|), other views one row per map row with columns "value | column" for the
    two sides, relative_change, q_value and n_edges."""
    if grids["meta"]["view"] == "full":
        rows = edge_rows(grids, level).rename(columns=dict(zip(("a", "b"), names)))
        return rows.reindex(rows["relative_change"].abs().sort_values(ascending=False).index)
    parts = dict(zip(names, ("a", "b"))) | {g: g for g in ("relative_change", "q_value", "n_edges")}
    table = pd.concat({name: grids[g] for name, g in parts.items()}, axis=1)
    table.columns = [f"{value} | {column}" for value, column in table.columns]
    return table
