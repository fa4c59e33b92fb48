"""Every dashboard page under streamlit.testing AppTest on a small fake cache: it renders without
exceptions, widgets change what is drawn, and "no runs yet" is handled."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_runs import make_run, make_small_cache  # noqa: E402

APP = str(ROOT / "app.py")
sys.path.insert(0, str(ROOT))
from pages.common import PAGES as NAVIGATED  # noqa: E402  (the app's page list: a new page is tested too)

PAGES = list(NAVIGATED.values())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The small fake cache plus a 6-layer run of 40 questions with a strong change (keys in keys.json)."""
    root = tmp_path_factory.mktemp("cache")
    keys = make_small_cache(root)
    keys["Strong-40"] = make_run(root, pair="Strong-40", n_layers=6, n=40, n_questions=100, acc_base=0.8,
                                 acc_tuned=0.9, effect=1.5, n_bootstrap=50, n_permutations=99)
    (root / "keys.json").write_text(json.dumps(keys))
    return root


def _app(monkeypatch, root, page, params=None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("EAP_CACHE_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in (params or {}).items():
        at.query_params[k] = v
    at.switch_page(page).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def cache_dir(at):
    import os

    return os.environ["EAP_CACHE_DIR"]


def _figures(at) -> list[dict]:
    """Plotly figure JSON of every chart on the page (AppTest gives them as unknown elements)."""
    out = []
    for el in at.get("plotly_chart"):
        out.append(json.loads(el.proto.spec))
    return out


def _titles(at) -> list[str]:
    return [f.get("layout", {}).get("title", {}).get("text", "") for f in _figures(at)]


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(monkeypatch, cache, page):
    at = _app(monkeypatch, cache, page)
    assert at.title, f"{page}: no title"
    assert not at.error, [e.value for e in at.error]


def _change_traces(fig: dict) -> tuple[list, list]:
    """(coloured, grey) heatmap traces of the change panels (colour axis 2 / the 'not significant' ones)."""
    heat = [t for t in fig["data"] if t["type"] == "heatmap"]
    return [t for t in heat if t.get("coloraxis") == "coloraxis2"], [t for t in heat if t.get("name") == "not significant"]


def test_heatmap_aggregation_changes_the_figure(monkeypatch, cache):
    at = _app(monkeypatch, cache, "pages/heatmaps.py", {"pair": "Demo-Tiny", "dataset": "gsm8k", "alpha": "0.5"})
    first = _titles(at)
    assert any("destination layer and module" in t for t in first), first
    fig = _figures(at)[0]
    panels = [a["text"] for a in fig["layout"]["annotations"][:4]]
    assert panels == ["Base model", "Tuned model", "Relative change (tuned vs base)",
                      "Noise floor (sides swapped)"]
    coloured, grey = _change_traces(fig)
    assert len(coloured) == 2  # the change and its noise floor, on one symmetric diverging axis
    assert fig["layout"]["coloraxis2"]["cmin"] == -fig["layout"]["coloraxis2"]["cmax"]
    assert any("cells pass at FDR 0.05" in m.value for m in at.markdown)
    at.selectbox(key="w_view").select("layers").run()
    assert not at.exception
    assert any("source layer × destination layer" in t for t in _titles(at)), _titles(at)
    assert at.query_params["view"] == ["layers"] or at.query_params["view"] == "layers"
    at.selectbox(key="w_kind").select("q").run()
    assert any("attn q" in t for t in _titles(at))
    at.selectbox(key="w_view").select("full").run()
    full = _figures(at)[0]
    assert len(full["data"][0]["y"]) == 9 and len(full["data"][0]["x"]) == 17  # 4-layer graph
    assert full["data"][0]["hovertemplate"].startswith("%{y} → %{x}")  # hover names the edge
    assert any(len(d.value) == 77 for d in at.dataframe)  # the edge table: one row per real edge


def test_heatmap_fdr_level_greys_what_does_not_pass(monkeypatch, cache):
    """The strong-effect 6-layer run: some cells pass, some not; the level is in the URL, a higher
    level colours at least as many cells, and "off" colours every cell."""
    params = {"pair": "Strong-40", "dataset": "gsm8k", "alpha": "0.5"}
    at = _app(monkeypatch, cache, "pages/heatmaps.py", {**params, "fdr": "0.01"})
    coloured, grey = _change_traces(_figures(at)[0])
    strict = sum(v is not None for row in coloured[0]["z"] for v in row)
    assert grey and strict > 0
    at.radio(key="w_fdr").set_value("0.2").run()
    assert at.query_params["fdr"] in ("0.2", ["0.2"])
    coloured, _ = _change_traces(_figures(at)[0])
    assert sum(v is not None for row in coloured[0]["z"] for v in row) >= strict
    at.radio(key="w_fdr").set_value("off").run()
    coloured, grey = _change_traces(_figures(at)[0])
    assert not grey and any("FDR control off" in m.value for m in at.markdown)


def test_heatmap_says_when_no_cell_can_pass(monkeypatch, cache):
    """12 questions: the smallest possible p is 2^-11, so among the full matrix's 77 edges BH can
    reach q = 0.038 at best: passing at 0.05 is possible, at 0.01 it is not, and the page says so."""
    params = {"pair": "Demo-Tiny", "dataset": "gsm8k", "alpha": "0.5", "view": "full"}
    at = _app(monkeypatch, cache, "pages/heatmaps.py", {**params, "fdr": "0.05"})
    assert not any("no q-value can reach" in m.value for m in at.markdown)
    at = _app(monkeypatch, cache, "pages/heatmaps.py", {**params, "fdr": "0.01"})
    assert any("smallest possible p is 0.00049" in m.value and "among 77 cells no q-value can reach 0.01" in m.value
               for m in at.markdown), [m.value for m in at.markdown]


def test_compare_page(monkeypatch, cache):
    keys = json.loads((Path(cache) / "keys.json").read_text())
    at = _app(monkeypatch, cache, "pages/compare.py",
              {"a": keys["Demo-Tiny/gsm8k/0.1"], "b": keys["Demo-Tiny/gsm8k/0.5"]})
    assert any("selection.alpha: 0.1 → 0.5" in m.value for m in at.markdown)
    fig = _figures(at)[0]
    assert [a["text"] for a in fig["layout"]["annotations"][:3]] == [
        "Run A: tuned model", "Run B: tuned model", "Relative change (B vs A)"]
    at.radio(key="w_side").set_value("base").run()
    assert not at.exception
    assert _figures(at)[0]["layout"]["annotations"][0]["text"] == "Run A: base model"
    at.selectbox(key="w_b").select(keys["Demo-Tiny/math500/0.5"]).run()
    assert any("different datasets" in w.value for w in at.warning)
    assert "Mann-Whitney" in _figures(at)[0]["data"][-1]["name"]  # the legend names the unpaired test


def test_distributions_plot_kind(monkeypatch, cache):
    at = _app(monkeypatch, cache, "pages/distributions.py")
    assert sum("histogram" in t for t in _titles(at)) == 3
    at.radio(key="w_plot").set_value("ecdf").run()
    assert sum("empirical CDF" in t for t in _titles(at)) == 3
    assert any("Pooled distribution of |edge score|" in t for t in _titles(at))
    text = " ".join(m.value for m in at.markdown)
    assert "Wilcoxon" in text and "bootstrap CI" in text
    assert any("Diversity of activation patterns" in t and "Fig. 3a" in t for t in _titles(at)), _titles(at)
    assert any("Diversity of activation patterns (paper Fig. 3a)" in h.value for h in at.subheader)
    assert "mean pairwise cosine distance" in text


def test_groups_page_compares_four_groups(monkeypatch, cache):
    at = _app(monkeypatch, cache, "pages/groups.py", {"pair": "Demo-Tiny", "dataset": "gsm8k", "alpha": "0.5"})
    assert "4 of 4" in " ".join(m.value for m in at.markdown)
    bars = _figures(at)[0]
    assert len(bars["data"]) == 2 and len(bars["data"][0]["x"]) == 4
    at.radio(key="w_metric").set_value("kurtosis").run()
    assert any("Distribution kurtosis by answer group" in t for t in _titles(at))
    assert len(at.dataframe) >= 2


def test_summary_tables(monkeypatch, cache):
    at = _app(monkeypatch, cache, "pages/summary.py")
    assert len(at.dataframe) >= 5  # three metric tables, accuracy, correlation
    at.radio(key="w_metric").set_value("information_complexity").run()
    assert any("Information complexity: change vs accuracy gain" in t for t in _titles(at))


def test_samples_page(monkeypatch, cache):
    at = _app(monkeypatch, cache, "pages/samples.py")
    html = " ".join(m.value for m in at.markdown)
    assert "T_cut=" in html and "Tom starts with" in html  # decoded with the local tokenizer
    first = _titles(at)
    from eapcore.views import query

    run = query.get_run(at.query_params["run"][0] if isinstance(at.query_params["run"], list)
                        else at.query_params["run"], cache_dir(at))
    last = query.load_run(run).sample_ids[-1]
    at.selectbox(key="w_sample").set_value(last).run()
    assert not at.exception
    assert _titles(at) != first and f"Question {last}" in _titles(at)[0]


def test_samples_highlight_survives_blank_lines_and_a_missing_boxed_answer(monkeypatch, cache):
    """The fake answers separate their steps by blank lines (a blank line would end markdown's HTML
    block: the highlight would stop there); a wrong answer without a boxed value says so."""
    from eapcore.views import query

    keys = json.loads((Path(cache) / "keys.json").read_text())
    data = query.load_run(keys["Demo-Tiny/gsm8k/0.5/both_wrong"], cache)
    unboxed = next(i for i in data.sample_ids if data.answers["base"][i]["pred"] == [""])
    at = _app(monkeypatch, cache, "pages/samples.py", {"pair": "Demo-Tiny", "dataset": "gsm8k", "alpha": "0.5",
                                                       "group": "both_wrong", "sample": str(unboxed)})
    answers = [m.value for m in at.markdown if "T_cut=" in m.value]
    assert len(answers) == 2
    for block in answers:
        assert "\n" not in block  # one HTML block: no blank line can end it
        scored = block.split("<span style='background:#FDEBD0'>")[1].split("</span>")[0]
        assert "Tom starts with" in scored and "<br><br>After buying" in scored  # past the blank line
    captions = [c.value for c in at.caption]
    assert any("· no boxed answer ·" in c for c in captions) and not any("prediction ``" in c for c in captions)


def test_no_runs_yet(monkeypatch, tmp_path):
    monkeypatch.setenv("EAP_SHIPPED_RUNS", "off")  # a cache that stays empty
    for page in PAGES:
        at = _app(monkeypatch, tmp_path, page)
        text = " ".join(i.value for i in at.info)
        if page not in ("pages/run.py",):
            assert "No finished runs" in text, page
            # guidance names only steps that work offline: import the shipped runs, or run the demo pair
            assert "python -m eapcore import demo/smollm2/runs.zip demo/runs.zip" in text and "no network" in text, page
        assert "eapcore lab" not in " ".join(m.value for m in [*at.info, *at.markdown, *at.caption]), page


def test_one_cache_layer_shares_a_loaded_run_until_its_files_change(monkeypatch, cache):
    """pages/common.py is the dashboard's only memo of loaded runs: one shared object per run key and
    file signature; a rewritten file gives a new signature and a fresh load."""
    import os

    from eapcore.views import query
    from pages import common

    monkeypatch.setenv("EAP_CACHE_DIR", str(cache))
    info = query.finished_runs()[0]
    data = common.loaded_run(info.key, info.signature)
    assert common.loaded_run(info.key, info.signature) is data
    assert common.load(query.get_run(info.key)) is data
    p = info.path / "metrics.json"
    os.utime(p, ns=(p.stat().st_mtime_ns + 10**9,) * 2)
    again = query.get_run(info.key)
    assert again.signature != info.signature and common.load(again) is not data


# ---- faults: altered or stale runs, bad links, a broken registry, a pair that cannot be compared -----

@pytest.fixture
def own_cache(tmp_path):
    """A small cache of its own (tests here alter it): two runs of one pair."""
    from fake_runs import make_run

    keys = [make_run(tmp_path / "cache", pair="Mine", dataset="gsm8k", alpha=a) for a in (0.1, 0.5)]
    return tmp_path / "cache", keys


def test_an_altered_run_is_not_served_and_the_page_says_what_to_do(monkeypatch, own_cache):
    root, (_, key) = own_cache
    scores = root / "runs" / key / "tuned" / "scores.safetensors"
    data = bytearray(scores.read_bytes())
    data[-5] ^= 0x40  # one score altered, same size
    scores.write_bytes(bytes(data))
    at = _app(monkeypatch, root, "pages/heatmaps.py", {"alpha": "0.5"})
    errors = [e.value for e in at.error]
    assert errors == [f"Run {key} cannot be read: run {key}'s files do not match its manifest (tuned/scores.safetensors: "
                      "sha256 mismatch (altered or corrupted)), so it is not shown: its scores may have been altered. "
                      f"Rebuild it from its cached stages with `python -m eapcore run --spec-json "
                      f"{root / 'runs' / key / 'spec.json'}`, or remove it with `python -m eapcore cache rm {key}`"]
    assert not at.get("plotly_chart")
    at = _app(monkeypatch, root, "pages/heatmaps.py", {"alpha": "0.1"})  # the intact run is shown
    assert not at.error and at.get("plotly_chart")


def test_a_run_of_another_scoring_version_is_listed_as_stale(monkeypatch, own_cache):
    from eapcore.views import query

    root, (old, _) = own_cache
    spec = root / "runs" / old / "spec.json"
    data = json.loads(spec.read_text())
    data["spec"]["scoring_version"] = "0"
    spec.write_text(json.dumps(data))
    monkeypatch.setenv("EAP_CACHE_DIR", str(root))
    info = query.get_run(old)
    assert info.stage == "stale" and not info.finished and len(query.finished_runs()) == 1
    with pytest.raises(query.RunNotReady, match=f"run {old} was computed with scoring version '0' and this code "
                                                f"computes '{query.results.SCORING_VERSION}': its scores are stale"):
        query.load_run(old)
    at = _app(monkeypatch, root, "pages/home.py")
    assert "stale" in at.dataframe[0].value["stage"].tolist()


def test_bad_link_parameters_are_ignored_with_a_note(monkeypatch, own_cache):
    root, _ = own_cache
    at = _app(monkeypatch, root, "pages/heatmaps.py", {"pair": "No-Such-Pair", "alpha": "abc", "view": "dst"})
    notes = [w.value for w in at.warning]
    assert "The link's pair='No-Such-Pair' is not one of the choices for “Model pair”, so it was ignored." in notes
    assert "The link's alpha='abc' is not one of the choices for “α (truncation: T_cut = α·T_ref)”, so it was " \
           "ignored." in notes
    assert at.get("plotly_chart")  # the defaults are shown
    at.run()  # the note is about the link: gone once the page is used
    assert not at.warning
    at = _app(monkeypatch, root, "pages/run.py", {"watch": "../../etc/passwd", "alpha": "inf"})
    notes = [w.value for w in at.warning]
    assert "The link's watch='../../etc/passwd' is not a run key (16 hexadecimal digits), so it was ignored." in notes
    assert any(n.startswith("The link's alpha='inf' is not one of the choices") for n in notes)
    at = _app(monkeypatch, root, "pages/run.py", {"watch": "0123456789abcdef"})
    assert f"The link's watch='0123456789abcdef' names no run in this cache ({root}), so it was ignored." in \
        [w.value for w in at.warning]


def test_a_broken_registry_keeps_the_builtin_pairs_and_says_so(monkeypatch, own_cache, tmp_path):
    root, _ = own_cache
    broken = tmp_path / "registry.json"
    broken.write_text('{"pairs": [}')
    monkeypatch.setenv("EAP_REGISTRY", str(broken))
    said = f"{broken} is not valid JSON (Expecting value at line 1, column 12); fix it by hand or delete it"
    for page in ("pages/home.py", "pages/run.py"):
        at = _app(monkeypatch, root, page)
        assert said in [w.value for w in at.warning], page
    assert "DeepSeek-Math (GRPO)" in at.selectbox(key="w_pair").options


def test_the_run_page_refuses_a_pair_of_other_tokenizers(monkeypatch, own_cache, checkpoints, tmp_path):
    """A hand-written pair whose models cannot be compared: the message, and Start disabled."""
    root, _ = own_cache
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"pairs": [{"name": "mixed", "base": str(checkpoints["llama"]),
                                                    "tuned": str(checkpoints["qwen2"])}]}))
    monkeypatch.setenv("EAP_REGISTRY", str(registry_file))
    at = _app(monkeypatch, root, "pages/run.py", {"pair": "mixed"})
    assert [e.value for e in at.error] == ["pair 'mixed': base and tuned have different architectures ('llama' and "
                                           "'qwen2'); a pair is one model before and after RL tuning"]
    assert [b.disabled for b in at.button if b.label == "▶ Start run"] == [True]


def test_run_page_progress_says_what_came_from_the_cache(monkeypatch, tmp_path):
    """A run whose tuned side's 30 scores came from the cache: its bar says so instead of looking
    like a model was skipped."""
    key = "c" * 16
    folder = tmp_path / "runs" / key
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"stage": "done", "done": 60, "total": 60, "cached": 30,
                                                    "message": "tuned: 30 of 30 samples from the cache"}))
    at = _app(monkeypatch, tmp_path, "pages/run.py", {"watch": key})
    bars = [str(p.proto) for p in at.get("progress")]
    assert any("60/60 (30 from cache)" in b for b in bars), bars


# ---- Run page against a real worker process (workers.start) ----------------------------------------

@pytest.fixture
def run_lab(checkpoints, tmp_path, monkeypatch):
    """A temp cache and registry holding a tiny Llama pair (seeds 0 and 1, as in test_runner.py)
    and a tiny GSM8K-style dataset; the worker inherits this environment."""
    from conftest import make_checkpoint
    from eapcore.runs import registry, stages
    from eapcore.specs import DatasetSpec, ModelSpec, PairSpec

    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("EAP_SHIPPED_RUNS", "off")  # the cache holds only what the test runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker: one torch thread on a busy machine
    monkeypatch.delenv(stages.SLEEP_ENV, raising=False)
    tuned = make_checkpoint(tmp_path / "tuned", "llama", seed=1)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in
                            [("What is 3 + 4?", 7), ("What is 9 - 5?", 4), ("What is 2 * 6?", 12),
                             ("What is 8 + 8?", 16), ("What is 7 - 2?", 5), ("What is 3 * 3?", 9)]))
    registry.add_pair(PairSpec("tiny-pages", ModelSpec(str(checkpoints["llama"])), ModelSpec(str(tuned)),
                               "deepseek-math", 8, "GRPO"))
    registry.add_dataset(DatasetSpec("tiny-pages-set", str(data)))
    return tmp_path / "cache"


def _widget(widgets, label: str):
    return next(w for w in widgets if w.label.startswith(label))


def _start_run_from_page(monkeypatch, cache_root):
    """Choose the tiny pair, dataset and small settings with the Run page's widgets, click Start."""
    at = _app(monkeypatch, cache_root, "pages/run.py")
    at.selectbox(key="w_pair").select("tiny-pages").run()
    at.selectbox(key="w_dataset").select("tiny-pages-set")
    at.selectbox(key="w_group").select("both_wrong")  # random models answer wrongly
    _widget(at.selectbox, "Generation dtype").select("float32")
    _widget(at.number_input, "N questions").set_value(4)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    key = next(m.value for m in at.markdown if m.value.startswith("Run key")).split("`")[1]
    _widget(at.button, "▶ Start run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.session_state["active_run"] == key
    assert (Path(cache_root) / "runs" / key / "spec.json").is_file()
    return at, key


def _wait_status(key, condition, timeout: float, what: str) -> dict:
    import os
    import time

    from eapcore.runs import workers

    end = time.time() + timeout
    while time.time() < end:
        st = workers.status(key)
        if st and condition(st):
            return st
        time.sleep(0.2)
    log = Path(os.environ["EAP_CACHE_DIR"]) / "runs" / key / "worker.log"
    raise AssertionError(f"timed out waiting for {what}; status {workers.status(key)}; worker.log:\n"
                         f"{log.read_text()[-3000:] if log.is_file() else '(none)'}")


def test_run_page_launches_a_worker_and_shows_it_finished(monkeypatch, run_lab):
    import os

    at, key = _start_run_from_page(monkeypatch, run_lab)
    first = _wait_status(key, lambda s: True, 10, "a status")
    assert first["pid"] != os.getpid()  # a separate worker process
    runner_status = _wait_status(key, lambda s: s["stage"] in ("done", "error", "cancelled"), 120, "the run to end")
    assert runner_status["stage"] == "done", runner_status
    at.run()  # what the progress fragment shows on its next tick
    assert not at.exception, [e.message for e in at.exception]
    assert "Finished." in [s.value for s in at.success]
    assert any("stage **done**" in str(p.proto) for p in at.get("progress"))
    clock = next(c.value for c in at.caption if c.value.startswith("Stage clock: "))
    assert "generate" in clock and " s on cpu" in clock and "metrics" in clock
    assert any(m.value.startswith("**Run clock**") for m in at.markdown)  # clock.json, over all executions
    table = next(d.value for d in at.dataframe if "wall time" in d.value.columns)
    assert list(table["stage"]) == ["generate", "grade", "select", "attribute", "metrics", "total"]
    assert set(table["device"][:-1]) == {"cpu"} and table["seconds"].iloc[-1] == pytest.approx(
        table["seconds"][:-1].sum(), abs=0.3)
    folder = Path(run_lab) / "runs" / key
    for name in ("base/scores.safetensors", "tuned/scores.safetensors", "metrics.json", "manifest.json"):
        assert (folder / name).is_file(), name
    spec = json.loads((folder / "spec.json").read_text())["spec"]
    assert spec["pair"]["name"] == "tiny-pages" and spec["dataset"]["name"] == "tiny-pages-set"
    assert spec["selection"]["group"] == "both_wrong" and spec["selection"]["n"] == 4
    assert spec["generation"]["dtype"] == "float32"


def test_run_page_cancel_stops_the_worker_and_keeps_samples(monkeypatch, run_lab):
    from eapcore.runs import stages
    from eapcore.runs.cache import Cache

    monkeypatch.setenv(stages.SLEEP_ENV, "3")  # slow attribution; the worker inherits os.environ
    at, key = _start_run_from_page(monkeypatch, run_lab)
    _wait_status(key, lambda s: s["stage"] == "attribute", 60, "the attribute stage")
    at.run()  # the progress fragment's next tick: Cancel is shown while the worker runs
    _widget(at.button, "■ Cancel").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("Cancel requested" in w.value for w in at.warning)
    st = _wait_status(key, lambda s: s["stage"] == "cancelled" and not s["running"], 30, "cancellation")
    assert "finished samples are kept" in st["message"]
    cache = Cache()
    kept = len(list((cache.root / "scores").glob("*/manifest.json")))
    assert kept >= max(1, st["done"])  # every finished sample is kept in the cache
    assert cache.verify_run(key)  # not sealed: a cancelled run is not a finished one
    at.run()
    assert not at.exception
    assert any("stage **cancelled**" in str(p.proto) for p in at.get("progress"))
    assert not [b for b in at.button if b.label == "■ Cancel"]  # nothing left to cancel


# ---- first screen, the Run page's specs and links (issue 14) ------------------------------------------

def test_first_screen_imports_the_shipped_runs_and_opens_the_default_heatmaps(monkeypatch, tmp_path):
    """A bare start on an empty cache: the runs shipped in demo/smollm2/runs.zip and demo/runs.zip
    are imported (a note says so, once), and "/" shows the default pair's heatmaps: the SmolLM2
    GRPO pair, both correct, alpha 0.5."""
    from streamlit.testing.v1 import AppTest

    from eapcore.runs import shipped
    from eapcore.runs.cache import Cache

    monkeypatch.delenv("EAP_SHIPPED_RUNS", raising=False)
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "fresh"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, [e.message for e in at.exception]
    assert [t.value for t in at.title] == ["Heatmaps: where the circuitry changes"]
    assert any("imported the 20 runs shipped in demo/smollm2/runs.zip and demo/runs.zip" in t.value for t in at.toast), \
        [t.value for t in at.toast]
    params = {k: at.query_params[k] for k in ("pair", "dataset", "alpha", "group", "gran")}
    assert {k: v[0] if isinstance(v, list) else v for k, v in params.items()} == {
        "pair": "SmolLM2: SFT vs GRPO", "dataset": "smollm2", "alpha": "0.5", "group": "both_correct", "gran": "layer"}
    assert any("destination layer and module" in t for t in _titles(at))
    caption = " ".join(m.value for m in at.markdown)  # what the pair is, beside the run's settings
    assert "`demo/smollm2/sft` → tuned `demo/smollm2/grpo`, GRPO (SmolLM2-135M-Instruct" in caption, caption
    assert "accuracy on the 500 questions of smollm2: base " in caption
    assert len(list((tmp_path / "fresh" / "runs").iterdir())) == 20
    assert not Cache(tmp_path / "fresh").verify_run(next((tmp_path / "fresh" / "runs").iterdir()).name)
    again = AppTest.from_file(APP, default_timeout=60).run()  # a later session: no note, nothing imported
    assert not again.exception and not again.toast
    assert shipped.import_if_empty(Cache(tmp_path / "fresh")) is None
    # the sidebar's Run link: the page starts from the first screen's run, so a new alpha reuses its answers
    run = AppTest.from_file(APP, default_timeout=60)
    run.switch_page("pages/run.py").run()
    assert not run.exception, [e.message for e in run.exception]
    assert (run.selectbox(key="w_pair").value, run.selectbox(key="w_dataset").value) == ("SmolLM2: SFT vs GRPO", "smollm2")
    shown = next(m.value for m in run.markdown if m.value.startswith("Run key")).split("`")[1]
    assert shown == (at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"])


def _spec_json(root: Path, spec) -> str:
    """A run folder holding only spec.json (as `workers.start` writes it): enough for ?from=."""
    from eapcore.specs import spec_key, to_dict

    key = spec_key(spec)
    (root / "runs" / key).mkdir(parents=True)
    (root / "runs" / key / "spec.json").write_text(json.dumps({"key": key, "spec": to_dict(spec)}))
    return key


def _page_key(at) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("Run key")).split("`")[1]


def odd_specs(tmp_path: Path) -> list:
    """Specs with every setting away from its default: a registered pair and dataset, an
    unregistered dataset file with a split, imported joined answers, a pair no longer registered."""
    import dataclasses

    from eapcore.runs import registry
    from eapcore.specs import (AnswersSpec, AttributionSettings, DatasetSpec, GenerationSettings, ModelSpec, PairSpec,
                               QuickSettings, RunSpec, SelectionSettings)

    demo = registry.get_pair("demo: SFT vs GRPO")
    odd = RunSpec(demo, dataclasses.replace(registry.get_dataset("demo"), limit=37),
                  GenerationSettings(max_new_tokens=17, batch_size=3, backend="transformers", dtype="float16"),
                  SelectionSettings(alpha=0.25, beta=0.7, low=0.4, high=1.6, n=33, seed=5, group="tuned_only"),
                  AttributionSettings(granularity="head", dtype="bfloat16", device="cpu", ig_steps=3,
                                      max_batch_tokens=4096))
    problems = tmp_path / "mine.jsonl"
    problems.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    return [odd,
            dataclasses.replace(odd, dataset=DatasetSpec("mine", str(problems), "train", None)),
            dataclasses.replace(odd, dataset=DatasetSpec("math/all_correct"), generation=GenerationSettings(),
                                answers=AnswersSpec(str(tmp_path / "math" / "all_correct.jsonl"))),
            dataclasses.replace(odd, pair=PairSpec("gone", ModelSpec("org/base"), ModelSpec("org/rl"), "mistral", 99)),
            dataclasses.replace(odd, quick=QuickSettings(seed=9, chunk=11))]


def test_run_page_offers_quick_runs_and_shows_what_they_saved(monkeypatch, tmp_path):
    """The quick-run checkbox makes the spec a quick one (another key; its seed and round size are
    settings too); a quick run's folder shows its questions, rounds and tokens saved."""
    import dataclasses

    from eapcore.specs import QuickSettings, spec_key

    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("EAP_SHIPPED_RUNS", "off")
    root = tmp_path / "cache"
    spec = odd_specs(tmp_path)[0]
    at = _app(monkeypatch, root, "pages/run.py", {"from": _spec_json(root, spec)})
    _widget(at.checkbox, "Quick run").check().run()
    assert _page_key(at) == spec_key(dataclasses.replace(spec, quick=QuickSettings()))
    _widget(at.number_input, "Order seed").set_value(4).run()
    _widget(at.number_input, "Questions per round").set_value(50).run()
    quick = dataclasses.replace(spec, quick=QuickSettings(seed=4, chunk=50))
    assert _page_key(at) == spec_key(quick)
    folder = root / "runs" / _spec_json(root, quick)
    (folder / "quick.json").write_text(json.dumps({
        "seed": 4, "chunk": 50, "n": 33, "questions": 100, "of": 600, "kept": 41, "generated_now": 0,
        "rounds": [{"questions": 50, "kept": 20}, {"questions": 100, "kept": 41}], "answer_tokens": {"base": 900,
        "tuned": 1100}, "whole_dataset_tokens_estimate": 12000, "tokens_saved_estimate": 10000}))
    at = _app(monkeypatch, root, "pages/run.py", {"from": quick and spec_key(quick)})
    text = " ".join(c.value for c in at.caption)
    assert ("Quick run: 100 of 600 questions answered in 2 round(s), 41 pass the selection (N = 33); 2,000 answer "
            "tokens, about 10,000 fewer than the whole dataset would take") in text


def test_run_page_reproduces_a_runs_exact_spec_and_key(monkeypatch, tmp_path):
    """?from=<key> sets every widget of the Run page to that run's spec: the page's key is the run's
    (for every setting the command line has, a dataset file, imported answers, an unregistered
    pair); a URL group changes only the group."""
    import dataclasses

    from eapcore.specs import spec_key

    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("EAP_SHIPPED_RUNS", "off")
    root = tmp_path / "cache"
    for spec in odd_specs(tmp_path):
        key = _spec_json(root, spec)
        at = _app(monkeypatch, root, "pages/run.py", {"from": key})
        assert _page_key(at) == key, spec
        assert not at.warning, [w.value for w in at.warning]
        other = _app(monkeypatch, root, "pages/run.py", {"from": key, "group": "both_wrong"})
        assert _page_key(other) == spec_key(dataclasses.replace(
            spec, selection=dataclasses.replace(spec.selection, group="both_wrong")))
    # a widget changed after the prefill changes the key as the command line's option would
    at.selectbox(key="run_device").select("auto").run()
    assert _page_key(at) == spec_key(dataclasses.replace(spec, attribution=dataclasses.replace(
        spec.attribution, device="auto")))


def test_finished_runs_link_to_their_spec_on_the_run_page(monkeypatch, cache):
    """'Open in the Run page' beside a run and the missing-groups link carry the run's key, and
    the Run page they open shows that run (or its missing group) by key."""
    import dataclasses

    from eapcore.specs import spec_key
    from eapcore.views import query

    at = _app(monkeypatch, cache, "pages/groups.py", {"pair": "Toy-DPO", "dataset": "gsm8k", "alpha": "0.1"})
    link = next(p.proto for p in at.get("page_link") if p.proto.label.startswith("Run the missing groups"))
    info = query.get_run(link.query_string.split("from=")[1].split("&")[0], str(cache))
    assert info.pair == "Toy-DPO" and info.alpha == 0.1
    assert link.query_string == f"from={info.key}&group=both_wrong"
    run = _app(monkeypatch, cache, "pages/run.py", {"from": info.key, "group": "both_wrong"})
    assert _page_key(run) == spec_key(dataclasses.replace(info.spec, selection=dataclasses.replace(
        info.spec.selection, group="both_wrong")))
    heat = _app(monkeypatch, cache, "pages/heatmaps.py", {"pair": "Demo-Tiny", "dataset": "gsm8k", "alpha": "0.5"})
    opened = next(p.proto for p in heat.get("page_link") if p.proto.label == "Open in the Run page")
    key = opened.query_string.removeprefix("from=")
    again = _app(monkeypatch, cache, "pages/run.py", {"from": key})
    assert _page_key(again) == key and "Already cached" in " ".join(s.value for s in again.success)


def test_home_lists_the_pairs_with_their_family(monkeypatch, cache):
    from eapcore.runs import registry

    at = _app(monkeypatch, cache, "pages/home.py")
    table = next(df.value for df in at.dataframe if "family" in df.value.columns)
    family = dict(zip(table["pair"], table["family"]))
    assert {name: family[name] for name in (p.name for p in registry.FAMILY_PAIRS)} == \
        {p.name: p.family for p in registry.FAMILY_PAIRS}
    assert family["DeepSeek-Math"] == ""


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory):
    """A family's three pairs (SFT vs DPO, SFT vs RLVR, DPO vs RLVR) on one dataset and settings,
    sharing their models, and a run of the SFT vs DPO pair at another alpha."""
    from fake_runs import make_run

    root = tmp_path_factory.mktemp("family-cache")
    keys = {}
    for (a, b), effect in zip((("sft", "dpo"), ("sft", "rlvr"), ("dpo", "rlvr")), (0.5, 1.0, 0.6)):
        name = f"Fam: {a.upper()} vs {b.upper()}"
        keys[name] = make_run(root, pair=name, dataset="gsm8k", alpha=0.5, effect=effect, family="Fam",
                              algorithm=b.upper(), models=(a, b), n_bootstrap=50, n_permutations=99)
    keys["other alpha"] = make_run(root, pair="Fam: SFT vs DPO", dataset="gsm8k", alpha=0.1, family="Fam",
                                   algorithm="DPO", models=("sft", "dpo"), n_bootstrap=50, n_permutations=99)
    return root, keys


def test_a_family_runs_pages_link_its_comparisons(monkeypatch, family_cache):
    """A single-run page of a family pair links the Compare page with each other pair of its family
    on the same settings (A = this run, B = the other, at the side where their models differ), and
    the Compare page lists those runs first for B and says what the two pairs share."""
    root, keys = family_cache
    at = _app(monkeypatch, root, "pages/heatmaps.py", {"pair": "Fam: SFT vs RLVR", "dataset": "gsm8k", "alpha": "0.5"})
    family = [el.proto for el in at.get("page_link") if el.proto.label.startswith("Compare with")]
    # a family that is not registered: its pairs by name (a registered one: in the registry's order)
    assert [link.label for link in family] == ["Compare with Fam: DPO vs RLVR (base models)",
                                               "Compare with Fam: SFT vs DPO (tuned models)"]
    a = keys["Fam: SFT vs RLVR"]
    assert [link.query_string for link in family] == [f"a={a}&b={keys['Fam: DPO vs RLVR']}&side=base",
                                                      f"a={a}&b={keys['Fam: SFT vs DPO']}&side=tuned"]
    at = _app(monkeypatch, root, "pages/compare.py", {"a": a, "b": keys["Fam: DPO vs RLVR"], "side": "base"})
    options = at.selectbox(key="w_b").options
    assert len(options) == 3 and all(o.endswith("· same family") for o in options[:2])
    assert not options[2].endswith("· same family")  # SFT vs DPO at another alpha: comparable, not a sibling
    info = " ".join(i.value for i in at.info)
    assert "one family (Fam)" in info and "tuned: " in info and "base models are the ones to compare." in info
    assert _figures(at)[0]["layout"]["annotations"][0]["text"] == "Run A: base model"
    # with no link: A is the first screen's run (query.default_view), B a pair of its family
    from eapcore.views import query

    bare = _app(monkeypatch, root, "pages/compare.py")
    first = query.default_view(query.finished_runs(root))["run"]
    assert bare.selectbox(key="w_a").value == first and first in keys.values()
    assert bare.selectbox(key="w_b").options[0].endswith("· same family")


def _memo_uses(source: str) -> list[str]:
    """Where `source` uses Streamlit's memo decorators: `x.cache_data` / `x.cache_resource` attributes
    (decorators, calls, .clear()) and names imported as `from streamlit import cache_data`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("cache_data", "cache_resource"):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("streamlit"):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in ("cache_data", "cache_resource")]
    return found


def test_pages_common_is_the_only_memo_layer():
    """Layout rule (docs/DESIGN.md "Caching"): no page file nor app.py memoizes by itself; the check
    finds the decorators of pages/common.py and ignores a comment or a string naming them."""
    files = sorted((ROOT / "pages").glob("*.py")) + [ROOT / "app.py"]
    uses = {p.relative_to(ROOT).as_posix(): _memo_uses(p.read_text()) for p in files}
    assert len(uses) > 8 and len(uses.pop("pages/common.py")) >= 5
    assert {name: found for name, found in uses.items() if found} == {}
    assert _memo_uses("import streamlit as st\n# st.cache_data\nx = 'st.cache_resource'\n") == []
    assert _memo_uses("from streamlit import cache_resource as memo\n@memo\ndef f(): pass\n"
                      "@st.cache_data(ttl=60)\ndef g(): pass\n") == ["line 1: import cache_resource",
                                                                    "line 4: .cache_data"]


def test_cached_over_runs_is_keyed_by_every_runs_files(monkeypatch, own_cache):
    """A view of the run list is computed once per (root, runs' keys and signatures, args): not again
    while the files stay, again once one run's files change, and the new table has the change."""
    import functools
    import os

    from eapcore.views import query
    from pages import common

    root, _ = own_cache
    monkeypatch.setenv("EAP_CACHE_DIR", str(root))
    calls, real = [], query.summary_rows
    monkeypatch.setattr(query, "summary_rows", functools.wraps(real)(lambda runs: calls.append(1) or real(runs)))
    rows = common.cached_over_runs(query.summary_rows)
    first = rows(query.finished_runs())
    assert first.equals(real(query.finished_runs())) and rows(query.finished_runs()).equals(first)
    assert len(calls) == 1
    p = query.finished_runs()[0].path / "metrics.json"
    metrics = json.loads(p.read_text())
    metrics["activation_intensity"]["tuned"] *= 2
    p.write_text(json.dumps(metrics))
    os.utime(p, ns=(p.stat().st_mtime_ns + 10**9,) * 2)
    again = rows(query.finished_runs())
    assert len(calls) == 2 and again.equals(real(query.finished_runs())) and not again.equals(first)
    with pytest.raises(ValueError, match="caches functions of eapcore.views only"):
        common.cached_over_runs(sorted)


def test_recent_reuses_a_check_for_its_time_to_live(monkeypatch, own_cache):
    """`recent`: one result per (function, key) within the ttl-long window of the clock, a fresh call
    in the next one; an error of `errors` is returned as its message, another one raised."""
    from types import SimpleNamespace

    from eapcore.views import query
    from pages import common

    root, (key, _) = own_cache
    monkeypatch.setenv("EAP_CACHE_DIR", str(root))
    clock = SimpleNamespace(now=60 * 16_667.0)  # the start of a minute
    monkeypatch.setattr(common, "time", SimpleNamespace(time=lambda: clock.now))
    check = dict(key=key, ttl=60, spinner="Checking…")
    info, error = common.recent(query.get_run, key, **check)
    assert error is None and info.key == key and info.signature
    (root / "runs" / key / "metrics.json").unlink()  # the run's files change
    clock.now += 59
    assert common.recent(query.get_run, key, **check)[0].signature == info.signature  # within the minute: reused
    clock.now += 1
    assert common.recent(query.get_run, key, **check)[0].signature != info.signature  # the next minute: checked again
    missing = "0" * 16
    result, error = common.recent(query.load_run, missing, key=missing, ttl=60, spinner="", errors=(KeyError,))
    assert result is None and error == f"\"no run '{missing}' in {root / 'runs'}\""
    with pytest.raises(KeyError, match=missing):
        common.recent(query.load_run, missing, key=missing, ttl=60, spinner="", errors=(query.RunNotReady,))
