"""Heatmaps: where in the network the scores change (paper Fig. 2 as 2D heatmaps)."""
import numpy as np
import pandas as pd
import streamlit as st

from eapcore.views import figures, query
from pages.common import (cached, open_run, page_header, show_figure, show_table, url_select)

page_header("Heatmaps: where the circuitry changes",
            "Per-edge mean |EAP score| over the run's questions for the base and tuned model, and the "
            "relative change 100·(tuned − base)/base, aggregated by layer and module.")

data = open_run("the heatmaps")
info = data.info

VIEWS = {"dst": "Destination layer × module (q, k, v, MLP, logits)",
         "src": "Source layer × module (input, attention, MLP)",
         "layers": "Source layer × destination layer (one module type)",
         "full": "Full matrix: source node × destination node"}
if info.granularity == "head":
    VIEWS["heads"] = "Layer × head (head granularity)"
view = url_select("Aggregation", list(VIEWS), "view", format_func=VIEWS.get, default="dst")
left, right = st.columns(2)
log_color = url_select("Colour scale of base / tuned", ["linear", "log"], "scale", container=left,
                       horizontal_radio=True) == "log"

L = data.graph.n_layers
module_grid, layer_grid, head_grid, full_matrix = (cached(query.module_grid), cached(query.layer_grid),
                                                   cached(query.head_grid), cached(query.full_matrix))


@st.cache_data(max_entries=32, show_spinner=False)
def _figure(key: str, signature: tuple, view: str, kind: str, log_color: bool):
    """The figure and its table, cached per run and view."""
    if view in ("dst", "src"):
        grids = module_grid(info, view)
        what = "destination" if view == "dst" else "source"
        fig = figures.grid_triptych(
            grids, title=f"Mean |s| by {what} layer and module: base, tuned, relative change",
            x_title=f"{what} module", y_title=f"{what} layer",
            row_labels=figures.layer_labels(grids["base"].index, L), col_labels=figures.TYPE_LABELS,
            value_name="mean |s|", log_color=log_color)
        index_name = f"{what} layer"
    elif view == "layers":
        grids = layer_grid(info, kind)
        fig = figures.grid_triptych(
            grids, title=f"Edges into {figures.TYPE_LABELS.get(kind, kind)}: source layer × destination layer",
            x_title="destination layer", y_title="source layer",
            row_labels=figures.layer_labels(grids["base"].index, L),
            col_labels=figures.layer_labels(grids["base"].columns, L), log_color=log_color)
        index_name = "source layer"
    elif view == "heads":
        grids = head_grid(info, kind)
        role = "as sources (outgoing edges)" if kind == "source" else f"as {kind} destinations"
        fig = figures.grid_triptych(grids, title=f"Attention heads {role}: layer × head",
                                    x_title="head", y_title="layer",
                                    row_labels=figures.layer_labels(grids["base"].index, L), log_color=log_color)
        index_name = "layer"
    else:
        m = full_matrix(info)
        fwd, bwd = m["forward"], m["backward"]
        names = np.array([[f"edge {s} → {d}" for d in bwd] for s in fwd], dtype=object)
        fig = figures.heatmap_triptych(m["base"], m["tuned"], m["relative_change"], bwd, fwd,
                                       title="Full edge matrix: mean |s| per edge, base, tuned, relative change",
                                       x_title="destination node", y_title="source node", hover_names=names,
                                       log_color=log_color, stacked=True)
        grids = None
        index_name = "source node"
    if grids is not None:
        table = pd.concat({k: grids[k] for k in ("base", "tuned", "relative_change", "n_edges")}, axis=1)
    else:
        edges = cached(query.edge_table)(info)
        table = edges[["src", "dst", "base", "tuned", "relative_change"]].set_index(["src", "dst"])
    table.index.name = table.index.name or index_name
    return fig, table


kind = ""
if view == "layers":
    kind = url_select("Destination module", list(query.layer_grid_kinds("dst_type")), "kind", container=right,
                      format_func=lambda k: figures.TYPE_LABELS.get(k, k), default="mlp")
elif view == "heads":
    kind = url_select("Heads", ["source", "q", "k", "v"], "kind", container=right,
                      format_func={"source": "as sources", "q": "query inputs", "k": "key inputs (per kv head)",
                                   "v": "value inputs (per kv head)"}.get)

fig, table = _figure(info.key, info.signature, view, kind, log_color)
show_figure(fig, f"heatmap_{info.pair}_{info.dataset}_a{info.alpha:g}_{view}{kind}", "heatmap")
st.caption(
    "Each cell of the base and tuned maps is the mean over the cell's real edges of the per-edge mean |s| "
    f"over the n = {len(data.sample_ids)} questions (s: first-order change of the truncated self-cross-entropy "
    "when the edge is removed, in nats). The relative change of a cell is 100·(Σ tuned − Σ base)/Σ base over "
    "its edges; its colour scale is symmetric about 0 and clipped at the 98th percentile of |change| (hover "
    "for exact values). Red: the tuned model relies more on these edges; blue: less. Empty cells have no edges.")

with st.expander("Table of this view (base, tuned, relative change %, edges per cell)", expanded=False):
    flat = table.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [f"{a} | {b}" for a, b in flat.columns]
    show_table(flat, f"heatmap_table_{info.pair}_{view}{kind}", "heatmap_table")

st.subheader("Source nodes: entropy of their outgoing edges")
ent = cached(query.node_entropy)(info)
show_figure(figures.node_entropy_figure(ent), f"node_entropy_{info.pair}_{info.dataset}", "node_entropy")
st.caption("Shannon entropy (nats) of each source node's distribution of mean |s| over its outgoing real "
           "edges (paper Fig. 3b): higher means the node spreads its influence over more destinations.")
