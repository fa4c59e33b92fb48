"""End to end in a real headless browser: `streamlit run app.py` on 127.0.0.1 with a fake cache,
Playwright driving Debian's /usr/bin/chromium. Screenshots of every page go to test-output/."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
OUT = ROOT / "test-output"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (apt-get install chromium); the project's "
                                       "test script installs it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _streamlit(cache: Path, log_dir: Path):
    """`streamlit run app.py` on a free port over `cache`, until the block ends; yields its URL."""
    port = _free_port()
    env = {**os.environ, "EAP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = open(log_dir / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                             "--server.headless", "true", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--browser.gatherUsageStats", "false",
                             "--server.fileWatcherType", "none"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read().strip() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"streamlit did not become healthy; log: {Path(log.name).read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory) -> Path:
    """The small fake cache plus two runs of a 30-layer model (SmolLM2's shape: 9 / 3 heads), 40
    questions, α 0.1 and 0.5 on the same questions: labels, significance marks, a paired comparison."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_runs import make_run, make_small_cache

    cache = tmp_path_factory.mktemp("cache")
    make_small_cache(cache)
    for alpha in (0.1, 0.5):
        make_run(cache, pair="Wide-30", alpha=alpha, n_layers=30, n_heads=9, n_kv_heads=3, n=40, n_questions=100,
                 acc_base=0.8, acc_tuned=0.9, effect=1.0 if alpha == 0.5 else 0.3, seed=7, n_bootstrap=50,
                 n_permutations=99)
    return cache


@pytest.fixture(scope="module")
def server(fake_cache, tmp_path_factory):
    with _streamlit(fake_cache, tmp_path_factory.mktemp("log")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    OUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield chromium
        chromium.close()


def _new_page(browser):
    return browser.new_page(viewport={"width": 1500, "height": 1600})


@pytest.fixture(scope="module")
def page(server, browser):
    pg = _new_page(browser)
    yield pg
    pg.close()


def _open(page, url: str, must_see: str, timeout: float = 30_000) -> None:
    page.goto(url)
    page.wait_for_selector(READY, timeout=timeout)
    page.get_by_text(must_see, exact=False).first.wait_for(timeout=timeout)
    page.wait_for_selector(READY, timeout=timeout)


def _settle(page, timeout: float = 30_000) -> None:
    page.wait_for_timeout(300)
    page.wait_for_selector(READY, timeout=timeout)


def _check(page, name: str, n_charts: int = 1, n_tables: int = 0) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, \
        f"{name}: Streamlit exception: {page.locator('[data-testid=stException]').first.inner_text()[:500]}"
    if n_charts:
        page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').nth(n_charts - 1).wait_for(timeout=30_000)
    assert page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').count() >= n_charts, name
    if n_tables:
        page.locator('[data-testid="stDataFrame"]').nth(n_tables - 1).wait_for(timeout=30_000)
    page.wait_for_timeout(600)  # let Plotly finish drawing before the screenshot
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)


def _wait_title(page, text: str, timeout: float = 30_000) -> None:
    """Wait until some Plotly figure on the page has a title containing `text` (figures draw
    after the script finishes, so an immediate read can see the previous or no figure)."""
    page.wait_for_function("t => [...document.querySelectorAll('.js-plotly-plot')].some("
                           "e => e.layout && String((e.layout.title && (e.layout.title.text || e.layout.title)) || '')"
                           ".includes(t))", arg=text, timeout=timeout)


def _choose(page, label: str, option: str) -> None:
    """Pick `option` in the Streamlit selectbox labelled `label`."""
    page.get_by_role("combobox", name=label).first.click()
    page.get_by_role("option", name=option, exact=False).first.click()
    _settle(page)


def test_every_page_in_a_browser(server, page):
    # Home: intro, cached runs table, the default-view link
    # (the first request after start-up may rerun once to leave Streamlit's pages-folder mode, so
    # wait for the element itself rather than counting right after the first text shows)
    _open(page, f"{server}/home", "Open the default view")
    assert page.get_by_text("Open the default view").count() == 1
    assert page.get_by_text("Page not found").count() == 0 and page.url.startswith(f"{server}/home")
    assert page.get_by_text("Cached runs").count() >= 1
    _check(page, "home", n_charts=0, n_tables=1)

    # Heatmaps: default view, then change the aggregation; the figure title must follow
    _open(page, f"{server}/heatmaps?pair=Demo-Tiny&dataset=gsm8k&alpha=0.5", "Heatmaps: where the circuitry changes")
    _check(page, "heatmaps", n_charts=2)
    _wait_title(page, "destination layer and module")
    _choose(page, "Aggregation", "Source layer × destination layer")
    _wait_title(page, "source layer × destination layer")
    assert "view=layers" in page.url  # page state lives in the URL
    _check(page, "heatmaps_layers", n_charts=2)

    # The URL alone reproduces the view (shareable link)
    _open(page, page.url, "Heatmaps: where the circuitry changes")
    _wait_title(page, "source layer × destination layer")

    # Distributions: 3 metric charts + |s| histogram, switch the plot type
    _open(page, f"{server}/distributions", "Pooled distribution of |s|")
    _check(page, "distributions", n_charts=4, n_tables=1)
    page.get_by_text("ECDFs", exact=True).click()
    _settle(page)
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some("
                           "e => String(e.layout.title.text || '').includes('empirical CDF'))", timeout=30_000)
    _check(page, "distributions_ecdf", n_charts=4)

    # Correct vs incorrect: the four groups of Demo-Tiny / gsm8k / 0.5
    _open(page, f"{server}/groups?pair=Demo-Tiny&dataset=gsm8k&alpha=0.5", "groups cached: 4 of 4")
    _check(page, "groups", n_charts=1, n_tables=2)
    _wait_title(page, "by answer group")

    # Summary: one table per metric, accuracy, change vs gain
    _open(page, f"{server}/summary", "Metric change vs accuracy gain")
    _check(page, "summary", n_charts=1, n_tables=5)
    _wait_title(page, "change vs accuracy gain")

    # Samples: decoded answers with the truncation marker
    _open(page, f"{server}/samples", "This question's metrics")
    assert page.get_by_text("T_cut=", exact=False).count() >= 2
    _check(page, "samples", n_charts=1, n_tables=1)

    # Run: form, cache state, past runs
    _open(page, f"{server}/run", "Past runs")
    _check(page, "run", n_charts=0, n_tables=1)


def test_deep_link_to_a_fresh_server_is_routed_by_app_py(fake_cache, browser, tmp_path):
    """Against the pinned Streamlit (1.67): the first request a fresh server gets runs the linked
    page alone, in Streamlit's pages-folder mode (pages/ exists next to app.py); the page header
    leaves that mode (pages/common.py `_ensure_navigation`, the one place that touches Streamlit
    internals) and reruns, so app.py's st.navigation serves the link: its sections and page title."""
    with _streamlit(fake_cache, tmp_path) as url:
        pg = _new_page(browser)
        _open(pg, f"{url}/summary", "Metric change vs accuracy gain")
        nav = pg.locator('[data-testid="stSidebarNav"]')
        nav.get_by_text("Across runs").wait_for(timeout=15_000)
        text = nav.inner_text()
        assert "One run" in text and "Correct vs incorrect" in text and "common" not in text.lower(), text
        assert pg.title() == "RL circuit diff"  # app.py's page config
        pg.close()


def test_bare_start_on_an_empty_cache_shows_the_default_heatmaps(browser, tmp_path):
    """`streamlit run app.py` with no runs cached: the shipped runs are imported at start and "/"
    lands on the default pair's heatmaps (SmolLM2, SFT vs GRPO) at their own address; the toy demo
    pairs stay listed; /home is the Home page."""
    (tmp_path / "log").mkdir()
    with _streamlit(tmp_path / "empty-cache", tmp_path / "log") as url:
        pg = _new_page(browser)
        _open(pg, url, "Heatmaps: where the circuitry changes", timeout=60_000)
        _wait_title(pg, "destination layer and module")
        assert "/heatmaps?" in pg.url and "pair=SmolLM2" in pg.url, pg.url
        assert pg.get_by_text("SmolLM2: SFT vs GRPO").count() >= 1
        _check(pg, "first_screen", n_charts=2)
        _open(pg, f"{url}/home", "Open the default view")
        assert pg.get_by_text("Page not found").count() == 0
        pg.close()
    assert len(list((tmp_path / "empty-cache" / "runs").iterdir())) == 20


# ---- significance, comparison, labels and layout (issue 16) -------------------------------------------

WIDE = "pair=Wide-30&dataset=gsm8k&alpha=0.5&group=both_correct&gran=layer"
CELLS_JS = """() => {
  const fig = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
  // the traces as given (fig.data), their z as Plotly decoded it (_fullData: rows of numbers, NaN for none)
  const z = i => (fig._fullData.find(f => f.index === i) || {}).z || [];
  const count = i => Array.from(z(i), r => Array.from(r)).flat().filter(Number.isFinite).length;
  const heat = fig.data.map((t, i) => [t, i]).filter(([t]) => t.type === 'heatmap');
  return {coloured: heat.filter(([t]) => t.coloraxis === 'coloraxis2').map(([, i]) => count(i)),
          grey: heat.filter(([t]) => t.name === 'not significant').map(([, i]) => count(i)),
          legend: [...fig.querySelectorAll('.legendtext')].map(e => e.textContent)};
}"""


def test_significance_marks_in_a_browser(server, page):
    _open(page, f"{server}/heatmaps?{WIDE}&view=dst", "cells pass at FDR")
    _wait_title(page, "destination layer and module")
    cells = page.evaluate(CELLS_JS)
    coloured, noise = cells["coloured"]
    assert coloured > 0 and cells["grey"][0] > 0, cells  # some changes pass, some do not
    assert noise == 0  # the noise floor passes nothing
    assert any("not significant" in t and "q > 0.05" in t for t in cells["legend"]), cells["legend"]
    # hovering a cell of the change panel names its q-value and verdict
    drag = page.locator('[data-testid="stPlotlyChart"] .draglayer .x3y3 .nsewdrag').first.bounding_box()
    page.mouse.move(drag["x"] + drag["width"] * 0.3, drag["y"] + drag["height"] * 0.9)
    hover = page.locator('[data-testid="stPlotlyChart"] .hoverlayer .hovertext').first
    hover.wait_for(timeout=10_000)
    assert "q = " in hover.text_content() and "at FDR 0.05" in hover.text_content(), hover.text_content()
    _check(page, "heatmaps_significance", n_charts=2)
    page.get_by_text("off: colour every cell", exact=True).click()
    _settle(page)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stPlotlyChart\"] .js-plotly-plot')"
                           ".data.some(t => t.name === 'not significant')", timeout=30_000)
    assert "fdr=off" in page.url
    assert page.evaluate(CELLS_JS)["coloured"][0] == coloured + cells["grey"][0]  # every cell coloured
    _check(page, "heatmaps_significance_off", n_charts=2)


def test_full_matrix_labels_every_node_in_a_browser(server, page):
    _open(page, f"{server}/heatmaps?{WIDE}&view=full", "cells pass at FDR")
    _wait_title(page, "Full edge matrix")
    page.wait_for_timeout(800)
    ticks = page.evaluate("""() => {
      const fig = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
      const text = sel => [...fig.querySelectorAll(sel)].map(e => e.textContent);
      return {x: text('.subplot.xy .xaxislayer-above .xtick text'), y: text('.subplot.xy .yaxislayer-above .ytick text')};
    }""")
    assert len(ticks["x"]) == 121 and len(ticks["y"]) == 61, (len(ticks["x"]), len(ticks["y"]))
    assert {"a29", "m29", "a0"} <= set(ticks["y"]) and {"a29.k", "m29", "logits", "a0.q"} <= set(ticks["x"])
    _check(page, "heatmaps_full_30_layers", n_charts=2)
    # the page scrolls inside its own container: the whole figure, taller than the window, on its own
    page.locator('[data-testid="stPlotlyChart"]').first.screenshot(path=str(OUT / "heatmaps_full_30_layers_figure.png"))


def test_compare_two_runs_in_a_browser(server, page):
    _open(page, f"{server}/compare", "Run A (the reference)")
    # choose run A = Wide-30 α=0.1 and run B = Wide-30 α=0.5 with the sidebar pickers
    _choose(page, "Run A (the reference)", "Wide-30 · gsm8k · α=0.1")
    _choose(page, "Run B (compared with A)", "Wide-30 · gsm8k · α=0.5")
    page.get_by_text("Paired: both runs scored the same 40 questions of gsm8k", exact=False).first.wait_for(
        timeout=30_000)
    _wait_title(page, "destination layer and module")
    assert page.get_by_text("selection.alpha: 0.1 → 0.5", exact=False).count() >= 1
    cells = page.evaluate(CELLS_JS)
    assert cells["coloured"][0] > 0, cells
    assert "a=" in page.url and "b=" in page.url
    _check(page, "compare_paired", n_charts=1)
    page.get_by_text("base model", exact=True).click()
    _settle(page)
    _wait_title(page, "destination layer and module")
    page.get_by_text("Run A: base model", exact=False).first.wait_for(timeout=30_000)
    _check(page, "compare_paired_base_side", n_charts=1)


def test_layout_at_1600_px(server, browser):
    """Download buttons under the distribution charts show their whole label, the few-pairs caveat
    sits clear of the x-axis title, and the samples' highlight continues past a blank line."""
    pg = browser.new_page(viewport={"width": 1600, "height": 1200})
    _open(pg, f"{server}/distributions", "Pooled distribution of |s|")
    _check(pg, "distributions_1600", n_charts=4)
    buttons = pg.evaluate("""() => [...document.querySelectorAll('[data-testid="stDownloadButton"] button')].map(b => ({
        text: b.innerText.trim(),
        cut: [b, ...b.querySelectorAll('*')].some(e => e.scrollWidth > e.clientWidth + 1)}))""")
    assert len(buttons) >= 8 and all(not b["cut"] for b in buttons), buttons
    assert {b["text"] for b in buttons} >= {"⬇ PNG", "⬇ SVG"}

    _open(pg, f"{server}/summary", "Metric change vs accuracy gain")
    _wait_title(pg, "change vs accuracy gain")
    pg.wait_for_timeout(600)
    boxes = pg.evaluate("""() => {
      const fig = [...document.querySelectorAll('.js-plotly-plot')].find(e => String(e.layout.title.text).includes('accuracy gain'));
      const caveat = [...fig.querySelectorAll('.annotation')].find(a => a.textContent.includes('pairs:'));
      const box = e => { const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom}; };
      return {caveat: box(caveat), title: box(fig.querySelector('.xtitle')), svg: box(fig)};
    }""")
    assert boxes["caveat"]["top"] >= boxes["title"]["bottom"], boxes  # under the axis title, not over it
    assert boxes["caveat"]["bottom"] <= boxes["svg"]["bottom"] + 1, boxes  # and inside the figure
    _check(pg, "summary_1600", n_charts=1)
    pg.locator('[data-testid="stPlotlyChart"]').last.screenshot(path=str(OUT / "summary_change_vs_gain_1600.png"))

    _open(pg, f"{server}/samples?pair=Demo-Tiny&dataset=gsm8k&alpha=0.5&group=both_wrong", "This question's metrics")
    # the scored part is one highlighted span holding text and line breaks only: a blank line that
    # ended the HTML block put the rest into <p> blocks, which the span's background does not paint
    highlighted = pg.evaluate("""() => [...document.querySelectorAll('span')]
        .filter(s => getComputedStyle(s).backgroundColor === 'rgb(253, 235, 208)')
        .map(s => ({text: s.innerText, children: [...s.children].map(c => c.tagName)}))""")
    assert len(highlighted) == 2, highlighted
    for h in highlighted:
        assert "Tom starts with" in h["text"] and "After buying" in h["text"], h
        assert set(h["children"]) <= {"BR"}, h
    _check(pg, "samples_1600", n_charts=1)
    pg.locator('[data-testid="stMarkdownContainer"]').filter(has_text="T_cut=").first.screenshot(
        path=str(OUT / "samples_answer_1600.png"))
    pg.close()


def test_saving_a_pair_on_the_run_page(browser, tmp_path, monkeypatch):
    """The Run page's custom-pair form saves to the registry, the page moves to the new pair and
    says what it could not check (a hub id not downloaded here), with no Streamlit exception
    (setting the pair selectbox's state after it was drawn raised one, after the save)."""
    from urllib.parse import quote

    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("EAP_SHIPPED_RUNS", "off")
    with _streamlit(tmp_path / "cache", tmp_path) as url:
        page = _new_page(browser)
        try:
            _open(page, f"{url}/run?pair={quote('➕ custom pair…')}", "Save pair")
            page.get_by_label("Name").fill("mine")
            page.get_by_label("RL algorithm (label)").fill("GRPO")
            page.get_by_label("Base (SFT) model: hub id or folder").fill("demo/sft")
            page.get_by_label("Tuned model: hub id or folder").fill("nobody/not-downloaded")
            page.get_by_role("button", name="Save pair").click()
            page.get_by_text("Saved pair 'mine'.", exact=False).first.wait_for(timeout=30_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.get_by_text("Not checked yet: tuned 'nobody/not-downloaded', not downloaded here",
                                    exact=False).count() == 1
            assert "pair=mine" in page.url
            page.screenshot(path=str(OUT / "run_pair_saved.png"), full_page=False)
        finally:
            page.close()
    saved = json.loads((tmp_path / "registry.json").read_text())["pairs"]
    assert [(p["name"], p["base"]["name_or_path"], p["tuned"]["name_or_path"]) for p in saved] == [
        ("mine", "demo/sft", "nobody/not-downloaded")]
