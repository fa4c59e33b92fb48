"""Two finished runs that share a graph, compared edge by edge: one side (the tuned or the base
model) of run A against the same side of run B, with the per-cell tests and noise floor of
eapcore.views.maps; and the `compare` command.

Pairing: the comparison is paired by question (Wilcoxon signed-rank) when both runs scored the
same questions of the same dataset (name, source and split equal, the same set of question ids:
e.g. alpha 0.1 vs 0.5 of one pair, whose selection does not depend on alpha); otherwise it is
unpaired (Mann-Whitney U on each run's own questions), and `pairing` says why.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import pandas as pd

from eapcore.runs import results
from eapcore.runs.results import RunData, RunInfo
from eapcore.views import maps

SIDES = ("tuned", "base")


def graph_identity(graph: dict | None) -> tuple | None:
    """What two runs must share to be compared edge by edge: the node lists of graph.json."""
    return None if graph is None else (tuple(graph.get("forward", ())), tuple(graph.get("backward", ())))


def comparable(runs: list[RunInfo]) -> dict[str, list[str]]:
    """{key: keys of the other finished runs with the same graph}, for every finished run that has
    at least one (in the order of `runs`)."""
    ident = {r.key: graph_identity(results.read_graph(r)) for r in runs if r.finished}
    partners = {k: [o for o, g in ident.items() if o != k and g == v] for k, v in ident.items() if v is not None}
    return {k: v for k, v in partners.items() if v}


def _dataset(info: RunInfo) -> tuple:
    d = info.spec_dict.get("dataset") or {}
    return d.get("name"), d.get("source"), d.get("split")


def pairing(a: RunData, b: RunData) -> dict[str, Any]:
    """{"paired": bool, "order": positions of A's questions in B (paired) or None, "shared": number
    of question ids in both, "reason": one sentence}."""
    ids_a, ids_b = a.sample_ids, b.sample_ids
    shared = len(set(ids_a) & set(ids_b))
    if _dataset(a.info) != _dataset(b.info):
        return {"paired": False, "order": None, "shared": 0,
                "reason": f"unpaired: different datasets ({a.info.dataset} vs {b.info.dataset}), "
                          f"{len(ids_a)} vs {len(ids_b)} questions"}
    if set(ids_a) != set(ids_b) or len(ids_a) != len(ids_b):
        return {"paired": False, "order": None, "shared": shared,
                "reason": f"unpaired: the runs scored different questions of {a.info.dataset} "
                          f"({len(ids_a)} vs {len(ids_b)}, {shared} in both)"}
    position = {idx: i for i, idx in enumerate(ids_b)}
    return {"paired": True, "order": np.array([position[i] for i in ids_a]), "shared": shared,
            "reason": f"paired: both runs scored the same {len(ids_a)} questions of {a.info.dataset}"}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def spec_differences(a: RunInfo, b: RunInfo) -> list[str]:
    """The settings in which the runs' specs differ: ["selection.alpha: 0.1 → 0.5", ...]."""
    fa, fb = _flat(a.spec_dict), _flat(b.spec_dict)
    return [f"{k}: {fa.get(k, '–')} → {fb.get(k, '–')}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def compare_map(a: RunData, b: RunData, side: str, view: str, kind: str = "") -> dict[str, Any]:
    """maps.change_map of `side` of run B against the same side of run A. meta gains side,
    pairing (the sentence), differences (spec_differences) and the two runs' keys and labels.
    ValueError when the runs do not share a graph or the side is unknown."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    if graph_identity(a.base.graph) != graph_identity(b.base.graph) or not np.array_equal(a.mask, b.mask):
        raise ValueError(f"runs {a.key[:8]} and {b.key[:8]} do not share a graph "
                         f"({len(a.base.graph['forward'])} x {len(a.base.graph['backward'])} vs "
                         f"{len(b.base.graph['forward'])} x {len(b.base.graph['backward'])} nodes, "
                         f"{a.info.granularity} vs {b.info.granularity} granularity): compare runs of one model "
                         "architecture at one granularity")
    pair = pairing(a, b)
    scores_b = b.real_edges[side] if pair["order"] is None else b.real_edges[side][pair["order"]]
    out = maps.change_map(a.real_edges[side], scores_b, a.base.graph, a.mask, view, kind, paired=pair["paired"])
    out["meta"].update(side=side, pairing=pair["reason"], differences=spec_differences(a.info, b.info),
                       keys=(a.key, b.key), labels=(a.info.label, b.info.label))
    return out


def compare_edges(a: RunData, b: RunData, side: str = "tuned", level: float | None = 0.05) -> pd.DataFrame:
    """One row per real edge (maps.edge_rows of the full map): src, dst, a, b (mean |s| of the side
    in run A / B), relative_change (% B vs A), p_value, q_value, passes; meta in `attrs`."""
    grids = compare_map(a, b, side, "full")
    rows = maps.edge_rows(grids, level)
    rows.attrs["meta"] = grids["meta"]
    rows.attrs["noise_pass"] = int(maps.passing(grids, level, noise=True).sum().sum()) if level is not None else None
    return rows


# ---- command line -------------------------------------------------------------------------------------

def _resolve(key: str, root: str | None) -> RunInfo:
    """A finished run by its key or a unique prefix of it; ValueError with what to do otherwise."""
    runs = results.finished_runs(root)
    found = [r for r in runs if r.key == key] or [r for r in runs if r.key.startswith(key)]
    if len(found) == 1:
        return found[0]
    where = results.cache_root(root) / "runs"
    if not found:
        raise ValueError(f"no finished run with key {key!r} in {where} (list them with `python -m eapcore cache list`)")
    raise ValueError(f"key prefix {key!r} matches {len(found)} runs in {where}: give more characters")


def command(argv: list[str]) -> int:
    """`python -m eapcore compare KEY_A KEY_B [--side tuned] [--level 0.05] [--json|--csv]`."""
    p = argparse.ArgumentParser(
        prog="python -m eapcore compare",
        description="Compare two finished runs that share a graph, edge by edge: mean |s| of one side (tuned or "
                    "base model) in run B against run A, a test per edge across questions (paired Wilcoxon "
                    "signed-rank when both runs scored the same questions, Mann-Whitney U otherwise) and "
                    "Benjamini-Hochberg FDR control over the edges.")
    p.add_argument("key_a", metavar="KEY_A", help="run A (key or unique prefix; the reference)")
    p.add_argument("key_b", metavar="KEY_B", help="run B (compared against A)")
    p.add_argument("--side", choices=SIDES, default="tuned", help="which model of each run (default: tuned)")
    p.add_argument("--level", type=float, default=0.05, help="FDR level: an edge passes when q <= level")
    p.add_argument("--top", type=int, default=20, help="passing edges listed in the text output")
    p.add_argument("--cache", help="cache folder (default: $EAP_CACHE_DIR or ./cache)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="every edge and the comparison's settings as JSON")
    fmt.add_argument("--csv", action="store_true", help="every edge as CSV")
    args = p.parse_args(argv)
    if not 0 < args.level <= 1:
        p.error("--level must be in (0, 1]")
    try:
        a, b = (results.load_run(_resolve(k, args.cache)) for k in (args.key_a, args.key_b))
        rows = compare_edges(a, b, args.side, args.level)
    except (ValueError, KeyError, OSError, results.RunNotReady) as err:
        print(f"eapcore compare: {err}", file=sys.stderr)
        return 2
    meta = rows.attrs["meta"]
    table = rows.rename(columns={"a": "a_mean_abs", "b": "b_mean_abs"})
    if args.csv:
        table.to_csv(sys.stdout, index=False)
        return 0
    summary = {"a": {"key": a.key, "label": a.info.label}, "b": {"key": b.key, "label": b.info.label},
               "side": args.side, "paired": meta["paired"], "pairing": meta["pairing"],
               "test": "wilcoxon_signed_rank" if meta["paired"] else "mann_whitney_u", "fdr": "benjamini_hochberg",
               "level": args.level, "n_a": meta["n_a"], "n_b": meta["n_b"], "differences": meta["differences"],
               "n_edges": len(rows), "n_pass": int(rows["passes"].sum()), "noise_n_pass": rows.attrs["noise_pass"]}
    if args.json:
        print(json.dumps({**summary, "edges": json.loads(table.to_json(orient="records"))}, indent=1))
        return 0
    print(f"A  {a.info.label}\nB  {b.info.label}")
    print(f"{args.side} model of each run; the runs differ in: {'; '.join(meta['differences']) or 'nothing'}")
    test = "Wilcoxon signed-rank per edge" if meta["paired"] else "Mann-Whitney U per edge"
    print(f"{meta['pairing']} ({test}, Benjamini-Hochberg over the edges)")
    print(f"{summary['n_pass']} of {len(rows)} edges pass at FDR {args.level:g} "
          f"(noise floor, {'sides swapped per question' if meta['paired'] else 'questions reshuffled between the runs'} "
          f"at random: {summary['noise_n_pass']}); change = B vs A of mean |s|")
    passing = table[table["passes"]]
    top = passing.loc[passing["relative_change"].abs().sort_values(ascending=False).index].head(args.top)
    if len(top):
        print(top[["src", "dst", "a_mean_abs", "b_mean_abs", "relative_change", "p_value", "q_value"]]
              .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
