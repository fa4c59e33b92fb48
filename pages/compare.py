"""Compare two runs: one model side of two runs that share a graph, edge by edge, with tests."""
import streamlit as st

from eapcore.views import compare, maps, query
from pages.common import (cached_over_runs, finished_runs, load, map_controls, map_summary, map_view, no_runs_message,
                          page_header, show_figure, show_table, url_select)

page_header("Compare two runs",
            "The quick what-if: the tuned (or base) model of run B against the same model of run A, edge by edge, "
            "for any two runs on one graph: GRPO vs DPO from the same SFT model, α 0.1 vs 0.5, one dataset vs "
            "another. Same tests as the Heatmaps page; also on the command line: "
            "`python -m eapcore compare KEY_A KEY_B [--side tuned] [--json|--csv]`.")

runs = finished_runs()
if len(runs) < 2:
    no_runs_message("a comparison of two runs")
    st.stop()

by_key = {r.key: r for r in runs}
partners = cached_over_runs(compare.comparable)(runs)  # run key -> keys of the other runs on the same graph
if not partners:
    st.info("No two finished runs share a graph: runs are compared edge by edge, so both need the same nodes "
            "(one model architecture at one granularity).")
    st.stop()
sb = st.sidebar
sb.markdown("**Runs**")
first = (query.default_view(runs) or {}).get("run")  # the first screen's run: its family sibling becomes B
a_key = url_select("Run A (the reference)", list(partners), "a", container=sb, format_func=lambda k: by_key[k].label,
                   default=first if first in partners else None)
family = query.family_comparisons(by_key[a_key], runs).set_index("key")  # A's kin's other pairs, listed first
family = family[family.index.isin(partners[a_key])]
others = list(family.index) + [k for k in partners[a_key] if k not in family.index]
b_key = url_select("Run B (compared with A)", others, "b", container=sb,
                   format_func=lambda k: by_key[k].label + (" · same family" if k in family.index else ""))
side = url_select("Model of each run", list(compare.SIDES), "side", container=sb,
                  format_func=lambda s: f"{s} model", horizontal_radio=True)
info_a, info_b = by_key[a_key], by_key[b_key]
data_a = load(info_a)
if data_a is None or load(info_b) is None:
    st.stop()

st.markdown(f"**A** · {info_a.label}  \n**B** · {info_b.label}")
if b_key in family.index:
    sib = family.loc[b_key]
    st.info("A and B are pairs of one {} ({}) with the same settings: B ".format(*query.kin(info_a)) +
            f"({sib['pair']}, {sib['algorithm']}) shares a model with A ({sib['shared']}), so their {sib['side']} "
            "models are the ones to compare" + ("." if side == sib["side"] else f"; the {side} models are shown."))
view, kind, level, log_color = map_controls(info_a.granularity)
grids, fig = map_view(compare.compare_map, [info_a, info_b], (side, view, kind), data_a.graph.n_layers,
                      names=(f"Run A: {side} model", f"Run B: {side} model"), change_name="Relative change (B vs A)",
                      level=level, log_color=log_color)
meta = grids["meta"]
st.markdown("The runs differ in: " + ("; ".join(f"`{d.replace('`', '')}`" for d in meta["differences"])
                                      or "nothing (the same spec)"))
(st.success if meta["paired"] else st.warning)(meta["pairing"].capitalize() + ".")

show_figure(fig, f"compare_{a_key[:8]}_{b_key[:8]}_{side}_{view}{kind}", "compare_map")
st.markdown(map_summary(grids, level))
st.caption(
    f"Run A and run B panels: mean |s| of each run's {side} model (mean over the cell's edges of the per-edge mean "
    "over the run's questions). Relative change: 100·(Σ B − Σ A)/Σ A over the cell's edges; red: run B's model "
    "relies more on these edges, blue: less. Each cell is tested across questions: paired (Wilcoxon signed-rank on "
    "the per-question differences) when both runs scored the same questions, otherwise unpaired (Mann-Whitney U on "
    "each run's own questions); Benjamini-Hochberg over the map's cells; grey cells do not pass. The noise floor is "
    "the same comparison with the runs' labels exchanged at random (within each question when paired, over the "
    "pooled questions otherwise). Different α or groups score different answer lengths (T_cut), which moves every "
    "edge's |s|: read such a comparison for where the change concentrates as much as for its size.")

with st.expander("Table of this view (A, B, relative change %, q-value)", expanded=view == "full"):
    show_table(maps.map_table(grids, level, ("run_a", "run_b")), f"compare_{a_key[:8]}_{b_key[:8]}_{side}_{view}{kind}",
               "compare_table", index=view != "full")
