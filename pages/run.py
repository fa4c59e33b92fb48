"""Run: choose a pair, a dataset and settings; see memory and cache state; launch, watch, cancel.

Every setting of a RunSpec has a widget here, so any spec the command line can run, the page can
too. `?from=<run key>` opens the page on that run's exact spec (same key); other URL parameters
(`group`, `alpha`, `gran`) then change those settings, e.g. the Correct vs incorrect page's link
to a missing group.
"""
import json
from pathlib import Path

import streamlit as st

from eapcore.views import query
from eapcore.specs import (GROUPS, AnswersSpec, AttributionSettings, DatasetSpec, GenerationSettings, ModelSpec,
                           PairSpec, QuickSettings, RunSpec, SelectionSettings, choices, spec_key, to_dict)
from pages.common import PAGES, all_runs, finished_runs, page_header, recent, show_table, url_select

page_header("Run an attribution",
            "Generate both models' answers, grade them, select and truncate the questions (paper Eq. 10-12), "
            "score every edge of both models with EAP and compute the metrics. Each stage is cached, so "
            "changing α reuses the answers. The run works in a separate process; this page only watches it.")

try:
    from eapcore.runs import memory, registry, workers
except ImportError as err:  # the pages still work on cached runs without them
    memory = registry = workers = None
    st.warning(f"The runner is not available in this installation ({err}); cached runs can still be browsed.")

pairs = {p.name: p for p in query.registered("pairs")}
datasets = {d.name: d for d in query.registered("datasets")}
for problem in query.registry_problems():  # the built-ins and the readable entries are listed anyway
    st.warning(problem, icon=":material/warning:")
NEW = "➕ custom pair…"
SOURCES = {"registered": "registered", "file": "file or URL", "upload": "upload",
           "joined": "joined answers file (import)"}
ALPHAS = ["0.03", "0.1", "0.3", "0.5", "1.0"]
G, S, A, Q = GenerationSettings(), SelectionSettings(), AttributionSettings(), QuickSettings()


def _source_key() -> str | None:
    """The run whose spec the page starts from: ?from=<key>, or, on a bare first visit (no pair in
    the URL, nothing prefilled in this session), the first screen's run when it is a featured pair's
    (the shipped SmolLM2 runs, made to run on a CPU), so that a new α or group for the pair on
    screen reuses its answers instead of generating anew."""
    key = st.query_params.get("from")
    if key or registry is None or "pair" in st.query_params or "prefilled_from" in st.session_state:
        return key
    return first_view["run"] if first_view.get("pair") in registry.FEATURED_PAIRS else None


def _from_run(key: str | None) -> RunSpec | None:
    """The spec of run `key` (None without one, or if it is unreadable)."""
    info = query.get_run(key) if key else None
    if key and (info is None or info.spec is None):
        st.warning(f"Run {key} is not in the cache ({query.cache_root()}) or its spec is unreadable; "
                   "the page starts from the defaults.")
    return None if info is None else info.spec


def _alpha_options() -> list[str]:
    """The usual α values, plus one the URL or a prefilled run asks for (as str(float))."""
    wanted = str(st.session_state.get("w_alpha") or st.query_params.get("alpha") or "")
    try:
        extra = [wanted] if wanted and wanted not in ALPHAS and 0 < float(wanted) < float("inf") else []
    except ValueError:
        extra = []
    return ALPHAS + extra


def _prefill(spec: RunSpec, key: str) -> None:
    """Set every widget to `spec` once per ?from= key (URL parameters group/alpha/gran override)."""
    ss = st.session_state
    pair = spec.pair.name if pairs.get(spec.pair.name) == spec.pair else f"{spec.pair.name} (as in run {key[:8]})"
    ss["from_pair"] = (pair, spec.pair)
    ss["w_pair"] = pair
    ds, registered = spec.dataset, datasets.get(spec.dataset.name)
    if spec.answers is not None:
        ss["w_dsrc"], ss["ds_path"], ss["ds_label"] = "joined", spec.answers.joined, ds.name
    elif registered is not None and (registered.source, registered.split) == (ds.source, ds.split):
        ss["w_dsrc"], ss["w_dataset"] = "registered", ds.name
    else:
        ss["w_dsrc"], ss["ds_path"], ss["ds_label"], ss["ds_split"] = "file", ds.source, ds.name, ds.split
    ss["w_alpha"] = st.query_params.get("alpha") or str(spec.selection.alpha)
    ss["w_group"] = st.query_params.get("group") or spec.selection.group
    ss["w_gran"] = st.query_params.get("gran") or spec.attribution.granularity
    g, s, a = spec.generation, spec.selection, spec.attribution
    ss.update(_settings(g, s, a, spec.quick))
    ss[f"run_limit_{ds.name}"] = ds.limit or 0
    ss["prefilled_from"] = key


def _settings(g: GenerationSettings, s: SelectionSettings, a: AttributionSettings, q: QuickSettings | None) -> dict:
    """The values of the keyed setting widgets for these settings (q None: not a quick run)."""
    return dict(run_max_new=g.max_new_tokens or 0, run_gen_bs=g.batch_size, run_backend=g.backend,
                run_gen_dtype=g.dtype, run_beta=s.beta, run_low=s.low, run_high=s.high, run_n=s.n,
                run_seed=s.seed, run_dtype=a.dtype, run_device=a.device, run_ig=a.ig_steps,
                run_mbt=a.max_batch_tokens, run_quick=q is not None, run_quick_seed=(q or Q).seed,
                run_quick_chunk=(q or Q).chunk)


first_view = query.default_view(finished_runs()) or {}  # the first screen's run (its URL parameters)
source_key = _source_key()
source_spec = _from_run(source_key)
if source_spec is not None and st.session_state.get("prefilled_from") != source_key:
    _prefill(source_spec, source_key)
for k, v in _settings(G, S, A, None).items():  # widgets start at the specs' defaults (the command line's)
    st.session_state.setdefault(k, v)
from_pair = st.session_state.get("from_pair")
if from_pair and from_pair[0] not in pairs:
    pairs = {**pairs, from_pair[0]: from_pair[1]}

# ---- pair ------------------------------------------------------------------------------------------
st.subheader("1. Model pair")
names = list(pairs) + [NEW]
# the pair the first screen shows (SmolLM2 once its shipped runs are cached), else a demo pair
default_pair = first_view["pair"] if first_view.get("pair") in pairs else \
    next((n for n in pairs if n.lower().startswith("demo")), names[0])
if "select_pair" in st.session_state:  # a pair just saved by the form below
    st.session_state["w_pair"] = st.session_state.pop("select_pair")
pair_name = url_select("Pair", names, "pair", default=default_pair,
                       format_func=lambda n: f"{n} ({pairs[n].algorithm})" if n != NEW and pairs[n].algorithm else n)
if pair_name == NEW:
    with st.form("new_pair"):
        st.caption("Two Hugging Face hub ids or local checkpoint folders of the same architecture. Saved in the "
                   "registry (registry.json) so it appears in every list (`python -m eapcore pairs add` does the same).")
        c1, c2 = st.columns(2)
        name = c1.text_input("Name", placeholder="my-sft-vs-grpo")
        algo = c2.text_input("RL algorithm (label)", placeholder="GRPO")
        base = c1.text_input("Base (SFT) model: hub id or folder", placeholder="org/model-sft or /models/sft")
        tuned = c2.text_input("Tuned model: hub id or folder", placeholder="org/model-rl or /models/rl")
        template = c1.text_input("Prompt template", value="deepseek-math",
                                 help="a template name (deepseek-math, mistral, qwen25-math-cot, chat) or a "
                                      "string containing {question}")
        max_new = c2.number_input("Max new tokens", 1, 65536, 1024)
        if st.form_submit_button("Save pair", type="primary"):
            try:
                saved = registry.add_pair(PairSpec(name.strip(), ModelSpec(base.strip()), ModelSpec(tuned.strip()),
                                                   template=template, max_new_tokens=int(max_new), algorithm=algo))
                st.session_state["select_pair"] = saved.name  # the selectbox takes it before it is drawn
                unchecked = registry.unchecked(saved)  # shown after the rerun (a message here would vanish)
                st.session_state["saved_pair"] = f"Saved pair {saved.name!r}." + (
                    f" Not checked yet: {', '.join(unchecked)}, not downloaded here; a run checks them when it "
                    "starts, after downloading them." if unchecked else "")
                st.rerun()
            except Exception as err:  # noqa: BLE001  (RegistryError and friends: show the message)
                st.error(str(err))
    st.stop()
pair = pairs[pair_name]
if "saved_pair" in st.session_state:
    st.success(st.session_state.pop("saved_pair"))
st.caption(" · ".join([f"base `{pair.base.name_or_path}` → tuned `{pair.tuned.name_or_path}`",
                        *([pair.algorithm] if pair.algorithm else []),
                        f"template `{pair.template}`", f"up to {pair.max_new_tokens} new tokens"]))

# why base and tuned cannot be compared (registry.check_pair on what is on this machine), re-checked each minute
pair_problem = recent(registry.check_pair, pair, key=pair, ttl=60, spinner="Checking the pair's models…",
                      errors=(registry.RegistryError,))[1] if registry is not None else None
if pair_problem:
    st.error(pair_problem)

# ---- dataset ---------------------------------------------------------------------------------------
st.subheader("2. Dataset")
source = url_select("Source", list(SOURCES), "dsrc", horizontal_radio=True, format_func=SOURCES.get)
dataset, answers = None, None
if source == "registered":
    ds_name = url_select("Dataset", list(datasets), "dataset",
                         default=first_view["dataset"] if pair_name == first_view.get("pair")
                         else "demo" if pair_name.lower().startswith("demo") else None)
    dataset = datasets.get(ds_name)
else:
    c1, c2, c3 = st.columns([2, 3, 1])
    ds_label = c1.text_input("Name for these questions", key="ds_label")
    split = "test"
    if source == "file":
        path = c2.text_input("Path of a .jsonl/.csv file (or a jsonl URL, a hub id)", key="ds_path",
                             help="harness format, or records with a question and an answer; used as it is, "
                                  "without registering it (as `python -m eapcore run --source FILE`)")
        st.session_state.setdefault("ds_split", DatasetSpec("").split)
        split = c3.text_input("Split (hub ids)", key="ds_split")
    elif source == "joined":
        path = c2.text_input("Path of a joined answers file (the authors' all_correct.jsonl)", key="ds_path",
                             help="both models' prompt and answer tokens per question; its rows are the "
                                  "questions of the answer group chosen below; nothing is generated "
                                  "(as `python -m eapcore run --joined FILE`)")
    else:
        up = c2.file_uploader("jsonl file", type=["jsonl", "json"], key="ds_upload")
        path = ""
        if up is not None:
            try:  # kept by content next to registry.json, outside the cache (registry.store_upload)
                path = str(registry.store_upload(up.name, up.getvalue()))
                st.caption(f"Stored as {path}")
            except registry.RegistryError as err:
                st.error(str(err))
    path = path.strip()
    if source == "joined" and path:
        answers, dataset = AnswersSpec(path), DatasetSpec(ds_label.strip() or Path(path).parent.name)
    elif source != "joined" and ds_label and path and st.button("Save dataset in the registry"):
        try:
            dataset = registry.add_dataset(DatasetSpec(ds_label.strip(), source=path, split=split))
            st.success(f"Saved dataset {dataset.name!r}.")
        except Exception as err:  # noqa: BLE001
            st.error(str(err))
    elif source != "joined" and ds_label and path:
        dataset = DatasetSpec(ds_label.strip(), source=registry.portable_path(path), split=split)
if dataset is None:
    st.info("Choose or define a dataset to continue.")
    st.stop()
st.session_state.setdefault(f"run_limit_{dataset.name}", int(dataset.limit or 0))
limit = st.number_input("Use only the first … problems (0: all)", 0, 1_000_000, key=f"run_limit_{dataset.name}",
                        help="a quick run on a subset; the limit is part of the run's key")
dataset = DatasetSpec(dataset.name, dataset.source, dataset.split, int(limit) or None)

# ---- settings --------------------------------------------------------------------------------------
st.subheader("3. Settings")
st.markdown("**Selection** (paper Eq. 10-12)")
c1, c2, c3, c4 = st.columns(4)
alpha = float(url_select("α (T_cut = ⌊α·T_ref⌋)", _alpha_options(), "alpha", default="0.5", container=c1))
group = url_select("Answer group", list(GROUPS), "group", container=c2, format_func=query.GROUP_LABELS.get)
n = c3.number_input("N questions", 0, 1_000_000, key="run_n", help="drawn at most; 0: every question that passes")
seed = c4.number_input("Seed", 0, 2**31 - 1, key="run_seed")
c1, c2, c3, _ = st.columns(4)
beta = c1.number_input("β (max relative length gap)", 0.0, 10.0, step=0.05, key="run_beta")
low = c2.number_input("low (mean length ≥ ⌊low·T_ref⌋)", 0.0, 10.0, step=0.05, key="run_low")
high = c3.number_input("high (mean length ≤ ⌊high·T_ref⌋)", 0.0, 100.0, step=0.05, key="run_high")
st.markdown("**Attribution**")
c1, c2, c3, c4, c5 = st.columns(5)
gran = url_select("Granularity", list(choices(AttributionSettings, "granularity")), "gran", container=c1,
                  help="layer: the paper's graph; head: one node per attention head (much larger)")
att_dtype = c2.selectbox("Attribution dtype", choices(AttributionSettings, "dtype"), key="run_dtype",
                         help="model weights and activations; scores always accumulate in float32")
device = c3.selectbox("Device", choices(AttributionSettings, "device"), key="run_device")
ig_steps = c4.number_input("EAP-IG steps (0: EAP)", 0, 1000, key="run_ig")
max_batch_tokens = c5.number_input("Max batch tokens (0: fit to memory)", 0, 10**9, key="run_mbt")
quick = None
if answers is None:
    st.markdown("**Generation**")
    c1, c2, c3 = st.columns([2, 1, 1])
    if c1.checkbox("Quick run: stop generating once N questions pass the selection", key="run_quick",
                   help="questions in a seeded random order, answered by both models in rounds, until N of them "
                        "pass the selection rules, with T_ref from the answers so far (README 'Quick runs'); "
                        "a quick run is a different run from the one on the whole dataset"):
        quick = QuickSettings(int(c2.number_input("Order seed", 0, 2**31 - 1, key="run_quick_seed")),
                              int(c3.number_input("Questions per round (0: automatic)", 0, 1_000_000,
                                                  key="run_quick_chunk")))
    c1, c2, c3, c4 = st.columns(4)
    max_new = c1.number_input(f"Max new tokens (0: the pair's, {pair.max_new_tokens})", 0, 1_000_000,
                              key="run_max_new")
    gen_bs = c2.number_input("Generation batch size", 0, 100_000, key="run_gen_bs")
    backend = c3.selectbox("Backend", choices(GenerationSettings, "backend"), key="run_backend")
    gen_dtype = c4.selectbox("Generation dtype", choices(GenerationSettings, "dtype"), key="run_gen_dtype")
    generation = GenerationSettings(int(max_new) or None, int(gen_bs), backend, gen_dtype)
else:
    generation = G  # imported answers: nothing is generated
    st.caption("Answers imported from the joined file: no generation settings.")

spec = RunSpec(pair=pair, dataset=dataset, generation=generation,
               selection=SelectionSettings(alpha, float(beta), float(low), float(high), int(n), int(seed), group),
               attribution=AttributionSettings(granularity=gran, dtype=att_dtype, device=device,
                                               ig_steps=int(ig_steps), max_batch_tokens=int(max_batch_tokens)),
               answers=answers, quick=quick)
key = spec_key(spec)
existing = query.get_run(key)

st.subheader("4. Check and launch")
c1, c2 = st.columns(2)
with c1:
    st.markdown(f"Run key `{key}`")
    with st.expander("This spec as JSON (for `python -m eapcore run --spec-json FILE`)"):
        st.code(json.dumps(to_dict(spec), indent=1), language="json")
    if existing is not None and existing.finished:
        st.success("Already cached: the pages show it at once.")
        st.page_link(PAGES["heatmaps"], label="Open its heatmaps", icon=":material/grid_on:",
                     query_params={"pair": existing.pair, "dataset": existing.dataset, "alpha": str(existing.alpha),
                                   "group": existing.group, "gran": existing.granularity, "run": key})
    elif existing is not None:
        st.info(f"In the cache but not finished (stage: {existing.stage}); starting it again resumes it.")
    else:
        st.caption("Not cached yet.")


def _configs_local(spec: RunSpec) -> bool:
    """Both models' configs are on this machine (folder or Hugging Face cache): no hub traffic."""
    for m in (spec.pair.base, spec.pair.tuned):
        path = Path(registry.resolve_path(m.name_or_path))
        if (path / "config.json").is_file():
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(m.name_or_path, "config.json", revision=m.revision), str):
                return False
        except Exception:  # noqa: BLE001  (not a hub id)
            return False
    return True


with c2:
    if workers is not None and not _configs_local(spec) and not st.session_state.get(f"mem_{key}"):
        st.caption("The model configs are not on this machine yet: predicting memory fetches them from the hub.")
        if st.button("Predict GPU memory"):
            st.session_state[f"mem_{key}"] = True
            st.rerun()
    elif workers is not None:
        # any error (no config offline, unknown architecture, …) is shown, not raised
        mem, error = recent(memory.predict_memory, spec, key=key, ttl=600,
                            spinner="Predicting memory from the model configs…")
        if error:
            st.warning(f"Memory prediction unavailable: {error}")
        else:
            st.metric(f"Predicted memory ({mem['device']})", f"{mem['bytes_needed'] / 1e9:.2f} GB",
                      delta=f"{mem['bytes_available'] / 1e9:.1f} GB free", delta_color="off")
            (st.success if mem["fits"] else st.error)(mem["message"])


if existing is not None and existing.quick:
    st.caption(f"Quick run: {query.quick_summary(existing.quick)}.")
if existing is not None and existing.clock:
    st.markdown("**Run clock**: each stage's wall time over all executions of this run, and where it ran")
    show_table(query.clock_frame(existing), f"clock_{key}", f"clock_{key}", index=False)


def _start(spec: RunSpec) -> None:
    """on_click of Start: callbacks run before the script, so a rerun early in the script (the
    first-run navigation rerun in page_header) cannot swallow the click."""
    try:
        st.session_state["active_run"] = workers.start(spec)
        st.query_params["watch"] = st.session_state["active_run"]
    except Exception as err:  # noqa: BLE001
        st.session_state["start_error"] = f"Could not start: {err}"


if workers is not None:
    st.button("▶ Start run", type="primary", on_click=_start, args=(spec,),
              disabled=bool(existing and existing.finished) or bool(pair_problem) or bool(query.cache_problem()))
    if st.session_state.get("start_error"):
        st.error(st.session_state.pop("start_error"))

active = st.session_state.get("active_run") or st.query_params.get("watch")
if active and not query.is_run_key(active):
    st.warning(f"The link's watch={active[:40]!r} is not a run key (16 hexadecimal digits), so it was ignored.",
               icon=":material/link_off:")
    active = None
elif active and workers is not None and not workers.status(active) and not st.session_state.get("active_run"):
    st.warning(f"The link's watch={active!r} names no run in this cache ({query.cache_root()}), so it was ignored.",
               icon=":material/link_off:")
    active = None


def _cancel(key: str) -> None:
    """on_click of Cancel (a callback, for the same reason as _start)."""
    st.session_state[f"cancel_requested_{key}"] = workers.cancel(key)


@st.fragment(run_every=1.0)
def progress(key: str) -> None:
    s = workers.status(key)
    if not s:
        st.caption(f"Run {key}: no status yet.")
        return
    stage, done, total = s.get("stage", "?"), s.get("done") or 0, s.get("total") or 0
    frac = min(1.0, done / total) if total else 0.0
    speed = query.progress_text(s.get("tokens_per_s"), s.get("eta_s")).replace(", ", " · ")
    mem = f" · GPU {s['gpu_mem_gb']:.1f} GB" if s.get("gpu_mem_gb") else ""
    cached = f" ({s['cached']} from cache)" if s.get("cached") else ""  # not skipped: already computed
    st.progress(frac, text=f"Run `{key}` · stage **{stage}** · {done}/{total}{cached}"
                          f"{' · ' + speed if speed else ''}{mem}")
    st.caption(s.get("message") or "")
    clock = [(name, c) for name in workers.STAGES for c in [(s.get("clock") or {}).get(name)] if c]
    if clock:
        st.caption("Stage clock: " + " · ".join(
            f"{name} {'running' if c['seconds'] is None else query.format_duration(c['seconds'])} on {c['device']}"
            for name, c in clock))
    if stage in workers.FINAL and stage != st.session_state.get(f"page_stage_{key}"):
        st.rerun(scope="app")  # the run just ended: the whole page (its notes, past runs) shows it too
    if stage == "error":
        st.error(s.get("error") or s.get("message") or "failed")
    if stage == "done":
        st.success("Finished.")
        st.page_link(PAGES["heatmaps"], label="Open the heatmaps", icon=":material/grid_on:", query_params={"run": key})
    if s.get("running"):
        st.button("■ Cancel", key=f"cancel_{key}", on_click=_cancel, args=(key,))
    if st.session_state.pop(f"cancel_requested_{key}", False):
        st.warning("Cancel requested: the worker keeps finished samples and stops after the current batch.")


if active and workers is not None:
    st.subheader("Progress")
    st.session_state[f"page_stage_{active}"] = (workers.status(active) or {}).get("stage")
    progress(active)

st.subheader("Past runs")
runs = all_runs()
if runs:
    frame = query.runs_frame(runs)
    frame["group"] = frame["group"].map(lambda g: query.GROUP_LABELS.get(g, g))
    show_table(frame, "past_runs", "past_runs", index=False)
else:
    st.caption("No runs in the cache yet.")
