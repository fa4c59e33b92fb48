"""eapcore.stats.metrics and eapcore.stats.report against slow, obviously-correct references written out here (loops + scipy)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from eapcore.stats import metrics as M
from eapcore.stats import report as R
from eapcore.specs import MetricSettings

OPTIONS = [
    MetricSettings(),
    MetricSettings(entropy="per_sample"),
    MetricSettings(entropy="histogram", histogram_bins=7),
    MetricSettings(kurtosis="pearson"),
    MetricSettings(kurtosis_of="absolute"),
    MetricSettings(entropy="histogram", kurtosis="pearson", kurtosis_of="absolute", histogram_bins=100),
]


# ---- fixtures: graphs, masks and score files built independently of eapcore.graph ----------------

def make_graph(n_layers: int, granularity: str = "layer", n_heads: int = 4, n_kv_heads: int = 2) -> dict:
    """graph.json content; node names as in DESIGN / the issue text."""
    fwd, bwd = ["input"], []
    for l in range(n_layers):
        if granularity == "layer":
            fwd.append(f"a{l}")
            bwd += [f"a{l}.q", f"a{l}.k", f"a{l}.v"]
        else:
            fwd += [f"a{l}.h{h}" for h in range(n_heads)]
            bwd += [f"a{l}.h{h}.q" for h in range(n_heads)]
            bwd += [f"a{l}.kv{g}.k" for g in range(n_kv_heads)] + [f"a{l}.kv{g}.v" for g in range(n_kv_heads)]
        fwd.append(f"m{l}")
        bwd.append(f"m{l}")
    bwd.append("logits")
    return {"granularity": granularity, "n_layers": n_layers, "n_heads": n_heads,
            "n_kv_heads": n_kv_heads, "forward": fwd, "backward": bwd}


def make_mask(graph: dict) -> np.ndarray:
    """Real edge <=> the source's residual position is strictly before the destination's read."""
    def src_pos(name):
        if name == "input":
            return 0
        layer = int(name.split(".")[0][1:])
        return 2 * layer + (1 if name[0] == "a" else 2)

    def dst_pos(name):
        if name == "logits":
            return 2 * graph["n_layers"] + 1
        layer = int(name.split(".")[0][1:])
        return 2 * layer + (1 if name[0] == "a" else 2)

    return np.array([[src_pos(f) < dst_pos(b) for b in graph["backward"]] for f in graph["forward"]])


def random_scores(rng, n: int, graph: dict, heavy: bool = False) -> np.ndarray:
    """float32 [N, F, B]; zeros outside the real-edge mask like the engine writes."""
    shape = (n, len(graph["forward"]), len(graph["backward"]))
    s = rng.standard_t(3, size=shape) if heavy else rng.normal(size=shape)
    s = (s * rng.uniform(0.5, 2.0, size=(n, 1, 1))).astype(np.float32)
    return s * make_mask(graph)[None]


def write_result(folder, scores, graph, sample_ids, model="m") -> None:
    """An `attribute` output directory written the way the engine does (safetensors.torch)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"scores": torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
               "real_edge_mask": torch.from_numpy(make_mask(graph)),
               "loss": torch.linspace(0.5, 1.5, len(scores))}, str(folder / "scores.safetensors"))
    (folder / "graph.json").write_text(json.dumps(graph))
    (folder / "manifest.json").write_text(json.dumps({"model": model, "sample_ids": list(sample_ids),
                                                      "cut_len": 8}))


# ---- slow references ----------------------------------------------------------------------------

def ref_real(scores, mask) -> list[list[float]]:
    return [[float(scores[n, f, b]) for f in range(mask.shape[0]) for b in range(mask.shape[1]) if mask[f, b]]
            for n in range(scores.shape[0])]


def ref_shannon(values) -> float:
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0)


def ref_metrics(rows: list[list[float]], settings: MetricSettings) -> dict[str, float]:
    flat = [abs(v) for row in rows for v in row]
    ai = sum(flat) / len(flat)
    if settings.entropy == "pooled":
        ic = ref_shannon(flat)
    elif settings.entropy == "per_sample":
        ic = sum(ref_shannon([abs(v) for v in row]) for row in rows) / len(rows)
    else:
        counts, _ = np.histogram(flat, bins=settings.histogram_bins, range=(0.0, max(flat)))
        ic = ref_shannon(list(counts))
    kurt = [scipy.stats.kurtosis([abs(v) for v in row] if settings.kurtosis_of == "absolute" else row,
                                 fisher=settings.kurtosis == "fisher", bias=True) for row in rows]
    return {"activation_intensity": ai, "information_complexity": ic, "kurtosis": sum(kurt) / len(kurt)}


# ---- the metrics --------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", OPTIONS, ids=lambda s: f"{s.entropy}-{s.kurtosis}-{s.kurtosis_of}")
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_metrics_match_reference(settings, granularity):
    rng = np.random.default_rng(1)
    graph = make_graph(3, granularity)
    scores = random_scores(rng, 6, graph, heavy=True)
    mask = make_mask(graph)
    s = M.real_edge_scores(scores, mask)
    assert s.dtype == np.float64 and s.shape == (6, int(mask.sum()))
    assert np.array_equal(s, np.array(ref_real(scores, mask)))
    got, want = M.compute_metrics(s, settings), ref_metrics(ref_real(scores, mask), settings)
    for name in M.METRICS:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def test_per_sample_metrics_match_reference():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(5, 40))
    for settings in OPTIONS:
        per = M.per_sample_metrics(s, settings)
        for n, row in enumerate(s.tolist()):
            ref = ref_metrics([row], settings)
            for name in M.METRICS:
                assert per[name][n] == pytest.approx(ref[name], rel=1e-9), (name, settings)


def test_uniform_magnitudes_have_maximal_entropy():
    n, e = 4, 30
    signs = np.where(np.arange(n * e).reshape(n, e) % 2 == 0, 1.0, -1.0)  # half +c, half -c per row
    s = 0.7 * signs
    assert M.compute_metrics(s)["information_complexity"] == pytest.approx(math.log(n * e))
    assert M.compute_metrics(s, MetricSettings(entropy="per_sample"))["information_complexity"] == \
        pytest.approx(math.log(e))
    # all |s| equal the range maximum: one (closed) last bin holds everything
    assert M.compute_metrics(s, MetricSettings(entropy="histogram"))["information_complexity"] == 0.0
    assert M.compute_metrics(s)["activation_intensity"] == pytest.approx(0.7)
    # symmetric two-point distribution: Pearson kurtosis 1, excess -2
    assert M.compute_metrics(s)["kurtosis"] == pytest.approx(-2.0)
    assert M.compute_metrics(s, MetricSettings(kurtosis="pearson"))["kurtosis"] == pytest.approx(1.0)


def test_single_spike_has_zero_entropy_and_high_kurtosis():
    e = 50
    s = np.zeros((1, e))
    s[0, 17] = -3.0
    got = M.compute_metrics(s)
    assert got["information_complexity"] == pytest.approx(0.0, abs=1e-12)
    # one spike among E values: Pearson kurtosis of a Bernoulli(1/E) = (E^2 - 3E + 3) / (E - 1)
    assert got["kurtosis"] == pytest.approx((e * e - 3 * e + 3) / (e - 1) - 3)
    assert got["activation_intensity"] == pytest.approx(3.0 / e)
    uniform = M.compute_metrics(np.ones((1, e)) * np.where(np.arange(e) % 2, 1, -1))
    assert got["kurtosis"] > 40 > uniform["kurtosis"]


def test_structural_zeros_are_excluded():
    rng = np.random.default_rng(3)
    graph = make_graph(3)
    mask = make_mask(graph)
    scores = random_scores(rng, 5, graph)
    polluted = scores.copy()
    polluted[:, ~mask] = 1e6 * rng.normal(size=(5, int((~mask).sum())))
    for settings in OPTIONS:
        assert M.compute_metrics(M.real_edge_scores(polluted, mask), settings) == \
            M.compute_metrics(M.real_edge_scores(scores, mask), settings)
    # the real-edge matrix never contains a masked cell: E real edges, not F x B
    assert M.real_edge_scores(polluted, mask).shape[1] == int(mask.sum()) < mask.size
    # and the dense tensor itself would have given other numbers
    dense = polluted.reshape(5, -1).astype(np.float64)
    assert M.compute_metrics(dense) != M.compute_metrics(M.real_edge_scores(polluted, mask))


def test_options_change_numbers_as_documented():
    rng = np.random.default_rng(4)
    s = rng.standard_t(4, size=(6, 80))
    base = M.compute_metrics(s)
    pearson = M.compute_metrics(s, MetricSettings(kurtosis="pearson"))
    assert pearson["kurtosis"] == pytest.approx(base["kurtosis"] + 3.0)
    assert pearson["activation_intensity"] == base["activation_intensity"]
    absolute = M.compute_metrics(s, MetricSettings(kurtosis_of="absolute"))
    assert absolute["kurtosis"] == pytest.approx(np.mean(scipy.stats.kurtosis(np.abs(s), axis=1)))
    assert absolute["kurtosis"] != pytest.approx(base["kurtosis"])
    # with equal per-sample totals, pooled entropy = log N + mean per-sample entropy
    equal = np.abs(s) / np.abs(s).sum(axis=1, keepdims=True)
    pooled = M.compute_metrics(equal)["information_complexity"]
    per = M.compute_metrics(equal, MetricSettings(entropy="per_sample"))["information_complexity"]
    assert pooled == pytest.approx(math.log(6) + per)
    # one histogram bin holds everything: zero entropy; more bins never lower it below 0, at most log bins
    assert M.compute_metrics(s, MetricSettings(entropy="histogram", histogram_bins=1))["information_complexity"] == 0
    h = M.compute_metrics(s, MetricSettings(entropy="histogram", histogram_bins=20))["information_complexity"]
    assert 0 < h <= math.log(20)


def test_relative_change_sign_and_scale():
    assert M.relative_change(2.0, 3.0) == pytest.approx(50.0)  # tuned larger -> positive
    assert M.relative_change(-2.0, -1.0) == pytest.approx(50.0)  # |base| in the denominator
    assert M.relative_change(2.0, 1.0) == pytest.approx(-50.0)
    assert math.isnan(M.relative_change(0.0, 1.0))
    assert np.allclose(M.relative_change(np.array([1.0, 4.0]), np.array([2.0, 2.0])), [100.0, -50.0])
    rng = np.random.default_rng(5)
    base = rng.normal(size=(5, 40))
    b, t = M.compute_metrics(base), M.compute_metrics(2.0 * base)  # twice the scores
    assert M.relative_change(b["activation_intensity"], t["activation_intensity"]) == pytest.approx(100.0)
    for name in ("information_complexity", "kurtosis"):  # scale-free metrics
        assert M.relative_change(b[name], t[name]) == pytest.approx(0.0, abs=1e-9)


def test_resampled_metrics_equal_metrics_of_the_resampled_data():
    rng = np.random.default_rng(6)
    s = rng.standard_t(3, size=(7, 25))
    idx = rng.integers(0, 7, size=(4, 7))
    counts = np.stack([np.bincount(row, minlength=7) for row in idx])
    for settings in OPTIONS:
        got = M.resampled_metrics(s, counts, settings)
        for r in range(4):
            want = ref_metrics(s[idx[r]].tolist(), settings)
            for name in M.METRICS:
                assert got[name][r] == pytest.approx(want[name], rel=1e-9), (name, settings)


def test_unknown_options_are_rejected():
    s = np.ones((2, 3))
    for bad in (MetricSettings(entropy="renyi"), MetricSettings(kurtosis="excess"),
                MetricSettings(kurtosis_of="squared"), MetricSettings(entropy="histogram", histogram_bins=0)):
        with pytest.raises(ValueError, match="entropy|kurtosis|histogram_bins"):
            M.compute_metrics(s, bad)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        M.compute_metrics(np.zeros((3,)))
    with pytest.raises(ValueError, match="mask"):
        M.real_edge_scores(np.zeros((2, 3, 4)), np.ones((3, 5), bool))


# ---- files, table, CLI ----------------------------------------------------------------------------

def test_load_scores_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    graph = make_graph(2)
    scores = random_scores(rng, 3, graph)
    write_result(tmp_path / "r", scores, graph, [10, 11, 12])
    loaded = R.load_scores(tmp_path / "r")
    scores_l, mask_l, graph_l, manifest_l, loss_l = loaded
    assert np.array_equal(scores_l, scores) and mask_l.dtype == bool
    assert loss_l.dtype == np.float32 and np.allclose(loss_l, [0.5, 1.0, 1.5])
    assert np.array_equal(mask_l, make_mask(graph)) and graph_l == graph
    assert manifest_l["sample_ids"] == [10, 11, 12]
    with pytest.raises(FileNotFoundError, match="graph.json"):
        (tmp_path / "r" / "graph.json").unlink()
        R.load_scores(tmp_path / "r")


def test_load_scores_rejects_mismatched_parts(tmp_path):
    graph = make_graph(2)
    write_result(tmp_path / "r", np.zeros((3, len(graph["forward"]), len(graph["backward"]))), graph, [1, 2])
    with pytest.raises(ValueError, match="sample_ids"):
        R.load_scores(tmp_path / "r")
    (tmp_path / "r" / "graph.json").write_text(json.dumps(make_graph(3)))
    with pytest.raises(ValueError, match="do not match"):
        R.load_scores(tmp_path / "r")


def test_summary_table_pivot():
    rows = []
    for pair in ("P1", "P2"):
        for dataset in ("math", "gsm8k"):
            for alpha in (0.1, 0.5):
                result = {m: {"base": 1.0, "tuned": 1.5, "relative_change": hash((pair, dataset, alpha, m)) % 97,
                              "p_value": 0.01, "n": 100} for m in M.METRICS}
                rows += M.long_rows(result, pair=pair, dataset=dataset, alpha=alpha)
    assert len(rows) == 2 * 2 * 2 * 3 and rows[0]["ci_low"] is None and rows[0]["n"] == 100
    table = M.summary_table(rows)
    assert table.shape == (2 * 3, 2 * 2)
    assert table.loc[("P2", "kurtosis"), ("math", 0.5)] == hash(("P2", "math", 0.5, "kurtosis")) % 97
    assert M.summary_table(rows, value="p_value").to_numpy().max() == 0.01
    with pytest.raises(ValueError, match="several rows"):
        M.summary_table(rows + rows[:1])
    with pytest.raises(ValueError, match="lack"):
        M.summary_table(rows, index=("model",))


def _cli_fixture(tmp_path, ids_tuned=None, graph_tuned=None):
    rng = np.random.default_rng(8)
    graph = make_graph(3)
    ids = list(range(100, 120))
    base = random_scores(rng, 20, graph)
    tuned = 1.3 * random_scores(rng, 20, graph, heavy=False)
    write_result(tmp_path / "base", base, graph, ids)
    gt = graph_tuned or graph
    write_result(tmp_path / "tuned", tuned if gt is graph else random_scores(rng, 20, gt), gt, ids_tuned or ids)
    return base, tuned, make_mask(graph)


def test_cli_writes_the_three_metrics(tmp_path, capsys):
    base, tuned, mask = _cli_fixture(tmp_path)
    out = tmp_path / "out" / "m.json"
    rc = R.command(["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--out", str(out),
                    "--kurtosis", "pearson", "--bootstrap", "200", "--seed", "3"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["kurtosis"] == "pearson" and result["bootstrap"] == 200
    settings = MetricSettings(kurtosis="pearson")
    want_b = ref_metrics(ref_real(base, mask), settings)
    want_t = ref_metrics(ref_real(tuned, mask), settings)
    for name in M.METRICS:
        r = result[name]
        assert r["base"] == pytest.approx(want_b[name]) and r["tuned"] == pytest.approx(want_t[name])
        assert r["relative_change"] == pytest.approx(100 * (want_t[name] - want_b[name]) / abs(want_b[name]))
        assert 0 <= r["p_value"] <= 1 and 0 <= r["p_value_permutation"] <= 1 and r["n"] == 20
        assert r["ci_low"] <= r["ci_high"]
        assert "effect_size_dz" in r and "rank_biserial" in r
    assert result["activation_intensity"]["relative_change"] > 0  # tuned scores are 1.3x larger
    assert "activation_intensity" in capsys.readouterr().out


def test_cli_refuses_unpaired_or_different_graphs(tmp_path, capsys):
    _cli_fixture(tmp_path / "a", ids_tuned=list(range(101, 121)))
    rc = R.command(["--base", str(tmp_path / "a" / "base"), "--tuned", str(tmp_path / "a" / "tuned"),
                    "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "sample_ids differ" in capsys.readouterr().out
    _cli_fixture(tmp_path / "b", ids_tuned=list(range(119, 99, -1)))
    rc = R.command(["--base", str(tmp_path / "b" / "base"), "--tuned", str(tmp_path / "b" / "tuned"),
                    "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "different order" in capsys.readouterr().out
    _cli_fixture(tmp_path / "c", graph_tuned=make_graph(4))
    rc = R.command(["--base", str(tmp_path / "c" / "base"), "--tuned", str(tmp_path / "c" / "tuned"),
                    "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "graphs differ" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


def test_paper_sized_metrics_are_defined_under_every_option():
    """N=100 samples of the 28-layer paper graph (57 x 113): all three metrics, every option, finite
    (their time is benchmarks/stats_speed.py's)."""
    rng = np.random.default_rng(9)
    graph = make_graph(28)
    mask = make_mask(graph)
    assert mask.shape == (57, 113) and mask.sum() == 4 * 28 ** 2 + 3 * 28 + 1
    s = M.real_edge_scores(random_scores(rng, 100, graph), mask)
    assert s.shape == (100, mask.sum())
    for settings in OPTIONS:
        values = M.compute_metrics(s, settings)
        assert len(values) == 3
        assert all(math.isfinite(v) for v in values.values()), settings


def test_undefined_values_are_null_in_strict_json(tmp_path, capsys):
    """Constant score rows have no kurtosis: the JSON says null (never NaN) and the CLI says n/a."""
    graph = make_graph(2)
    mask = make_mask(graph)
    const = np.ones((6, *mask.shape), np.float32) * mask
    write_result(tmp_path / "base", const, graph, range(6))
    write_result(tmp_path / "tuned", 2 * const, graph, range(6))
    out = tmp_path / "m.json"
    rc = R.command(["--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"), "--out", str(out),
                    "--bootstrap", "50"])
    assert rc == 0 and "n/a" in capsys.readouterr().out

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    result = json.loads(out.read_text(), parse_constant=no_constants)
    assert result["kurtosis"]["base"] is None and result["kurtosis"]["n"] == 0
    assert result["activation_intensity"]["relative_change"] == pytest.approx(100.0)
    assert result["information_complexity"]["relative_change"] == pytest.approx(0.0, abs=1e-9)
