"""The tables the dashboard pages draw, from a finished run (eapcore.runs.results) or the list of
runs (no Streamlit in here). Every number comes from the stored scores through
eapcore.stats.metrics / eapcore.stats.analysis; nothing here computes attributions or writes to
the cache.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from eapcore.answers.generation import format_duration, progress_text  # noqa: F401  (for the pages)
from eapcore.files import cache_root_problem
from eapcore.harness import first
from eapcore.runs import registry, results
from eapcore.runs.results import (RunData, RunInfo, RunNotReady, cache_root, finished_runs, get_run,  # noqa: F401
                                  is_run_key, list_runs, load_run, quick_summary)  # the pages read runs through this module
from eapcore.specs import GROUP_LABELS, GROUPS  # noqa: F401  (GROUP_LABELS: for the pages)
from eapcore.stats import analysis, metrics

METRICS = metrics.METRICS
METRIC_LABELS, METRIC_UNITS = metrics.METRIC_LABELS, metrics.METRIC_UNITS


def runs_frame(runs: Iterable[RunInfo]) -> pd.DataFrame:
    """One row per run for tables: pair, dataset, alpha, group, granularity, n (questions the run
    used; empty before its selection), N asked, answers (generated, a quick run's "quick: K of M
    questions", or the imported file), stage, updated, key."""
    def answers(r: RunInfo) -> str:
        if r.quick:
            return f"quick: {r.quick['questions']} of {r.quick['of']} questions"
        return r._get("answers", "joined") or ("quick" if r._get("quick") else "generated")

    rows = [{"pair": r.pair, "dataset": r.dataset, "alpha": r.alpha, "group": r.group,
             "granularity": r.granularity, "n": r.n_used, "N asked": r.n_requested,
             "answers": answers(r), "stage": r.stage,
             "updated": pd.Timestamp(r.updated, unit="s").floor("s") if r.updated else pd.NaT,
             "key": r.key} for r in runs]
    cols = ["pair", "dataset", "alpha", "group", "granularity", "n", "N asked", "answers", "stage", "updated", "key"]
    return pd.DataFrame(rows, columns=cols).astype({"n": "Int64"})


def clock_frame(info: RunInfo) -> pd.DataFrame:
    """The run's clock (RunInfo.clock): one row per stage with its wall time over all executions,
    the device and the number of executions; plus a total row."""
    rows = [{"stage": stage, "seconds": round(c["seconds"], 1), "wall time": format_duration(c["seconds"]),
             "device": c["device"], "executions": c["executions"]} for stage, c in info.clock.items()]
    if rows:
        total = sum(r["seconds"] for r in rows)
        rows.append({"stage": "total", "seconds": round(total, 1), "wall time": format_duration(total),
                     "device": "", "executions": max(r["executions"] for r in rows)})
    return pd.DataFrame(rows, columns=["stage", "seconds", "wall time", "device", "executions"])


def default_view(runs: Iterable[RunInfo]) -> dict[str, str] | None:
    """The URL parameters of the first screen: the heatmaps of the default pair (the first of
    registry.FEATURED_PAIRS that has a finished run, the SmolLM2 GRPO pair when its shipped runs are
    cached: its both-correct run at alpha 0.5 and layer granularity, else the closest), else the
    closest finished run of the registered pairs; None without finished runs."""
    from eapcore.runs.registry import FEATURED_PAIRS

    finished = [r for r in runs if r.finished]
    if not finished:
        return None
    order = {name: i for i, name in enumerate(p.name for p in registered("pairs"))}

    def rank(r: RunInfo) -> tuple:
        featured = FEATURED_PAIRS.index(r.pair) if r.pair in FEATURED_PAIRS else len(FEATURED_PAIRS)
        return (featured, r.group != "both_correct", r.granularity != "layer",
                abs(r.alpha - 0.5), order.get(r.pair, len(order)), r.pair, r.dataset)

    best = min(finished, key=rank)
    return {"pair": best.pair, "dataset": best.dataset, "alpha": str(best.alpha), "group": best.group,
            "gran": best.granularity, "run": best.key}


# ---- registry (pairs and datasets known to the tool) -------------------------------------------

def registered(kind: str) -> list[Any]:
    """Registered pairs (kind="pairs") or datasets ("datasets"): the built-in ones and those of
    registry.json that can be read (registry_problems says what could not)."""
    return list((registry.pairs() if kind == "pairs" else registry.datasets()).values())


def registry_problems() -> list[str]:
    """What is wrong with registry.json (not JSON, unreadable entries), one line each."""
    return registry.problems()


def cache_problem() -> str | None:
    """Why no run can be written to the cache root (read-only, not a folder), or None."""
    return cache_root_problem(cache_root())


# ---- where in the network (the relative-change maps: eapcore.views.maps) ----------------------------

def node_entropy(data: RunData) -> pd.DataFrame:
    """Entropy of each source node's outgoing edges (paper Fig. 3b), base and tuned side by side."""
    b = analysis.node_entropy(data.base.scores, data.mask, data.base.graph)
    t = analysis.node_entropy(data.tuned.scores, data.mask, data.base.graph)
    out = b[["node", "layer", "type", "head", "n_edges"]].copy()
    out["base"], out["tuned"] = b["entropy"].to_numpy(), t["entropy"].to_numpy()
    out["relative_change"] = metrics.relative_change(out["base"].to_numpy(), out["tuned"].to_numpy())
    return out


# ---- distributions ------------------------------------------------------------------------------------

def per_sample(data: RunData) -> pd.DataFrame:
    """Per-sample metric values (metrics.per_sample_metrics with the run's settings), long format:
    idx, model (base|tuned), metric, value; plus the clean loss as metric "loss"."""
    rows = []
    for model in ("base", "tuned"):
        values = metrics.per_sample_metrics(data.real_edges[model], data.metric_settings)
        for m in METRICS:
            rows.append(pd.DataFrame({"idx": data.sample_ids, "model": model, "metric": m, "value": values[m]}))
    return pd.concat(rows, ignore_index=True)


def paired_stats(data: RunData) -> pd.DataFrame:
    """The stored paired comparison (metrics.json) as one row per metric."""
    rows = []
    for m in METRICS:
        r = data.metrics.get(m) or {}
        rows.append({"metric": m, "base": r.get("base"), "tuned": r.get("tuned"),
                     "relative_change": r.get("relative_change"), "difference": r.get("difference"),
                     "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"),
                     "confidence": r.get("confidence", data.metrics.get("confidence")),
                     "p_value": r.get("p_value"), "p_value_permutation": r.get("p_value_permutation"),
                     "effect_size_dz": r.get("effect_size_dz"), "rank_biserial": r.get("rank_biserial"),
                     "n": r.get("n")})
    return pd.DataFrame(rows).astype({c: float for c in ("base", "tuned", "relative_change", "difference",
                                                          "ci_low", "ci_high", "p_value",
                                                          "p_value_permutation", "effect_size_dz",
                                                          "rank_biserial")})


def abs_score_histogram(data: RunData, bins: int = 80) -> pd.DataFrame:
    """Pooled distribution of |s| over all samples and real edges, on log-spaced bins shared by
    both models: left, right, centre (geometric), base, tuned (fraction of values per bin); zeros
    are counted in `zeros` of the returned frame's attrs."""
    x = {m: np.abs(data.real_edges[m].astype(np.float64)).ravel() for m in ("base", "tuned")}
    nonzero = np.concatenate([v[v > 0] for v in x.values()])
    if nonzero.size == 0:
        return pd.DataFrame(columns=["left", "right", "centre", "base", "tuned"])
    lo, hi = np.log10(nonzero.min()), np.log10(nonzero.max())
    lo = max(lo, hi - 8)  # at most 8 decades: tinier values fall in the first bin
    edges = np.logspace(lo, hi, bins + 1)
    out = {"left": edges[:-1], "right": edges[1:], "centre": np.sqrt(edges[:-1] * edges[1:])}
    for m, v in x.items():
        counts, _ = np.histogram(np.clip(v[v > 0], edges[0], edges[-1]), bins=edges)
        out[m] = counts / max(v.size, 1)
    frame = pd.DataFrame(out)
    frame.attrs["zeros"] = {m: int((v == 0).sum()) for m, v in x.items()}
    frame.attrs["n_values"] = {m: int(v.size) for m, v in x.items()}
    return frame



def pattern_view(data: RunData) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Paper Fig. 3a: diversity of activation patterns across questions.

    Each question's real-edge |s| vector, normalised to sum 1, of base and tuned, projected onto
    the first two principal components of all 2N patterns together (analysis.pca_2d).
    Returns (points, stats): points has one row per question and model (pc1, pc2, model, idx);
    stats = {"base", "tuned": analysis.pattern_diversity (mean pairwise cosine distance; NaN when
    undefined: fewer than 2 questions or a question with all-zero scores), "relative_change" (%),
    "n" questions, "n_edges" real edges, "explained" [PC1, PC2] variance ratios, "undefined":
    {model: reason} for NaN diversities}."""
    s = {m: data.real_edges[m] for m in ("base", "tuned")}
    (cb, ct), ratio = analysis.pca_2d(s["base"], s["tuned"])
    ids = data.sample_ids
    points = pd.concat([pd.DataFrame({"pc1": c[:, 0], "pc2": c[:, 1], "model": m, "idx": ids})
                        for m, c in (("base", cb), ("tuned", ct))], ignore_index=True)
    stats: dict[str, Any] = {"undefined": {}}
    for m in ("base", "tuned"):
        try:
            stats[m] = analysis.pattern_diversity(s[m])
        except ValueError as err:
            stats[m] = float("nan")
            stats["undefined"][m] = str(err)
    stats["relative_change"] = metrics.relative_change(stats["base"], stats["tuned"])
    stats.update(n=len(ids), n_edges=int(s["base"].shape[1]), explained=[float(r) for r in ratio])
    return points, stats

# ---- answer groups -------------------------------------------------------------------------------

def group_siblings(info: RunInfo, runs: Iterable[RunInfo]) -> dict[str, RunInfo]:
    """Finished runs that differ from `info` only in the answer group: {group: RunInfo} (the
    latest run per group)."""
    want = info.settings_without(("selection", "group"))
    out: dict[str, RunInfo] = {}
    for r in sorted(runs, key=lambda r: r.updated):
        if r.finished and r.settings_without(("selection", "group")) == want:
            out[r.group] = r
    return {g: out[g] for g in GROUPS if g in out}


# ---- families (registry.FAMILY_PAIRS: the SFT -> DPO -> RLVR stages of one base) ----------------

def kin(info: RunInfo) -> tuple[str, str]:
    """What makes pairs siblings: ("family", PairSpec.family), or for a pair with no family
    ("base model", its base model's path or id): GRPO and DPO tuned from one SFT model."""
    family = info._get("pair", "family", default="")
    return ("family", family) if family else ("base model", info._get("pair", "base", "name_or_path", default="?"))


def family_siblings(info: RunInfo, runs: Iterable[RunInfo]) -> list[RunInfo]:
    """Finished runs of the other pairs of `info`'s kin (`kin`: its family, or with no family the
    pairs without one that share its base model) that differ from it only in the pair (same
    dataset, alpha, group, granularity and every other setting): the latest run per pair, in the
    registry's order of the pairs."""
    mine = kin(info)
    want = info.settings_without(("pair", None))
    latest: dict[str, RunInfo] = {}
    for r in sorted(runs, key=lambda r: r.updated):
        if r.finished and r.pair != info.pair and kin(r) == mine and r.settings_without(("pair", None)) == want:
            latest[r.pair] = r
    order = {name: i for i, name in enumerate(p.name for p in registered("pairs"))}
    return sorted(latest.values(), key=lambda r: (order.get(r.pair, len(order)), r.pair))


def family_comparisons(info: RunInfo, runs: Iterable[RunInfo]) -> pd.DataFrame:
    """One row per sibling pair of `info` (family_siblings): pair, algorithm, base, tuned (its
    models), shared (which model of the sibling is also in `info`'s pair, e.g. "base: <SFT model>"),
    side (the model of each run worth comparing: "tuned", or "base" when the tuned models are the
    same one) and key. Run A = `info`, run B = the sibling, with `side`: the arguments of the
    run comparison (`eapcore compare A B --side SIDE`)."""
    def models(r: RunInfo) -> tuple[str, str]:
        return r._get("pair", "base", "name_or_path", default="?"), r._get("pair", "tuned", "name_or_path", default="?")

    mine = models(info)
    rows = []
    for r in family_siblings(info, runs):
        base, tuned = models(r)
        shared = [f"{which}: {m}" for which, m in (("base", base), ("tuned", tuned)) if m in mine]
        rows.append({"pair": r.pair, "algorithm": r._get("pair", "algorithm", default=""), "base": base,
                     "tuned": tuned, "shared": ", ".join(shared) or "none",
                     "side": "base" if tuned == mine[1] else "tuned", "key": r.key})
    return pd.DataFrame(rows, columns=["pair", "algorithm", "base", "tuned", "shared", "side", "key"])


def group_overview(datas: dict[str, RunData]) -> pd.DataFrame:
    """Per answer group and metric: n, T_cut, base, tuned, relative change, CI, p (metrics.json)."""
    rows = []
    for group, data in datas.items():
        stats = paired_stats(data)
        for _, r in stats.iterrows():
            rows.append({"group": group, "n": int(r["n"]) if pd.notna(r["n"]) else len(data.sample_ids),
                         "t_cut": data.t_cut, **{k: r[k] for k in ("metric", "base", "tuned", "relative_change",
                                                                     "ci_low", "ci_high", "p_value")}})
    return pd.DataFrame(rows)


def compare_groups(a: RunData, b: RunData, model: str = "tuned", n_bootstrap: int = 500,
                   n_permutations: int = 1999, seed: int = 0) -> pd.DataFrame:
    """One model's scores in two answer groups (independent samples): analysis.group_comparison of
    group b against group a, one row per metric; the resample counts in `attrs` (n_bootstrap,
    n_permutations)."""
    res = analysis.group_comparison(a.real_edges[model], b.real_edges[model], a.metric_settings,
                                    n_bootstrap=n_bootstrap, n_permutations=n_permutations, seed=seed)
    frame = pd.DataFrame([{"metric": m, **res[m]} for m in METRICS])
    frame.attrs.update(n_bootstrap=n_bootstrap, n_permutations=n_permutations)
    return frame


# ---- across runs: Table 1, accuracy, correlation ------------------------------------------------

def summary_rows(runs: Iterable[RunInfo]) -> pd.DataFrame:
    """Long rows (metrics.long_rows) of every finished run: pair, dataset, alpha, group,
    granularity, N, key, updated, metric, base, tuned, relative_change, difference, p_value,
    p_value_permutation, ci_low, ci_high, n."""
    rows = []
    for r in runs:
        if not r.finished:
            continue
        result = results.read_metrics(r)
        rows += metrics.long_rows(result, pair=r.pair, dataset=r.dataset, alpha=r.alpha, group=r.group,
                                  granularity=r.granularity, N=r.n_requested, key=r.key, updated=r.updated)
    cols = ["pair", "dataset", "alpha", "group", "granularity", "N", "key", "updated", "metric", "base", "tuned",
            "relative_change", "difference", "p_value", "p_value_permutation", "ci_low", "ci_high", "n"]
    df = pd.DataFrame(rows, columns=cols)
    for c in cols[9:-1]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def table1(rows: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """One metric's Table 1: rows pair, columns (dataset, alpha); cells relative change (%) and the
    matching p-values. Several runs for one cell: the latest is kept (count returned)."""
    sub = rows[rows["metric"] == metric].sort_values("updated")
    keys = ["pair", "dataset", "alpha"]
    dropped = int(sub.duplicated(keys, keep="last").sum())
    sub = sub.drop_duplicates(keys, keep="last")
    if sub.empty:
        return pd.DataFrame(), pd.DataFrame(), dropped
    change = metrics.summary_table(sub, "relative_change", index=("pair",), columns=("dataset", "alpha"))
    pvals = metrics.summary_table(sub, "p_value", index=("pair",), columns=("dataset", "alpha"))
    change, pvals = change.sort_index(axis=1), pvals.sort_index(axis=1)
    return change, pvals, dropped


def _scores_of(answers: dict) -> dict:
    from eapcore.answers.grading import score_fields

    out = {}
    for idx, row in answers.items():
        score, _ = score_fields(row)
        if score is not None:
            out[idx] = bool(score)
    return out


def pair_context(data: RunData) -> dict[str, Any]:
    """What the run's pair is, for the pages' run caption: base and tuned model references,
    algorithm, the pair's notes (as the run's spec stores them), and the accuracy (%) of each
    model's graded answers on the questions of the run's dataset graded for both (n_graded; 0.0
    when none is)."""
    from eapcore.answers.grading import accuracy

    scores = {m: _scores_of(data.answers[m]) for m in ("base", "tuned")}
    both = scores["base"].keys() & scores["tuned"].keys()
    return {"base": data.info._get("pair", "base", "name_or_path", default=""),
            "tuned": data.info._get("pair", "tuned", "name_or_path", default=""),
            "algorithm": data.info._get("pair", "algorithm", default=""),
            "notes": data.info._get("pair", "notes", default=""), "n_graded": len(both),
            **{f"{m}_accuracy": 100 * accuracy({i: scores[m][i] for i in both})["accuracy"] for m in scores}}


def accuracy_table(runs: Iterable[RunInfo]) -> pd.DataFrame:
    """Per pair and dataset (answers of its latest run): graded questions, base and tuned accuracy
    (%), gain (percentage points) and the size of each answer group."""
    from eapcore.answers.grading import accuracy, groups

    latest: dict[tuple[str, str], RunInfo] = {}
    for r in sorted(runs, key=lambda r: r.updated):
        if results.has_answers(r):
            latest[(r.pair, r.dataset)] = r
    rows = []
    for (pair, dataset), r in sorted(latest.items()):
        sb = _scores_of(results.read_answers(r, "base"))
        st = _scores_of(results.read_answers(r, "tuned"))
        ab, at = accuracy(sb), accuracy(st)
        g = groups(sb, st)
        rows.append({"pair": pair, "dataset": dataset, "n": min(ab["n"], at["n"]),
                     "base_accuracy": 100 * ab["accuracy"], "tuned_accuracy": 100 * at["accuracy"],
                     "accuracy_gain": 100 * (at["accuracy"] - ab["accuracy"]),
                     **{f"n_{k}": len(v) for k, v in g.items()}})
    cols = ["pair", "dataset", "n", "base_accuracy", "tuned_accuracy", "accuracy_gain",
            *(f"n_{g}" for g in GROUPS)]
    return pd.DataFrame(rows, columns=cols)


def change_vs_gain(rows: pd.DataFrame, acc: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join each metric's relative change with the pair's accuracy gain on that dataset and
    correlate across pairs (analysis.cross_pair_correlation, by dataset and alpha).
    Returns (points, correlation table)."""
    sub = rows.sort_values("updated").drop_duplicates(["pair", "dataset", "alpha", "metric"], keep="last")
    pts = sub.merge(acc[["pair", "dataset", "accuracy_gain"]], on=["pair", "dataset"], how="inner")
    if pts.empty:
        return pts, pd.DataFrame()
    corr = analysis.cross_pair_correlation(pts[["pair", "metric", "dataset", "alpha", "relative_change",
                                                "accuracy_gain"]], by=("dataset", "alpha"))
    return pts, corr


def pairs_caveat(points: pd.DataFrame) -> str:
    """The few-pairs warning for a change-vs-gain plot ("" with enough model pairs)."""
    return analysis.few_pairs_caveat(points["pair"].nunique())


# ---- one sample ----------------------------------------------------------------------------------

def _tokenizer_file(folder: Path) -> Path:
    """folder/tokenizer.json; for a LoRA adapter folder without one, its base's when
    adapter_config.json names the base by a relative path (the shipped "../sft"), followed a few
    levels. The path returned may not exist."""
    path = folder / "tokenizer.json"
    for _ in range(4):
        if path.is_file():
            break
        try:
            base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError):
            break
        if not (isinstance(base, str) and base.startswith(".")):
            break
        folder = (folder / base).resolve()
        path = folder / "tokenizer.json"
    return path


def load_tokenizer(name_or_path: str) -> Any | None:
    """A `tokenizers.Tokenizer` for a local model folder (a relative one as the registry resolves
    it; a LoRA adapter folder through its base, `_tokenizer_file`) or a hub id already in the local
    Hugging Face cache (never downloads); None if there is none. Not memoised here (the pages'
    cache keeps each sample view that uses it)."""
    tok = None
    try:
        from tokenizers import Tokenizer

        from eapcore.runs.registry import resolve_path

        folder = Path(resolve_path(name_or_path))
        path = _tokenizer_file(folder)
        if not path.is_file() and not folder.exists():
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name_or_path, "tokenizer.json")
            path = Path(found) if isinstance(found, str) else path
        if path.is_file():
            tok = Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001  (no tokenizer: the page shows token ids)
        tok = None
    return tok


def sample_view(data: RunData, idx: Any) -> dict[str, Any]:
    """Everything the Samples page shows for question `idx` of the run: question, gt, and per model
    (base, tuned): answer ids, the scored part (first T_cut tokens) and the rest (decoded text if
    a tokenizer is found, else None), pred, correct, per-sample metrics, clean loss."""
    pos = data.sample_ids.index(idx)
    out: dict[str, Any] = {"idx": idx, "position": pos, "t_cut": data.t_cut}
    models = {"base": data.info._get("pair", "base", "name_or_path", default=""),
              "tuned": data.info._get("pair", "tuned", "name_or_path", default="")}
    per = {m: metrics.per_sample_metrics(data.real_edges[m][pos:pos + 1], data.metric_settings) for m in models}
    for model, name in models.items():
        row = data.answers[model].get(idx, {})
        ids = row.get("generate_token_ids") or []
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        tok = load_tokenizer(name) if name else None
        cut = data.t_cut

        def decode(part: list[int]) -> str | None:
            return None if tok is None else tok.decode(part, skip_special_tokens=False)

        score = first(row.get("score"))
        manifest = data.base.manifest if model == "base" else data.tuned.manifest
        loss_pos = list(manifest["sample_ids"]).index(idx)
        out[model] = {"model": name, "answer_ids": ids, "scored_ids": ids[:cut], "rest_ids": ids[cut:],
                      "scored_text": decode(ids[:cut]), "rest_text": decode(ids[cut:]),
                      "n_tokens": len(ids), "n_prompt_tokens": len(row.get("prompt_token_ids") or []),
                      "pred": first(row.get("pred")), "correct": score if isinstance(score, bool) else None,
                      "code": first(row.get("code")), "tokenizer": tok is not None,
                      "metrics": {m: float(per[model][m][0]) for m in METRICS},
                      "loss": _loss(data, model, loss_pos)}
        out.setdefault("question", row.get("question"))
        out.setdefault("gt", row.get("gt"))
    return out


def sample_label(data: RunData, idx: Any) -> str:
    """The question picker's label: "question 7 · base ✓ tuned ✗" (? = not graded)."""
    mark = {True: "✓", False: "✗"}
    rb, rt = data.answers["base"].get(idx, {}), data.answers["tuned"].get(idx, {})
    return f"question {idx} · base {mark.get(first(rb.get('score')), '?')} tuned {mark.get(first(rt.get('score')), '?')}"


def sample_metrics(view: dict[str, Any]) -> pd.DataFrame:
    """One question's metrics (a `sample_view`): rows metric (labelled), columns base, tuned and
    relative_change (metrics.relative_change: NaN where base is 0)."""
    tab = pd.DataFrame({"base": view["base"]["metrics"], "tuned": view["tuned"]["metrics"]})
    tab["relative_change"] = metrics.relative_change(tab["base"].to_numpy(), tab["tuned"].to_numpy())
    tab.index = pd.Index([METRIC_LABELS[m] for m in tab.index], name="metric")
    return tab


def _loss(data: RunData, model: str, pos: int) -> float | None:
    loss = data.loss.get(model)
    return None if loss is None or pos >= len(loss) else float(loss[pos])


def fmt_p(p: Any) -> str:
    """p-value for tables: '<1e-4' style below 1e-4, else 3 significant digits; '' when missing."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(p):
        return ""
    return "< 1e-4" if p < 1e-4 else f"{p:.3g}"
