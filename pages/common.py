"""Shared page helpers: URL-backed pickers, the dashboard's one memo layer, export buttons.

Not a page itself (app.py lists the pages with st.navigation). Caching happens here only
(tests/test_pages.py checks that no other page file uses st.cache_data or st.cache_resource):
loaded runs in st.cache_resource (one shared copy, read-only arrays, at most RUNS_IN_MEMORY); the
tables and figures eapcore.views derives from loaded runs or from the run list in st.cache_data
(`cached`, `cached_over_runs`, `cached_figure`, `map_view`), keyed by each run's key and file
signature (mtimes and sizes), so a rewritten run is never served stale; checks of what lies
outside the cache (model files, configs) in st.cache_data for a time to live (`recent`); the
run list re-read at most every 2 s. These caches are bounded (max_entries).
"""
from __future__ import annotations

import contextlib
import importlib
import re
import time
from typing import Any, Callable, Sequence

import pandas as pd
import streamlit as st

from eapcore.views import figures, maps, query

# The page list: navigation section -> (name, title, icon); page `name` is the file pages/<name>.py at
# the URL path /<name>; the first page is the default. app.py builds st.navigation from it.
NAVIGATION: dict[str, list[tuple[str, str, str]]] = {
    "Overview": [("home", "Home", ":material/home:"), ("run", "Run", ":material/play_arrow:")],
    "One run": [("heatmaps", "Heatmaps", ":material/grid_on:"),
                ("distributions", "Distributions", ":material/bar_chart:"),
                ("groups", "Correct vs incorrect", ":material/balance:"),
                ("samples", "Samples", ":material/search:")],
    "Across runs": [("summary", "Summary", ":material/table_chart:"),
                    ("compare", "Compare two runs", ":material/compare_arrows:")],
}
PAGES = {name: f"pages/{name}.py" for section in NAVIGATION.values() for name, _, _ in section}
CACHE_ENTRIES = 64
RUNS_IN_MEMORY = 4


# ---- URL-backed state -----------------------------------------------------------------------------

def url_select(label: str, options: Sequence[Any], param: str, *, default: Any = None,
               format_func: Callable[[Any], str] = str, container: Any = None, help: str | None = None,
               horizontal_radio: bool = False) -> Any:
    """A selectbox (or horizontal radio) whose value lives in the URL query string as `param`.

    Start value: the URL's, else the last value chosen on any page (session), else `default`,
    else the first option. Options are matched as strings, so the URL can hold them; a link's
    value that is none of them is ignored with a visible note saying so."""
    container = container or st
    options = list(options)
    if not options:
        return None
    as_str = [str(o) for o in options]
    wkey, skey = f"w_{param}", f"s_{param}"
    url = st.query_params.get(param)
    if wkey in st.session_state and str(st.session_state[wkey]) not in as_str:
        del st.session_state[wkey]  # the options changed under it
    if wkey not in st.session_state and url is not None and url not in as_str and url != st.session_state.get(skey):
        shown = url if len(url) <= 60 else url[:60] + "…"
        st.warning(f"The link's {param}={shown!r} is not one of the choices for “{label}”, so it was ignored.",
                   icon=":material/link_off:")
    if wkey not in st.session_state:
        for cand in (url, st.session_state.get(skey), None if default is None else str(default)):
            if cand is not None and cand in as_str:
                st.session_state[wkey] = options[as_str.index(cand)]
                break
        else:
            st.session_state[wkey] = options[0]
    widget = container.radio if horizontal_radio else container.selectbox
    kw = {"horizontal": True} if horizontal_radio else {}
    value = widget(label, options, key=wkey, format_func=format_func, help=help, **kw)
    st.session_state[skey] = str(value)
    st.query_params[param] = str(value)
    return value


def _ensure_navigation() -> None:
    """Route through app.py's st.navigation even on a deep link to a fresh server.

    Streamlit treats a `pages/` folder next to the entry script as a v1 multipage app until the
    entry script has called st.navigation once in this process; a first request for /heatmaps
    would run pages/heatmaps.py alone (no page config, a raw file list as navigation). Turning
    that mode off and rerunning makes app.py route the same URL path.

    The one place that touches Streamlit internals (`PagesManager.uses_pages_directory`): the
    pinned Streamlit (1.67) has no public switch for it (its advice is to not name the folder
    pages/, which is this project's layout of record). tests/test_browser.py
    (`test_deep_link_to_a_fresh_server_is_routed_by_app_py`) checks it against that version."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover  (internal API moved: nothing to fix then)
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def page_header(title: str, caption: str) -> None:
    """The page's title and caption, and a warning when the cache cannot be written to."""
    _ensure_navigation()
    st.title(title)
    st.caption(caption)
    problem = query.cache_problem()
    if problem:
        st.warning(problem, icon=":material/lock:")


# ---- runs -------------------------------------------------------------------------------------------

@st.cache_data(ttl=2, max_entries=4, show_spinner=False)
def _runs(root: str) -> list[query.RunInfo]:
    return query.list_runs(root)


def all_runs() -> list[query.RunInfo]:
    """Every run folder in the cache (re-listed at most every 2 s)."""
    return _runs(str(query.cache_root()))


def finished_runs() -> list[query.RunInfo]:
    return [r for r in all_runs() if r.finished]


OFFLINE_START = ("The runs of the SmolLM2 and demo pairs ship with the project: `python -m eapcore import "
                 "demo/smollm2/runs.zip demo/runs.zip`, run in the project folder, puts them in the "
                 "cache (the dashboard does it by itself when the cache holds no run). Or start a run on the "
                 "Run page: the demo pair (`demo: SFT vs GRPO` on `demo`) runs here with no network and no GPU "
                 "(about a minute on a CPU).")


def no_runs_message(what: str = "this view") -> None:
    st.info(f"No finished runs in the cache yet ({query.cache_root()}), so there is nothing to show in "
            f"{what}. {OFFLINE_START}")
    st.page_link(PAGES["run"], label="Go to the Run page", icon=":material/play_arrow:",
                 query_params={"pair": "demo: SFT vs GRPO", "dataset": "demo"})


@st.cache_resource(show_spinner="Importing the runs shipped in demo/smollm2/runs.zip and demo/runs.zip…")
def _shipped_runs(root: str) -> dict | None:
    from eapcore.runs import shipped

    return shipped.import_if_empty()


def import_shipped_runs() -> None:
    """The dashboard's start: once per server and cache folder, import the shipped runs (SmolLM2
    and demo pairs) into a cache that has no run (eapcore.runs.shipped); the session that did it
    shows a note."""
    try:
        done = _shipped_runs(str(query.cache_root()))
    except Exception as err:  # noqa: BLE001  (a damaged bundle must not stop the dashboard)
        st.warning(f"Could not import the shipped runs: {err}")
        return
    if done and not done.get("announced"):  # the first session after the import says so
        done["announced"] = True
        st.toast(f"The cache had no runs: imported the {done['runs']} runs shipped in "
                 f"{' and '.join(done['bundles'])} into {query.cache_root()}.", icon=":material/inventory_2:")


def run_picker(runs: list[query.RunInfo] | None = None, *, pick_group: bool = True) -> query.RunInfo | None:
    """Sidebar cascade pair -> dataset -> alpha -> group -> granularity (-> run if several match),
    each choice in the URL. Returns the chosen finished run, or None (message shown)."""
    runs = finished_runs() if runs is None else runs
    if not runs:
        return None
    finished = runs
    sb = st.sidebar
    sb.markdown("**Run**")
    pair = url_select("Model pair", sorted({r.pair for r in runs}), "pair", container=sb)
    runs = [r for r in runs if r.pair == pair]
    dataset = url_select("Dataset", sorted({r.dataset for r in runs}), "dataset", container=sb)
    runs = [r for r in runs if r.dataset == dataset]
    alpha = url_select("α (truncation: T_cut = α·T_ref)", sorted({r.alpha for r in runs}), "alpha",
                       default=0.5, container=sb, format_func=lambda a: f"{a:g}")
    runs = [r for r in runs if r.alpha == alpha]
    if pick_group:
        present = [g for g in query.GROUPS if g in {r.group for r in runs}]
        group = url_select("Answer group", present, "group", default="both_correct", container=sb,
                           format_func=lambda g: query.GROUP_LABELS.get(g, g))
        runs = [r for r in runs if r.group == group]
    gran = url_select("Granularity", sorted({r.granularity for r in runs}, key=["layer", "head"].index)
                      if all(r.granularity in ("layer", "head") for r in runs) else sorted({r.granularity for r in runs}),
                      "gran", default="layer", container=sb)
    runs = [r for r in runs if r.granularity == gran]
    if len(runs) > 1:
        by_key = {r.key: r for r in runs}
        key = url_select("Run (several match)", list(by_key), "run", container=sb,
                         format_func=lambda k: f"{k[:8]} · n={by_key[k].n_used}")
        chosen = by_key[key]
    else:
        chosen = runs[0]
        st.query_params["run"] = chosen.key
    sb.caption(f"run key `{chosen.key}` · {chosen.spec_dict.get('pair', {}).get('algorithm', '')}")
    sb.page_link(PAGES["run"], label="Open in the Run page", icon=":material/play_arrow:",
                 query_params=run_page_params(chosen.key), help="the Run page with this run's exact settings")
    family_links(chosen, finished)
    return chosen


def family_links(info: query.RunInfo, runs: list[query.RunInfo], container: Any = None) -> None:
    """Links to the Compare page: run `info` against each run of another pair of its family (or of
    its base model, query.kin) on the same settings (query.family_comparisons), at the side where
    the two pairs' models differ."""
    siblings = query.family_comparisons(info, runs)
    if siblings.empty:
        return
    container = container or st.sidebar
    kind, name = query.kin(info)
    container.markdown(f"**{kind.capitalize()}: {name}**")
    for row in siblings.itertuples():
        container.page_link(PAGES["compare"], label=f"Compare with {row.pair} ({row.side} models)",
                            icon=":material/compare_arrows:", query_params={"a": info.key, "b": row.key, "side": row.side},
                            help=f"this run (A) against {row.pair} (B) on the same settings; shared: {row.shared}")


def run_page_params(key: str, **overrides: str) -> dict[str, str]:
    """Query parameters that open the Run page on run `key`'s exact spec (`from`), with some
    settings changed (`overrides`, e.g. group="both_wrong")."""
    return {"from": key, **overrides}


def run_caption(data: query.RunData) -> str:
    """The run's settings (bold line), then what its pair is: models, algorithm, notes, accuracy."""
    info, pair = data.info, query.pair_context(data)
    accuracy = (f" · accuracy on the {pair['n_graded']} questions of {info.dataset}: base "
                f"{pair['base_accuracy']:.1f}% → tuned {pair['tuned_accuracy']:.1f}%" if pair["n_graded"] else "")
    notes = f" ({pair['notes']})" if pair["notes"] else ""
    return (f"**{info.pair}** on **{info.dataset}** · α = {info.alpha:g} (T_cut = {data.t_cut} answer tokens) · "
            f"group: {query.GROUP_LABELS.get(info.group, info.group)} · {info.granularity} graph "
            f"({len(data.base.graph['forward'])} sources × {len(data.base.graph['backward'])} destinations, "
            f"{int(data.mask.sum())} real edges) · n = {len(data.sample_ids)} questions  \n"
            f"base `{pair['base']}` → tuned `{pair['tuned']}`, {pair['algorithm'] or 'tuned'}{notes}{accuracy}")


@st.cache_resource(max_entries=RUNS_IN_MEMORY, show_spinner=False)
def _loaded(root: str, key: str, signature: tuple) -> query.RunData:
    return query.load_run(key, root)


def loaded_run(key: str, signature: tuple) -> query.RunData:
    """Run `key` as loaded for its file signature: one copy shared by every page and session."""
    return _loaded(str(query.cache_root()), key, signature)


def load(info: query.RunInfo) -> query.RunData | None:
    try:
        return loaded_run(info.key, info.signature)
    except (query.RunNotReady, OSError, ValueError, KeyError) as err:
        st.error(f"Run {info.key} cannot be read: {err}")
        return None


def open_run(what: str) -> query.RunData:
    """The page's run: sidebar picker, then load; stops the page with a message if there is none."""
    info = run_picker()
    if info is None:
        no_runs_message(what)
        st.stop()
    data = load(info)
    if data is None:
        st.stop()
    st.markdown(run_caption(data))
    return data


# ---- bounded caches over eapcore (keyed by run key + file signature, or by time) -----------------------

def _qualified(fn: Callable[..., Any], package: str) -> str:
    """"module:name" of `fn`, a module-level function of `package` (the caches below call it by name)."""
    module = getattr(fn, "__module__", "")
    if not module.startswith(package) or getattr(importlib.import_module(module), fn.__name__, None) is not fn:
        raise ValueError(f"pages.common caches functions of {package.rstrip('.')} only, not {fn!r}")
    return f"{module}:{fn.__name__}"


def _function(name: str) -> Callable[..., Any]:
    module, func = name.split(":")
    return getattr(importlib.import_module(module), func)


def _run_keys(infos: Sequence[query.RunInfo]) -> tuple[tuple[str, tuple], ...]:
    return tuple((i.key, i.signature) for i in infos)


def _spinning(text: str | None) -> Any:
    """st.spinner(text) (shown only if the call inside takes over half a second: a cache miss), or nothing."""
    return st.spinner(text) if text else contextlib.nullcontext()


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _cached_call(name: str, root: str, runs: tuple, _listed: list | None, *args: Any) -> Any:
    """The views function `name` of the loaded runs `runs` ((key, signature) each), then *args; or,
    given `_listed` (the RunInfo list that `runs` identifies), `name(_listed, *args)`."""
    inputs = [_listed] if _listed is not None else [_loaded(root, key, signature) for key, signature in runs]
    return _function(name)(*inputs, *args)


def cached(fn: Callable[..., Any], n_runs: int = 1, spinner: str | None = None) -> Callable[..., Any]:
    """`fn(data, *args)` of an eapcore.views module (`fn(data_a, data_b, *args)` with n_runs=2) as a
    bounded st.cache_data call keyed by (function, cache root, each run's key and file signature,
    *args); the wrapper takes RunInfo objects in place of the loaded runs. `spinner`: text shown
    while it computes."""
    name = _qualified(fn, "eapcore.views.")

    def call(*infos_and_args: Any) -> Any:
        infos, args = infos_and_args[:n_runs], infos_and_args[n_runs:]
        with _spinning(spinner):
            return _cached_call(name, str(query.cache_root()), _run_keys(infos), None, *args)

    return call


def cached_over_runs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(runs, *args)` of an eapcore.views module over a list of RunInfo (Summary's tables, the
    comparable runs), cached as `cached` does, keyed by (function, cache root, every listed run's
    key and file signature in order, *args): a new, removed or rewritten run gives a fresh call."""
    name = _qualified(fn, "eapcore.views.")

    def call(runs: Sequence[query.RunInfo], *args: Any) -> Any:
        return _cached_call(name, str(query.cache_root()), _run_keys(runs), list(runs), *args)

    return call


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _cached_figure(figure: str, name: str, root: str, runs: tuple, args: tuple, figure_args: tuple,
                   options: tuple) -> Any:
    return _function(figure)(_cached_call(name, root, runs, None, *args), *figure_args, **dict(options))


def cached_figure(figure_fn: Callable[..., Any], fn: Callable[..., Any], infos: Sequence[query.RunInfo],
                  args: tuple, *figure_args: Any, **options: Any) -> Any:
    """`figure_fn(fn(*loaded runs, *args), *figure_args, **options)`, both of eapcore.views, cached
    under `cached`'s key of the view plus the figure's name and arguments."""
    return _cached_figure(_qualified(figure_fn, "eapcore.views."), _qualified(fn, "eapcore.views."),
                          str(query.cache_root()), _run_keys(infos), args, figure_args, tuple(sorted(options.items())))


@st.cache_data(max_entries=CACHE_ENTRIES, show_spinner=False)
def _recent_call(name: str, key: Any, window: int, _arg: Any, errors: tuple) -> tuple[Any, str | None]:
    """(`name(_arg)`, None), or (None, message) for an error of `errors`; `key` identifies `_arg`."""
    try:
        return _function(name)(_arg), None
    except errors as err:
        return None, str(err)


def recent(fn: Callable[[Any], Any], arg: Any, *, key: Any, ttl: int, spinner: str,
           errors: tuple[type[Exception], ...] = (Exception,)) -> tuple[Any, str | None]:
    """`fn(arg)` of eapcore (a check of what lies outside the run cache: model files, configs, the
    hub) as (its result, None), or (None, the message) if it raised one of `errors`; reused per
    (function, `key`) for at most `ttl` seconds (the clock's current ttl-long window is part of the
    key), so a changed file is seen within `ttl`. `spinner`: text shown while it computes."""
    with _spinning(spinner):
        return _recent_call(_qualified(fn, "eapcore."), key, int(time.time() // ttl), arg, errors)


# ---- relative-change maps (Heatmaps and Compare pages) ---------------------------------------------

FDR_LEVELS = ["0.01", "0.05", "0.1", "0.2", "off"]
MAP_VIEWS = {"dst": "Destination layer × module (q, k, v, MLP, logits)",
             "src": "Source layer × module (input, attention, MLP)",
             "layers": "Source layer × destination layer (one module type)",
             "heads": "Layer × head (head granularity)",
             "full": "Full matrix: source node × destination node"}
HEAD_KINDS = {"source": "as sources", "q": "query inputs", "k": "key inputs (per kv head)",
              "v": "value inputs (per kv head)"}


def map_controls(granularity: str) -> tuple[str, str, float | None, bool]:
    """Aggregation, its module / head kind, FDR level (None: off) and log colour, each in the URL
    (view, kind, fdr, scale). The head view is offered at head granularity only."""
    views = [v for v in MAP_VIEWS if v != "heads" or granularity == "head"]
    view = url_select("Aggregation", views, "view", format_func=MAP_VIEWS.get, default="dst")
    c1, c2, c3 = st.columns([2, 1, 1])
    level = url_select("False discovery rate (colour a change only where q ≤ this)", FDR_LEVELS, "fdr",
                       default="0.05", container=c1, horizontal_radio=True,
                       format_func=lambda v: "off: colour every cell" if v == "off" else v,
                       help="Benjamini-Hochberg over the cells of the map; expected share of false discoveries "
                            "among the coloured cells at most this level")
    # log by default: mean |s| spans orders of magnitude across layers (a real model's first MLP
    # outweighs the rest), so a linear scale leaves most cells one colour
    log_color = url_select("Colour scale of the two sides", ["log", "linear"], "scale", container=c2,
                           horizontal_radio=True, default="log") == "log"
    kind = ""
    if view == "layers":
        kind = url_select("Destination module", list(maps.KINDS["layers"]), "kind", container=c3, default="mlp",
                          format_func=lambda k: figures.TYPE_LABELS.get(k, k))
    elif view == "heads":
        kind = url_select("Heads", list(maps.KINDS["heads"]), "kind", container=c3, format_func=HEAD_KINDS.get)
    return view, kind, None if level == "off" else float(level), log_color


def map_view(fn: Callable[..., Any], infos: Sequence[query.RunInfo], args: tuple, n_layers: int,
             **options: Any) -> tuple[dict[str, Any], Any]:
    """A map of eapcore.views (`fn(*loaded runs, *args)`, cached as `cached` does) and its figure
    (figures.map_view_figure(grids, n_layers, **options), cached as `cached_figure` does)."""
    grids = cached(fn, len(infos))(*infos, *args)
    return grids, cached_figure(figures.map_view_figure, fn, infos, args, n_layers, **options)


def map_summary(grids: dict[str, Any], level: float | None) -> str:
    """One line under a map: how many cells pass, the noise floor's count, the test and its limits."""
    meta = grids["meta"]
    n_cells = int(grids["relative_change"].notna().sum().sum())
    if meta["paired"]:
        test = (f"Wilcoxon signed-rank per cell, paired over n = {meta['n_a']} questions "
                f"(exact p for {meta['exact_share']:.0%} of cells)")
    else:
        test = f"Mann-Whitney U per cell, unpaired: {meta['n_a']} vs {meta['n_b']} questions (normal approximation)"
    if level is None:
        return f"{test}. FDR control off: every cell is coloured, whatever its q-value."
    n_pass = int(maps.passing(grids, level).sum().sum())
    n_noise = int(maps.passing(grids, level, noise=True).sum().sum())
    text = (f"**{n_pass} of {n_cells}** cells pass at FDR {level:g} (noise floor: {n_noise}). {test}; "
            "Benjamini-Hochberg over the map's cells.")
    if meta["best_q"] > level:
        text += (f" :orange[With n = {meta['n_a']} questions the smallest possible p is {meta['smallest_p']:.2g}, so "
                 f"among {meta['n_cells']:,} cells no q-value can reach {level:g}: choose a coarser view, a higher "
                 "level, or a run with more questions.]")
    return text


# ---- output helpers -----------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "figure"


def show_figure(fig: Any, name: str, key: str) -> None:
    """The chart, then PNG and SVG download buttons (rendered by kaleido only when clicked)."""
    st.plotly_chart(fig, key=f"chart_{key}", config={"displaylogo": False})
    row = st.container(horizontal=True)  # buttons at their own width: never cut in a narrow column
    for fmt, mime in (("png", "image/png"), ("svg", "image/svg+xml")):
        row.download_button(f"⬇ {fmt.upper()}", data=lambda f=fmt, fig=fig: figures.figure_image(fig, f),
                            file_name=f"{slug(name)}.{fmt}", mime=mime, key=f"dl_{fmt}_{key}",
                            on_click="ignore", help=f"Download this figure as {fmt.upper()} (rendered server-side)")


def show_table(df: pd.DataFrame, name: str, key: str, *, styler: Any = None, caption: str = "",
               index: bool = True, column_config: dict | None = None, height: Any = "auto") -> None:
    """A table (styled if `styler`), then CSV and LaTeX download buttons."""
    st.dataframe(styler if styler is not None else df, hide_index=not index, column_config=column_config,
                 key=f"table_{key}", height=height)
    row = st.container(horizontal=True)
    row.download_button("⬇ CSV", data=figures.to_csv_bytes(df, index=index), file_name=f"{slug(name)}.csv",
                        mime="text/csv", key=f"dl_csv_{key}", on_click="ignore")
    row.download_button("⬇ LaTeX", data=lambda: figures.to_latex(styler if styler is not None else df,
                                                                 caption=caption or name),
                        file_name=f"{slug(name)}.tex", mime="text/x-tex", key=f"dl_tex_{key}", on_click="ignore")
