"""Home: what the tool shows, the pairs and datasets known, the cached runs, one click into a view."""
import pandas as pd
import streamlit as st

from eapcore.views import query
from pages.common import OFFLINE_START, PAGES, all_runs, page_header, show_table

page_header("RL circuit diff: how RL fine-tuning rewires a language model",
            "Edge Attribution Patching (EAP) of a base (SFT) model and its RL-tuned version on the same "
            "questions, after Zhang et al., arXiv 2509.21044.")
st.markdown(
    "Each run scores every edge of the model's computational graph (embedding, attention and MLP "
    "outputs into the q/k/v inputs, MLP inputs and logits) by how much removing it would change the loss "
    "on the model's own answer. The pages compare the base and tuned models edge by edge (**Heatmaps**), "
    "question by question (**Distributions**, **Samples**) and by answer correctness (**Correct vs "
    "incorrect**), through the paper's three metrics: activation intensity, information complexity "
    "and distribution kurtosis. **Summary** lays them out per metric across pairs, datasets and "
    "truncation α, next to each pair's accuracy gain.")

runs = all_runs()
finished = [r for r in runs if r.finished]
pairs, datasets = query.registered("pairs"), query.registered("datasets")
for problem in query.registry_problems():  # the built-ins and the readable entries are listed anyway
    st.warning(problem, icon=":material/warning:")

c1, c2, c3, c4 = st.columns(4)
c1.metric("Model pairs registered", len(pairs) or len({r.pair for r in runs}))
c2.metric("Datasets registered", len(datasets) or len({r.dataset for r in runs}))
c3.metric("Finished runs cached", len(finished))
c4.metric("Runs in progress / failed", len(runs) - len(finished))

st.subheader("Start here")
view = query.default_view(finished)
if view:
    st.page_link(PAGES["heatmaps"], label=f"Open the default view: {view['pair']} on {view['dataset']}, "
                                          f"α = {float(view['alpha']):g} (layer × module heatmaps)",
                 icon=":material/grid_on:", query_params=view)
    st.page_link(PAGES["summary"], label="Table 1: every cached pair × dataset × α, one table per metric", icon=":material/table_chart:")
else:
    st.info(f"No finished runs in the cache yet ({query.cache_root()}). {OFFLINE_START}")
    st.page_link(PAGES["run"], label="Go to the Run page", icon=":material/play_arrow:",
                 query_params={"pair": "demo: SFT vs GRPO", "dataset": "demo"})

st.subheader("Cached runs")
if runs:
    frame = query.runs_frame(runs)
    frame["group"] = frame["group"].map(lambda g: query.GROUP_LABELS.get(g, g))
    show_table(frame, "cached_runs", "runs", index=False,
               caption="Runs in the cache, most recent first")
    st.caption(f"{len(runs)} run folders under {query.cache_root() / 'runs'}; stage `done` means scores and "
               "metrics are available to every page.")
else:
    st.caption("None yet.")

left, right = st.columns(2)
with left:
    st.subheader("Model pairs")
    if pairs:
        counts = pd.Series([r.pair for r in finished]).value_counts() if finished else pd.Series(dtype=int)
        df = pd.DataFrame([{"pair": p.name, "base": p.base.name_or_path, "tuned": p.tuned.name_or_path,
                            "algorithm": p.algorithm, "architecture": getattr(p, "architecture", ""),
                            "family": getattr(p, "family", ""), "cached runs": int(counts.get(p.name, 0))}
                           for p in pairs])
        show_table(df, "model_pairs", "pairs", index=False)
    else:
        st.caption("The registry is not available; pairs seen in cached runs: "
                   + ", ".join(sorted({r.pair for r in runs}) or ["none"]))
with right:
    st.subheader("Datasets")
    if datasets:
        df = pd.DataFrame([{"dataset": d.name, "source": d.source or "(built in, by name)", "split": d.split,
                            "limit": d.limit} for d in datasets])
        show_table(df, "datasets", "datasets", index=False)
    else:
        st.caption("Datasets seen in cached runs: " + ", ".join(sorted({r.dataset for r in runs}) or ["none"]))
