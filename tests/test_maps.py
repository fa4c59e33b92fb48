"""eapcore.views.maps (relative-change maps with tests) against loops over edges and scipy, and
eapcore.views.compare (two runs) with its `compare` command, on fake runs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_runs import make_run  # noqa: E402
from test_metrics import make_graph, make_mask, random_scores  # noqa: E402

from eapcore.stats import analysis  # noqa: E402
from eapcore.stats.metrics import real_edge_scores  # noqa: E402
from eapcore.views import compare, figures, maps, query  # noqa: E402


def _map(rng, graph, view, kind="", n=6):
    mask = make_mask(graph)
    base, tuned = random_scores(rng, n, graph), random_scores(rng, n, graph) * 1.4
    grids = maps.change_map(real_edge_scores(base, mask), real_edge_scores(tuned, mask), graph, mask, view, kind,
                            paired=True)
    edges = analysis.edge_nodes(graph, mask)
    mb, mt = (analysis.edge_mean_abs(x, mask)[mask] for x in (base, tuned))
    return grids, edges.assign(base=mb, tuned=mt), base, tuned, mask


def test_layer_views_aggregate_edges_by_layer_and_type():
    rng = np.random.default_rng(10)
    graph = make_graph(3)
    mask = make_mask(graph)
    assert len(analysis.edge_nodes(graph, mask)) == mask.sum() == 4 * 9 + 9 + 1
    grids, edges, base, tuned, _ = _map(rng, graph, "layers", "q")
    q = grids["relative_change"]
    assert list(q.index) == [-1, 0, 1, 2] and list(q.columns) == [0, 1, 2, 3]  # one grid for every type
    assert math.isnan(q.loc[2, 2]) and not math.isnan(q.loc[1, 2])  # nothing of layer 2 feeds a2.q
    cell = edges[(edges.dst_type == "q") & (edges.src_layer == 1) & (edges.dst_layer == 2)]
    assert list(cell.src) == ["a1", "m1"] and (cell.dst == "a2.q").all()
    assert q.loc[1, 2] == pytest.approx(100 * (cell.tuned.sum() - cell.base.sum()) / cell.base.sum())
    assert grids["a"].loc[1, 2] == pytest.approx(cell.base.mean()) and grids["n_edges"].loc[1, 2] == 2
    # its test: Wilcoxon signed-rank of the per-question cell sums (tuned - base)
    f = [graph["forward"].index(s) for s in ("a1", "m1")]
    b = graph["backward"].index("a2.q")
    d = np.abs(tuned[:, f, b]).astype(float).sum(1) - np.abs(base[:, f, b]).astype(float).sum(1)
    assert grids["p_value"].loc[1, 2] == pytest.approx(scipy.stats.wilcoxon(d, method="exact").pvalue)
    p = grids["p_value"].to_numpy().ravel()
    q_all = scipy.stats.false_discovery_control(p[np.isfinite(p)])
    np.testing.assert_allclose(np.sort(grids["q_value"].to_numpy().ravel()[np.isfinite(p)]), np.sort(q_all))
    logits = maps.change_map(real_edge_scores(base, mask), real_edge_scores(tuned, mask), graph, mask, "layers",
                             "logits", paired=True)["relative_change"]
    assert logits[[0, 1, 2]].isna().all().all() and logits[3].notna().all()
    with pytest.raises(ValueError, match="kind"):
        maps.change_map(real_edge_scores(base, mask), real_edge_scores(tuned, mask), graph, mask, "layers", "x",
                        paired=True)


def test_module_views_and_full_matrix():
    rng = np.random.default_rng(11)
    graph = make_graph(3)
    grids, edges, *_, mask = _map(rng, graph, "dst")
    assert list(grids["a"].columns) == ["q", "k", "v", "mlp", "logits"] and list(grids["a"].index) == [0, 1, 2, 3]
    m0 = edges[edges.dst == "m0"]  # layer-0 MLP input, fed by input and a0
    assert list(m0.src) == ["input", "a0"]
    assert grids["a"].loc[0, "mlp"] == pytest.approx(m0.base.mean())
    assert grids["relative_change"].loc[0, "mlp"] == pytest.approx(100 * (m0.tuned.sum() - m0.base.sum()) / m0.base.sum())
    assert grids["n_edges"].loc[3, "logits"] == mask[:, -1].sum()
    src, *_ = _map(rng, graph, "src")
    assert list(src["a"].index)[0] == -1 and list(src["a"].columns) == ["input", "attention", "mlp"]
    assert src["n_edges"].loc[-1, "input"] == mask[0].sum()  # every edge of the input node
    full, edges, *_ = _map(rng, graph, "full")
    assert full["a"].shape == mask.shape and list(full["a"].index) == graph["forward"]
    assert full["a"].notna().to_numpy().sum() == mask.sum() and np.isnan(full["a"].to_numpy()[~mask]).all()
    assert full["a"].loc["a1", "m1"] == pytest.approx(edges[(edges.src == "a1") & (edges.dst == "m1")].base.item())
    rows = maps.edge_rows(full, 0.05)
    assert len(rows) == mask.sum() and list(rows.columns)[:2] == ["src", "dst"]
    assert rows["passes"].tolist() == ((rows["q_value"] <= 0.05) & rows["relative_change"].notna()).tolist()
    assert full["meta"]["smallest_p"] == 2.0 ** -5 and full["meta"]["best_q"] == min(1, 2.0 ** -5 * mask.sum())
    many = maps.change_map(*(real_edge_scores(random_scores(rng, 60, graph), mask) for _ in range(2)), graph, mask,
                           "dst", paired=True)["meta"]
    assert np.isnan(many["smallest_p"]) and np.isnan(many["best_q"])  # normal approximation: no such bound


def test_head_views():
    rng = np.random.default_rng(12)
    graph = make_graph(2, "head", n_heads=4, n_kv_heads=2)
    src, edges, *_, mask = _map(rng, graph, "heads", "source")
    assert src["a"].shape == (2, 4)
    own = edges[edges.src == "a0.h2"]
    assert len(own) == mask[graph["forward"].index("a0.h2")].sum()
    assert src["a"].loc[0, 2] == pytest.approx(own.base.mean())
    k, edges, *_ = _map(rng, graph, "heads", "k")
    assert k["a"].shape == (2, 2)
    assert k["a"].loc[1, 1] == pytest.approx(edges[edges.dst == "a1.kv1.k"].base.mean())
    assert _map(rng, graph, "heads", "q")[0]["a"].shape == (2, 4)
    with pytest.raises(ValueError, match="head-granularity"):
        _map(rng, make_graph(2), "heads", "q")


# ---- on fake runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of one 4-layer graph: alpha 0.1 and 0.5 of one pair on the same questions (the
    selection does not depend on alpha), the same pair on another dataset; and a head run."""
    root = tmp_path_factory.mktemp("cache")
    common = dict(n_layers=4, n=16, n_questions=60, acc_base=0.7, acc_tuned=0.9, n_bootstrap=50, n_permutations=99)
    keys = {"a01": make_run(root, alpha=0.1, seed=3, **common),
            "a05": make_run(root, alpha=0.5, seed=3, effect=2.0, **common),
            "math": make_run(root, dataset="math500", alpha=0.5, seed=3, **common),
            "head": make_run(root, alpha=0.5, granularity="head", seed=3, **common)}
    return root, keys, {k: query.load_run(v, root) for k, v in keys.items()}


def test_run_map_is_the_paired_map_of_base_and_tuned(runs):
    _, _, data = runs
    d = data["a05"]
    grids = maps.run_map(d, "dst")
    direct = maps.change_map(d.real_edges["base"], d.real_edges["tuned"], d.base.graph, d.mask, "dst", paired=True)
    pd.testing.assert_frame_equal(grids["q_value"], direct["q_value"])
    one = maps.run_map(d, "dst", sample=2)  # one question: its own map
    m0 = d.base.graph["backward"].index("m0")
    b = np.abs(d.base.scores[2, :2, m0].astype(float)).sum()
    t = np.abs(d.tuned.scores[2, :2, m0].astype(float)).sum()
    assert one["relative_change"].loc[0, "mlp"] == pytest.approx(100 * (t - b) / b)
    assert one["meta"]["n_a"] == 1


def test_pairing_and_spec_differences(runs):
    _, keys, data = runs
    same = compare.pairing(data["a01"], data["a05"])
    assert same["paired"] and same["reason"].startswith("paired: both runs scored the same 16 questions")
    other = compare.pairing(data["a01"], data["math"])
    assert not other["paired"] and "different datasets" in other["reason"]
    assert compare.spec_differences(data["a01"].info, data["a05"].info) == ["selection.alpha: 0.1 → 0.5"]
    partners = compare.comparable(query.finished_runs(runs[0]))
    assert sorted(partners[keys["a01"]]) == sorted([keys["a05"], keys["math"]]) and keys["head"] not in partners
    with pytest.raises(ValueError, match="do not share a graph"):
        compare.compare_map(data["a01"], data["head"], "tuned", "dst")
    with pytest.raises(ValueError, match="side"):
        compare.compare_map(data["a01"], data["a05"], "sft", "dst")


def test_paired_comparison_aligns_questions_by_id(runs, tmp_path):
    """Run B stored with its questions in reverse order: the paired map is the same."""
    import shutil

    from safetensors.numpy import load_file, save_file

    root, keys, data = runs
    flipped_root = tmp_path / "flipped"
    shutil.copytree(root, flipped_root)
    run = flipped_root / "runs" / keys["a05"]
    for side in ("base", "tuned"):
        t = load_file(run / side / "scores.safetensors")
        save_file({k: (v[::-1].copy() if k in ("scores", "loss") else v) for k, v in t.items()},
                  run / side / "scores.safetensors")
        man = json.loads((run / side / "manifest.json").read_text())
        man["sample_ids"] = man["sample_ids"][::-1]
        (run / side / "manifest.json").write_text(json.dumps(man))
    from eapcore.runs.cache import Cache

    Cache(flipped_root).seal_run(keys["a05"], [], skip=("status.json",))  # its checksums, as the runner seals
    flipped = query.load_run(keys["a05"], flipped_root)
    assert flipped.sample_ids == data["a05"].sample_ids[::-1]
    want = compare.compare_map(data["a01"], data["a05"], "tuned", "full")
    got = compare.compare_map(data["a01"], flipped, "tuned", "full")
    assert got["meta"]["paired"]
    for g in ("relative_change", "p_value", "q_value"):
        pd.testing.assert_frame_equal(got[g], want[g])
    # and it is the paired test: per edge, Wilcoxon of |s_B| - |s_A| over the same questions
    a, b = data["a01"], data["a05"]
    f, k = a.base.graph["forward"].index("m2"), a.base.graph["backward"].index("logits")
    d = np.abs(b.tuned.scores[:, f, k].astype(float)) - np.abs(a.tuned.scores[:, f, k].astype(float))
    assert want["p_value"].loc["m2", "logits"] == pytest.approx(scipy.stats.wilcoxon(d, method="exact").pvalue)


def test_unpaired_comparison_is_mann_whitney(runs):
    _, _, data = runs
    a, b = data["a01"], data["math"]
    grids = compare.compare_map(a, b, "base", "src")
    assert not grids["meta"]["paired"] and grids["meta"]["side"] == "base" and np.isnan(grids["meta"]["best_q"])
    ca = np.abs(a.base.scores[:, 0].astype(float)).sum(1)  # the input node's outgoing edges, per question
    cb = np.abs(b.base.scores[:, 0].astype(float)).sum(1)
    assert grids["p_value"].loc[-1, "input"] == pytest.approx(
        scipy.stats.mannwhitneyu(ca, cb, method="asymptotic").pvalue)
    assert grids["relative_change"].loc[-1, "input"] == pytest.approx(100 * (cb.mean() - ca.mean()) / ca.mean())


def test_map_figure_marks_cells_that_do_not_pass(runs):
    _, _, data = runs
    grids = maps.run_map(data["a05"], "dst")
    passing = maps.passing(grids, 0.05).to_numpy()
    assert 0 < passing.sum() < grids["relative_change"].notna().to_numpy().sum()  # both kinds present
    fig = figures.map_view_figure(grids, 4, level=0.05)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:4] == ["Base model", "Tuned model", "Relative change (tuned vs base)",
                          "Noise floor (sides swapped)"]
    coloured = [t for t in fig.data if getattr(t, "coloraxis", None) == "coloraxis2"]
    grey = [t for t in fig.data if t.type == "heatmap" and t.name == "not significant"]
    change = np.asarray(coloured[0].z, dtype=float)
    np.testing.assert_array_equal(np.isfinite(change), passing)  # coloured exactly where q <= 0.05
    np.testing.assert_array_equal(np.isfinite(np.asarray(grey[0].z, dtype=float)),
                                  grids["relative_change"].notna().to_numpy() & ~passing)
    assert "(passes at FDR 0.05)" in coloured[0].hovertemplate and "relative change: %{z:+.2f} %" in grey[0].hovertemplate
    assert "(not significant at FDR 0.05)" in grey[0].hovertemplate
    np.testing.assert_array_equal(np.asarray(grey[0].customdata, dtype=float), grids["q_value"].to_numpy(float))
    legend = [t.name for t in fig.data if t.showlegend]
    assert legend and "not significant" in legend[0] and "q > 0.05" in legend[0]
    assert "coloured where q ≤ 0.05" in fig.layout.coloraxis2.colorbar.title.text
    assert fig.layout.coloraxis2.cmin == -fig.layout.coloraxis2.cmax
    off = figures.map_view_figure(grids, 4, level=None)  # FDR control off: every cell coloured
    assert not [t for t in off.data if t.name == "not significant"]
    one = figures.map_view_figure(maps.run_map(data["a05"], "dst", sample=0), 4, tested=False)
    assert len([t for t in one.data if t.type == "heatmap"]) == 3  # no tests, no noise floor


@pytest.mark.parametrize("n_layers", [30, 40])  # SmolLM2; OLMo 2 13B (161 destinations)
def test_full_matrix_labels_every_node(tmp_path, n_layers):
    key = make_run(tmp_path, n_layers=n_layers, n_heads=9, n_kv_heads=3, n=8, n_questions=40, n_bootstrap=20,
                   n_permutations=99)
    data = query.load_run(key, tmp_path)
    fig = figures.map_view_figure(maps.run_map(data, "full"), n_layers, level=0.05)
    L = n_layers
    assert len(fig.data[0].x) == 4 * L + 1 and len(fig.data[0].y) == 2 * L + 1  # destinations, sources
    for axis in ("xaxis", "xaxis4", "yaxis", "yaxis3"):
        assert fig.layout[axis].dtick == 1, axis  # every category labelled (Plotly skips some otherwise)
    assert {f"a{L - 1}", f"m{L - 1}"} <= set(fig.data[0].y) and {f"a{L - 1}.k", f"m{L - 1}", "logits"} <= set(fig.data[0].x)
    assert fig.layout.xaxis.tickangle == -90


# ---- the command line -----------------------------------------------------------------------------------

def test_compare_command_text_json_csv_and_errors(runs, monkeypatch, capsys):
    from eapcore import cli

    root, keys, data = runs
    monkeypatch.setenv("EAP_CACHE_DIR", str(root))
    assert cli.main(["compare", keys["a01"][:8], keys["a05"][:8]]) == 0
    out = capsys.readouterr().out
    assert "paired: both runs scored the same 16 questions" in out and "selection.alpha: 0.1 → 0.5" in out
    assert "(noise floor, sides swapped per question at random: " in out
    assert cli.main(["compare", keys["a01"], keys["a05"], "--json", "--side", "base"]) == 0
    doc = json.loads(capsys.readouterr().out)
    want = compare.compare_edges(data["a01"], data["a05"], "base", 0.05)
    assert doc["paired"] and doc["side"] == "base" and doc["test"] == "wilcoxon_signed_rank"
    assert doc["n_edges"] == len(want) == int(data["a01"].mask.sum()) and doc["n_pass"] == int(want["passes"].sum())
    first = doc["edges"][0]
    assert (first["src"], first["dst"]) == (want["src"][0], want["dst"][0])
    assert first["q_value"] == pytest.approx(want["q_value"][0]) and first["a_mean_abs"] == pytest.approx(want["a"][0])
    assert cli.main(["compare", keys["a01"], keys["math"], "--csv"]) == 0
    import io

    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table.columns) == ["src", "dst", "a_mean_abs", "b_mean_abs", "relative_change", "p_value", "q_value",
                                   "passes"]
    assert len(table) == int(data["a01"].mask.sum())
    assert cli.main(["compare", keys["a01"], keys["math"]]) == 0  # unpaired: the noise floor reshuffles questions
    assert "(noise floor, questions reshuffled between the runs at random: " in capsys.readouterr().out
    assert cli.main(["compare", "nonexistent", keys["a05"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eapcore compare: no finished run with key 'nonexistent'") and "\n" not in err
    assert cli.main(["compare", keys["a01"], keys["head"]]) == 2
    assert "do not share a graph" in capsys.readouterr().err
