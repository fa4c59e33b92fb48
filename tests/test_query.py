"""eapcore.views.query (the tables the pages draw) over eapcore.runs.results, and eapcore.views.figures
helpers, on a fake cache."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_runs import make_small_cache  # noqa: E402

from eapcore.stats import analysis, metrics  # noqa: E402
from eapcore.views import figures, query


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, make_small_cache(root)


def test_listing_and_missing_cache(cache, tmp_path):
    root, keys = cache
    runs = query.finished_runs(root)
    assert {r.key for r in runs} == set(keys.values())
    assert query.list_runs(tmp_path / "nothing") == []
    r = query.get_run(keys["Demo-Tiny/gsm8k/0.5"], root)
    assert (r.pair, r.dataset, r.alpha, r.group, r.granularity) == ("Demo-Tiny", "gsm8k", 0.5, "both_correct", "layer")
    assert r.spec is not None and r.spec.selection.alpha == 0.5


def test_unfinished_run_is_not_loaded(cache, tmp_path):
    root, keys = cache
    import shutil

    src = query.get_run(keys["Toy-DPO/gsm8k/0.1"], root).path
    dst = tmp_path / "runs" / src.name
    shutil.copytree(src, dst)
    (dst / "status.json").write_text(json.dumps({"stage": "attribute", "done": 3, "total": 12}))
    info = query.get_run(src.name, tmp_path)
    assert not info.finished and query.finished_runs(tmp_path) == []
    with pytest.raises(query.RunNotReady):
        query.load_run(info)


def test_loaded_run_keeps_float32_and_computes_as_float64(cache):
    """The views keep no memo of their own (the pages' cache layer does), hold the run's scores
    once in float32 (read-only), and their statistics equal the float64 computation exactly."""
    from safetensors.numpy import load_file

    root, keys = cache
    info = query.get_run(keys["Demo-Tiny/gsm8k/0.1"], root)
    data = query.load_run(info)
    assert query.load_run(info) is not data
    for model in ("base", "tuned"):
        cells = data.real_edges[model]
        assert cells.dtype == np.float32 and not cells.flags.writeable
        sf = getattr(data, model)
        assert not sf.scores.flags.writeable
        np.testing.assert_array_equal(cells.astype(np.float64), metrics.real_edge_scores(sf.scores, data.mask))
        stored = load_file(info.path / model / "scores.safetensors")
        np.testing.assert_array_equal(data.loss[model], stored["loss"])
    per = query.per_sample(data)
    want = metrics.per_sample_metrics(metrics.real_edge_scores(data.tuned.scores, data.mask), data.metric_settings)
    for m in metrics.METRICS:
        got = per[(per.model == "tuned") & (per.metric == m)]["value"].to_numpy()
        np.testing.assert_array_equal(got, want[m])


def test_per_sample_and_stats(cache):
    root, keys = cache
    data = query.load_run(keys["Demo-Tiny/gsm8k/0.5"], root)
    per = query.per_sample(data)
    assert len(per) == 2 * 3 * len(data.sample_ids)
    s = metrics.real_edge_scores(data.base.scores, data.mask)
    want = metrics.per_sample_metrics(s)["kurtosis"]
    got = per[(per.model == "base") & (per.metric == "kurtosis")]["value"].to_numpy()
    np.testing.assert_allclose(got, want)
    stats = query.paired_stats(data)
    assert list(stats["metric"]) == list(metrics.METRICS)
    assert stats.set_index("metric").loc["kurtosis", "relative_change"] == pytest.approx(data.metrics["kurtosis"]["relative_change"])
    hist = query.abs_score_histogram(data, 40)
    assert len(hist) == 40 and hist["base"].sum() == pytest.approx(1.0)



def test_pattern_view_matches_analysis(cache):
    root, keys = cache
    data = query.load_run(keys["Demo-Tiny/gsm8k/0.5"], root)
    points, stats = query.pattern_view(data)
    b = metrics.real_edge_scores(data.base.scores, data.mask)
    t = metrics.real_edge_scores(data.tuned.scores, data.mask)
    n = len(data.sample_ids)
    assert stats["base"] == pytest.approx(analysis.pattern_diversity(b))
    assert stats["tuned"] == pytest.approx(analysis.pattern_diversity(t))
    assert stats["relative_change"] == pytest.approx(100 * (stats["tuned"] - stats["base"]) / stats["base"])
    assert stats["n"] == n and stats["n_edges"] == int(data.mask.sum()) and stats["undefined"] == {}
    (cb, ct), ratio = analysis.pca_2d(b, t)
    np.testing.assert_allclose(stats["explained"], ratio)
    assert list(points.columns) == ["pc1", "pc2", "model", "idx"] and len(points) == 2 * n
    for model, c in (("base", cb), ("tuned", ct)):
        sub = points[points.model == model]
        np.testing.assert_allclose(sub[["pc1", "pc2"]].to_numpy(), c)
        assert list(sub["idx"]) == data.sample_ids
    fig = figures.pattern_scatter_figure(points, stats)
    assert "paper Fig. 3a" in fig.layout.title.text and f"n = {n}" in fig.layout.title.text
    assert [tr.marker.color for tr in fig.data] == [figures.MODEL_COLORS["base"], figures.MODEL_COLORS["tuned"]]
    assert "% of variance" in fig.layout.xaxis.title.text

def test_groups_summary_accuracy(cache):
    root, keys = cache
    runs = query.finished_runs(root)
    info = query.get_run(keys["Demo-Tiny/gsm8k/0.5"], root)
    sib = query.group_siblings(info, runs)
    assert list(sib) == ["both_correct", "both_wrong", "base_only", "tuned_only"]
    datas = {g: query.load_run(r) for g, r in sib.items()}
    ov = query.group_overview(datas)
    assert len(ov) == 12 and (ov["n"] > 0).all()
    cmp = query.compare_groups(datas["both_wrong"], datas["both_correct"], "tuned", n_bootstrap=50, n_permutations=99)
    assert set(cmp["metric"]) == set(metrics.METRICS) and "cohen_d" in cmp
    assert cmp.attrs == {"n_bootstrap": 50, "n_permutations": 99}  # what the page's caption states

    rows = query.summary_rows(runs)
    change, pvals, dropped = query.table1(rows[(rows.group == "both_correct") & (rows.granularity == "layer")], "kurtosis")
    assert change.shape == (2, 4) and pvals.shape == change.shape and dropped == 0
    acc = query.accuracy_table(runs)
    assert set(acc["pair"]) == {"Demo-Tiny", "Toy-DPO"}
    row = acc[(acc.pair == "Demo-Tiny") & (acc.dataset == "gsm8k")].iloc[0]
    assert row["accuracy_gain"] == pytest.approx(row["tuned_accuracy"] - row["base_accuracy"])
    assert sum(row[f"n_{g}"] for g in query.GROUPS) == row["n"]
    pts, corr = query.change_vs_gain(rows[rows.group == "both_correct"], acc)
    assert not pts.empty and "caveat" in corr and corr["caveat"].str.contains("only 2 pairs").all()
    assert query.pairs_caveat(pts) == analysis.few_pairs_caveat(2) and "only 2 pairs" in query.pairs_caveat(pts)
    assert analysis.few_pairs_caveat(analysis.SMALL_N_PAIRS) == ""

    # the run caption's pair context: its accuracies are the answer files' own scores
    data = query.load_run(keys["Demo-Tiny/gsm8k/0.5"], root)
    ctx = query.pair_context(data)
    files = {m: {json.loads(line)["idx"]: json.loads(line)["score"] for line in
                 (data.info.path / f"answers_{m}.jsonl").read_text().splitlines()} for m in ("base", "tuned")}
    both = files["base"].keys() & files["tuned"].keys()
    assert ctx["n_graded"] == len(both) == row["n"] > 0
    for m in ("base", "tuned"):
        right = sum(bool(v[0] if isinstance(v, list) else v) for i, v in files[m].items() if i in both)
        assert ctx[f"{m}_accuracy"] == pytest.approx(100 * right / len(both)) == row[f"{m}_accuracy"]
    assert (ctx["base"], ctx["tuned"], ctx["algorithm"]) == (data.info._get("pair", "base", "name_or_path"),
                                                             data.info._get("pair", "tuned", "name_or_path"), "GRPO")


def test_sample_view(cache):
    root, keys = cache
    data = query.load_run(keys["Demo-Tiny/gsm8k/0.5"], root)
    idx = data.sample_ids[0]
    v = query.sample_view(data, idx)
    assert v["t_cut"] == data.t_cut and v["question"].startswith("Tom has")
    for m in ("base", "tuned"):
        part = v[m]
        assert part["tokenizer"] and part["correct"] is True
        assert (part["scored_text"] + part["rest_text"]).startswith(part["code"][:20])
        assert len(part["scored_ids"]) == min(data.t_cut, part["n_tokens"])
    table = query.sample_metrics(v)
    assert list(table.index) == [query.METRIC_LABELS[m] for m in metrics.METRICS] and table.index.name == "metric"
    np.testing.assert_array_equal(table["relative_change"].to_numpy(),
                                  metrics.relative_change(table["base"].to_numpy(), table["tuned"].to_numpy()))
    marks = {True: "✓", False: "✗"}
    assert query.sample_label(data, idx) == (f"question {idx} · base {marks[v['base']['correct']]} "
                                             f"tuned {marks[v['tuned']['correct']]}")


def test_sample_metrics_relative_change_is_nan_where_base_is_zero():
    view = {"base": {"metrics": {"activation_intensity": 0.0, "information_complexity": 2.0, "kurtosis": -1.0}},
            "tuned": {"metrics": {"activation_intensity": 0.5, "information_complexity": 3.0, "kurtosis": 1.0}}}
    change = query.sample_metrics(view)["relative_change"].to_numpy()
    assert np.isnan(change[0]) and change[1] == pytest.approx(50.0) and change[2] == pytest.approx(200.0)


def test_an_exact_zero_change_is_neutral_in_table1():
    import pandas as pd

    change = pd.DataFrame({"x": [0.0, 0.04, -3.0, np.nan]})
    pvals = pd.DataFrame({"x": [0.001, 0.5, 0.001, np.nan]})
    css = figures.change_cell_colors(change, pvals)["x"].tolist()
    assert "background" not in css[0] and "#F8DCD8" in css[1] and "#6E9FD0" in css[2]  # none, pale red, blue
    assert figures.change_table_text(change, pvals)["x"].tolist() == ["0.0%", "+0.0%", "-3.0% **", "–"]


def test_figures_and_exports(cache):
    root, keys = cache
    rows = query.summary_rows(query.finished_runs(root))
    change, pvals, _ = query.table1(rows[(rows.group == "both_correct") & (rows.granularity == "layer")],
                                    "activation_intensity")
    tex = figures.to_latex(figures.styled_change_table(change, pvals), caption="AI")
    assert "\\begin{tabular}" in tex and "\\%" in tex and "cellcolor" in tex
    csv = figures.to_csv_bytes(figures.flatten_columns(change)).decode()
    assert "gsm8k α=0.1" in csv.splitlines()[0]


@pytest.mark.skipif(figures._chrome_path() is None, reason="no Chromium for kaleido")
def test_image_export():
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    assert figures.figure_image(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in figures.figure_image(fig, "svg")[:500]


def test_runs_table_shows_the_n_a_run_used_and_the_default_view(cache, tmp_path):
    """A run that asked for N = 100 but selected 12 questions shows n = 12 (N asked beside it); a
    run not selected yet has no n; the first screen is the first registered demo pair's run."""
    import shutil

    root, keys = cache
    src = query.get_run(keys["Demo-Tiny/gsm8k/0.5"], root).path
    dst = tmp_path / "runs" / src.name
    shutil.copytree(src, dst)
    stored = json.loads((dst / "spec.json").read_text())
    stored["spec"]["selection"]["n"] = 100
    (dst / "spec.json").write_text(json.dumps(stored))
    fresh = tmp_path / "runs" / "0123456789abcdef"
    fresh.mkdir()
    (fresh / "spec.json").write_text(json.dumps(stored | {"key": fresh.name}))
    frame = query.runs_frame(query.list_runs(tmp_path)).set_index("key")
    n_selected = len(json.loads((src / "selection.json").read_text())["idx"])
    assert frame.loc[src.name, "n"] == n_selected == 12 and frame.loc[src.name, "N asked"] == 100
    assert frame.loc[fresh.name, "N asked"] == 100 and frame["n"].isna()[fresh.name]
    assert frame.loc[src.name, "answers"] == "generated"
    (fresh / "spec.json").write_text(json.dumps(stored | {"key": fresh.name, "spec": stored["spec"] | {
        "quick": {"seed": 0, "chunk": 0}}}))
    assert query.runs_frame(query.list_runs(tmp_path)).set_index("key").loc[fresh.name, "answers"] == "quick"
    (fresh / "quick.json").write_text(json.dumps({"questions": 240, "of": 1319}))  # once it has answered
    assert query.runs_frame(query.list_runs(tmp_path)).set_index("key").loc[fresh.name, "answers"] == \
        "quick: 240 of 1319 questions"
    assert "n=12" in query.get_run(src.name, tmp_path).label

    view = query.default_view(query.list_runs(root))  # no demo pair in the fake cache: the closest run
    assert view == {"pair": "Demo-Tiny", "dataset": "gsm8k", "alpha": "0.5", "group": "both_correct",
                    "gran": "layer", "run": keys["Demo-Tiny/gsm8k/0.5"]}
    assert query.default_view([]) is None
