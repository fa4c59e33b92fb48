"""Heatmaps: where in the network the scores change (paper Fig. 2 as 2D heatmaps), coloured only
where the questions support the change."""
import streamlit as st

from eapcore.views import figures, maps, query
from pages.common import (cached, map_controls, map_summary, map_view, open_run, page_header, show_figure,
                          show_table)

page_header("Heatmaps: where the circuitry changes",
            "Per-edge mean |EAP score| over the run's questions for the base and tuned model, and the "
            "relative change 100·(tuned − base)/base, aggregated by layer and module; a change is coloured only "
            "where a paired test across questions supports it.")

data = open_run("the heatmaps")
info = data.info
view, kind, level, log_color = map_controls(info.granularity)
grids, fig = map_view(maps.run_map, [info], (view, kind), data.graph.n_layers, level=level, log_color=log_color)
show_figure(fig, f"heatmap_{info.pair}_{info.dataset}_a{info.alpha:g}_{view}{kind}", "heatmap")
st.markdown(map_summary(grids, level))
st.caption(
    "Base and tuned maps: the mean over the cell's real edges of the per-edge mean |s| over the "
    f"n = {len(data.sample_ids)} questions (s: first-order change of the truncated self-cross-entropy when the "
    "edge is removed, in nats), on one colour scale: log10 of mean |s| (floored at its 1st percentile) or, with "
    "'linear', 0 to the largest cell. Relative change of a cell: 100·(Σ tuned − Σ base)/Σ base over its edges; red: "
    "the tuned model relies more on these edges, blue: less. Colour only where the change passes: each cell is "
    "tested across questions (its per-question sum of |s|, tuned minus base: Wilcoxon signed-rank, exact p up to "
    "50 non-zero differences without ties, normal approximation beyond) and the p-values of the map's cells are "
    "adjusted for the false discovery rate (Benjamini-Hochberg); grey cells do not pass at the chosen level. The "
    "noise floor is the same map for this run with base and tuned exchanged at random within each question: what "
    "changes of this size look like when there is no systematic difference. Colour scale symmetric about 0, "
    "clipped at the 98th percentile of the coloured cells' |change| (hover for exact values and q-values). "
    "Empty cells have no edges.")

with st.expander("Table of this view (base, tuned, relative change %, q-value, edges per cell)", expanded=False):
    show_table(maps.map_table(grids, level, ("base", "tuned")), f"heatmap_table_{info.pair}_{view}{kind}",
               "heatmap_table", index=view != "full")

st.subheader("Source nodes: entropy of their outgoing edges")
ent = cached(query.node_entropy)(info)
show_figure(figures.node_entropy_figure(ent), f"node_entropy_{info.pair}_{info.dataset}", "node_entropy")
st.caption("Shannon entropy (nats) of each source node's distribution of mean |s| over its outgoing real "
           "edges (paper Fig. 3b): higher means the node spreads its influence over more destinations.")
