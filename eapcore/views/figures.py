"""Pure Plotly figure builders and table formatting / export helpers for the dashboard.

Nothing here reads the cache or imports Streamlit: inputs are the DataFrames and arrays of
eapcore.views.query and eapcore.views.maps. Colour conventions (all pages):
- base / tuned (run A / run B) magnitudes share one sequential scale (Viridis) from 0 (or the log
  floor) to the larger maximum of the two;
- relative change uses a diverging scale (RdBu reversed: red = tuned / B larger, blue = smaller)
  symmetric about 0, clipped at the 98th percentile of the coloured cells' |change| so a few cells
  with a near-zero base do not wash the map out (the hover always shows the exact value and q);
  a cell whose change does not pass the map's test at the chosen FDR level is grey (NOT_SIGNIFICANT),
  and the legend says so; the noise-floor panel shares the change's scale and marks;
- base is grey-blue, tuned orange in every chart that shows both models.
Exports: PNG / SVG through kaleido (a persistent headless Chromium, started on first use), CSV,
LaTeX through pandas' Styler.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from eapcore.stats.metrics import METRIC_LABELS, METRIC_UNITS
from eapcore.specs import GROUP_LABELS

MODEL_COLORS = {"base": "#4C78A8", "tuned": "#F58518"}
SEQ_SCALE = "Viridis"
DIV_SCALE = "RdBu_r"
NOT_SIGNIFICANT = "#BDBDBD"  # cells whose change the test does not support
TEMPLATE = "plotly_white"
TYPE_LABELS = {"q": "attn q", "k": "attn k", "v": "attn v", "mlp": "MLP", "logits": "logits",
               "input": "input", "attention": "attention"}


def _layout(fig: go.Figure, title: str, height: int = 420, **kw: Any) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.0, "xanchor": "left", "font": {"size": 16}},
                      template=TEMPLATE, height=height, margin={"l": 60, "r": 30, "t": 70, "b": 50},
                      font={"size": 12}, **kw)
    return fig


def symmetric_limit(values: Any, pct: float = 98.0) -> float:
    """The colour limit of a symmetric scale: the pct-th percentile of |finite values| (> 0)."""
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 1.0
    lim = float(np.percentile(v, pct))
    return lim if lim > 0 else float(v.max() or 1.0)


def _category_ticks(fig: go.Figure, axis: str, n: int, **kw: Any) -> None:
    """Label every category of an axis (Plotly skips some when crowded) up to 200 of them (the
    full matrix of a 49-layer model at layer granularity: 4L + 1 destinations), in a font small
    enough to fit; x labels turn vertical past 12 categories."""
    if n > 200:
        return
    style = {"dtick": 1, "tickfont": {"size": 7 if n > 130 else 8 if n > 100 else 9 if n > 40 else 11}}
    if axis == "x" and n > 12:
        style["tickangle"] = -90
    (fig.update_xaxes if axis == "x" else fig.update_yaxes)(**style, **kw)


def map_figure(grids: dict[str, Any], *, title: str, x_title: str, y_title: str,
               names: tuple[str, str] = ("Base model", "Tuned model"),
               change_name: str = "Relative change (tuned vs base)", level: float | None = 0.05,
               tested: bool = True, row_labels: dict | None = None, col_labels: dict | None = None,
               value_name: str = "mean |s|", edge_hover: bool = False, log_color: bool = False, stacked: bool = False,
               height: int | None = None) -> go.Figure:
    """Side a | side b | relative change (| noise floor) of a map (eapcore.views.maps).

    grids: {"a", "b", "relative_change"[, "q_value", "noise_change", "noise_q"]: DataFrame}, NaN
    where a cell has no edge. a and b share one sequential colour axis (log10 when log_color);
    the changes share a diverging one, symmetric about 0 and clipped at the 98th percentile of
    the coloured cells' |change|. tested: the grids carry tests; then cells whose q-value exceeds
    `level` are drawn grey (level None: every cell coloured) and a fourth panel shows the noise
    floor (maps: the same map for the pair with its labels exchanged at random), marked the same
    way; grids["meta"]["paired"] (default True) names the test and the noise floor. stacked: panels one above the other (the full edge
    matrix). edge_hover: hover names the edge "row → column".
    """
    a, b, r = (grids[k].to_numpy(float) for k in ("a", "b", "relative_change"))
    cols_, rows_ = list(grids["a"].columns), list(grids["a"].index)
    x_lab = [str(col_labels.get(c, c) if col_labels else c) for c in cols_]
    y_lab = [str(row_labels.get(v, v) if row_labels else v) for v in rows_]
    panels = [(a, "a", names[0]), (b, "b", names[1]), (r, "change", change_name)]
    paired = grids.get("meta", {}).get("paired", True)
    test = "Wilcoxon signed-rank per cell, paired by question" if paired else "Mann-Whitney U per cell, unpaired"
    if tested:
        panels.append((grids["noise_change"].to_numpy(float), "noise",
                       "Noise floor (sides swapped)" if paired else "Noise floor (questions reshuffled)"))
    n = len(panels)
    rows, cols = (n, 1) if stacked else (1, n)
    per_row = 14 if len(y_lab) > 40 else 18
    x_room = 60 if len(x_lab) > 12 else 0  # vertical labels
    h = height or ((n * (per_row * len(y_lab) + 110 + x_room) + 150) if stacked
                   else max(480, per_row * len(y_lab) + 300 + x_room))
    h = min(h, 4200)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p[2] for p in panels], shared_yaxes=not stacked,
                        horizontal_spacing=0.06, vertical_spacing=min(0.12, (100 + x_room) / h))
    mags = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
    if log_color:
        pos = mags[mags > 0]
        floor = float(np.percentile(pos, 1)) if pos.size else 1e-12
        tr = lambda v: np.log10(np.clip(v, floor, None))  # noqa: E731
        cmin, cmax = math.log10(floor), (math.log10(float(pos.max())) if pos.size else 0.0)
        cbar = f"log10 {value_name}"
    else:
        tr = lambda v: v  # noqa: E731
        cmin, cmax = 0.0, float(mags.max()) if mags.size else 1.0
        cbar = value_name
    passes = {"change": np.isfinite(r), "noise": None}
    q = {"change": grids["q_value"].to_numpy(float) if tested else np.full(r.shape, np.nan)}
    if tested:
        q["noise"] = grids["noise_q"].to_numpy(float)
        if level is not None:
            passes = {k: (q[k] <= level) & np.isfinite(v) for k, v in
                      (("change", r), ("noise", panels[3][0]))}
    coloured = r[passes["change"]] if passes["change"].any() else r
    lim = symmetric_limit(coloured)
    # hover from numbers (z, customdata), not per-cell strings: a head-granularity matrix stays small
    where = "%{y} → %{x}<br>" if edge_hover else f"{y_title}: %{{y}}<br>{x_title}: %{{x}}<br>"
    for i, (arr, which, name) in enumerate(panels):
        pos = {"row": (i + 1), "col": 1} if stacked else {"row": 1, "col": i + 1}
        common = dict(x=x_lab, y=y_lab, hoverongaps=False, xgap=1 if len(x_lab) < 40 else 0,
                      ygap=1 if len(y_lab) < 40 else 0)
        if which in ("a", "b"):
            fig.add_trace(go.Heatmap(z=tr(arr), customdata=arr, coloraxis="coloraxis", **common,
                                     hovertemplate=f"{where}{name.lower()} {value_name}: %{{customdata:.4g}}"
                                                   "<extra></extra>"), **pos)
            continue
        ok = passes[which] if passes[which] is not None else np.isfinite(arr)
        grey = np.isfinite(arr) & ~ok
        for cells, style in ((ok, {"coloraxis": "coloraxis2"}),
                             (grey, {"colorscale": [[0, NOT_SIGNIFICANT], [1, NOT_SIGNIFICANT]], "showscale": False,
                                     "name": "not significant"})):
            if cells is grey and not grey.any():
                continue
            verdict = "" if not tested else "<br>q = %{customdata:.3g}" + (
                "" if level is None else f" ({'passes' if cells is ok else 'not significant'} at FDR {level:g})")
            fig.add_trace(go.Heatmap(z=np.where(cells, arr, np.nan), customdata=q[which] if tested else None,
                                     **style, **common,
                                     hovertemplate=f"{where}relative change: %{{z:+.2f}} %{verdict}<extra></extra>"),
                          **pos)
    if tested and level is not None:  # the legend says what grey means
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=True,
                                 marker={"symbol": "square", "size": 14, "color": NOT_SIGNIFICANT},
                                 name=f"grey: change not significant (Benjamini-Hochberg q > {level:g}; {test})"))
    change_title = "relative change (%)" + ("" if not tested or level is None else f"<br>coloured where q ≤ {level:g}")
    if stacked:
        bar_pos = dict(len=0.45, y=1.0, yanchor="top", x=1.01)
        bar_pos2 = dict(len=0.45, y=0.0, yanchor="bottom", x=1.01)
    else:  # horizontal bars under their panels: a/b under the first two, the change under the rest
        share = 2 / n
        bar_pos = dict(orientation="h", x=share / 2, xanchor="center", y=-0.26, yanchor="top", len=share * 0.9,
                       thickness=12)
        bar_pos2 = dict(orientation="h", x=share + (1 - share) / 2, xanchor="center", y=-0.26, yanchor="top",
                        len=(1 - share) * 0.9, thickness=12)
    side = "right" if stacked else "top"
    fig.update_layout(
        coloraxis={"colorscale": SEQ_SCALE, "cmin": cmin, "cmax": cmax,
                   "colorbar": {"title": {"text": cbar, "side": side}, **bar_pos}},
        coloraxis2={"colorscale": DIV_SCALE, "cmin": -lim, "cmax": lim, "cmid": 0,
                    "colorbar": {"title": {"text": change_title, "side": side}, "ticksuffix": "%", **bar_pos2}})
    for i in range(n):
        kw = {"row": (i + 1), "col": 1} if stacked else {"row": 1, "col": i + 1}
        fig.update_xaxes(title_text=x_title, type="category", **kw)
        fig.update_yaxes(type="category", autorange="reversed", **kw)
        _category_ticks(fig, "x", len(x_lab), **kw)
        _category_ticks(fig, "y", len(y_lab), **kw)
        if stacked or i == 0:
            fig.update_yaxes(title_text=y_title, **kw)
    _layout(fig, title, height=h)
    fig.update_layout(legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1 - 64 / h, "yanchor": "top",
                              "yref": "container", "font": {"size": 11}},  # under the title
                      margin={"l": 60, "r": 80 if stacked else 30, "t": 125, "b": 80 if stacked else 190 + x_room})
    return fig


MAP_AXES = {  # view -> (what the cells are, x title, y title)
    "dst": ("Mean |s| by destination layer and module", "destination module", "destination layer"),
    "src": ("Mean |s| by source layer and module", "source module", "source layer"),
    "layers": ("Edges into {kind}: source layer × destination layer", "destination layer", "source layer"),
    "heads": ("Attention heads {kind}: layer × head", "head", "layer"),
    "full": ("Full edge matrix: mean |s| per edge", "destination node", "source node"),
}
HEAD_ROLES = {"source": "as sources (outgoing edges)", "q": "as q destinations", "k": "as k destinations (per kv head)",
              "v": "as v destinations (per kv head)"}


def map_view_figure(grids: dict[str, Any], n_layers: int, *, title: str | None = None, log_color: bool = False,
                    **kw: Any) -> go.Figure:
    """map_figure of a map of eapcore.views.maps with the titles, labels and layout of its view
    (grids["meta"]["view"] / ["kind"]; `title` replaces the view's); kw: map_figure's names,
    change_name, level, tested."""
    view, kind = grids["meta"]["view"], grids["meta"]["kind"]
    what, x_title, y_title = MAP_AXES[view]
    label = HEAD_ROLES.get(kind, kind) if view == "heads" else TYPE_LABELS.get(kind, kind)
    rows, cols = list(grids["a"].index), list(grids["a"].columns)
    layer_axis = {"dst": (True, False), "src": (True, False), "layers": (True, True), "heads": (True, False),
                  "full": (False, False)}[view]
    return map_figure(grids, title=title or what.format(kind=label), x_title=x_title, y_title=y_title,
                      row_labels=layer_labels(rows, n_layers) if layer_axis[0] else None,
                      col_labels=layer_labels(cols, n_layers) if layer_axis[1] else TYPE_LABELS,
                      edge_hover=view == "full", stacked=view == "full", log_color=log_color, **kw)


def layer_labels(layers: Sequence[int], n_layers: int) -> dict:
    """Row labels: -1 -> 'input', n_layers -> 'logits', l -> 'L{l}'."""
    return {l: ("input" if l == -1 else "logits" if l == n_layers else f"L{l}") for l in layers}


# ---- distributions ---------------------------------------------------------------------------------

def per_sample_figure(df: pd.DataFrame, metric: str, kind: str = "histogram") -> go.Figure:
    """Per-sample values of one metric, base vs tuned (df: query.per_sample long format).
    kind: histogram | violin | ecdf | paired (one line per question)."""
    sub = df[df["metric"] == metric]
    label, unit = METRIC_LABELS.get(metric, metric), METRIC_UNITS.get(metric, "")
    n = sub["idx"].nunique()
    fig = go.Figure()
    for model in ("base", "tuned"):
        v = sub.loc[sub["model"] == model, "value"].to_numpy(float)
        v = v[np.isfinite(v)]
        name = f"{model} (n={v.size})"
        color = MODEL_COLORS[model]
        if kind == "histogram":
            fig.add_trace(go.Histogram(x=v, name=name, marker_color=color, opacity=0.6, nbinsx=30,
                                       hovertemplate=f"{model}<br>{unit}: %{{x}}<br>samples: %{{y}}<extra></extra>"))
        elif kind == "violin":
            fig.add_trace(go.Violin(y=v, name=name, line_color=color, box_visible=True, meanline_visible=True,
                                    points="all", jitter=0.3, pointpos=0,
                                    hovertemplate=f"{model}<br>{unit}: %{{y:.4g}}<extra></extra>"))
        elif kind == "ecdf":
            xs = np.sort(v)
            fig.add_trace(go.Scatter(x=xs, y=np.arange(1, xs.size + 1) / max(xs.size, 1), mode="lines",
                                     line={"shape": "hv", "color": color, "width": 2}, name=name,
                                     hovertemplate=f"{model}<br>{unit} ≤ %{{x:.4g}}: %{{y:.0%}}<extra></extra>"))
    if kind == "paired":
        wide = sub.pivot_table(index="idx", columns="model", values="value")
        for idx, row in wide.iterrows():
            up = row["tuned"] > row["base"]
            fig.add_trace(go.Scatter(x=["base", "tuned"], y=[row["base"], row["tuned"]], mode="lines+markers",
                                     line={"color": "#E45756" if up else "#72B7B2", "width": 1}, opacity=0.6,
                                     showlegend=False, hovertemplate=f"question {idx}<br>%{{x}}: %{{y:.4g}}<extra></extra>"))
        ups = int((wide["tuned"] > wide["base"]).sum())
        fig.add_annotation(text=f"tuned > base on {ups} of {len(wide)} questions (red)", xref="paper",
                           yref="paper", x=0.5, y=1.04, showarrow=False)
    titles = {"histogram": "histogram", "violin": "violin + box", "ecdf": "empirical CDF",
              "paired": "paired values per question"}
    _layout(fig, f"{label} per sample: base vs tuned ({titles[kind]}, n = {n} questions)",
            height=380, barmode="overlay", legend={"orientation": "h", "y": -0.2})
    if kind in ("histogram", "ecdf"):
        fig.update_xaxes(title_text=unit)
        fig.update_yaxes(title_text="samples" if kind == "histogram" else "fraction of samples ≤ x")
    else:
        fig.update_yaxes(title_text=unit)
    return fig


def abs_histogram_figure(hist: pd.DataFrame, n_samples: int, n_edges: int) -> go.Figure:
    """Pooled |s| over all samples and real edges on a log axis (query.abs_score_histogram)."""
    fig = go.Figure()
    for model in ("base", "tuned"):
        fig.add_trace(go.Scatter(x=hist["centre"], y=hist[model], mode="lines", name=model,
                                 line={"color": MODEL_COLORS[model], "width": 2, "shape": "hvh"},
                                 customdata=np.c_[hist["left"], hist["right"]],
                                 hovertemplate=f"{model}<br>|s| in [%{{customdata[0]:.3g}}, %{{customdata[1]:.3g}})"
                                               "<br>share: %{y:.3%}<extra></extra>"))
    _layout(fig, f"Pooled distribution of |edge score| (log axis; {n_samples} samples × {n_edges} real edges)",
            height=380, legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(type="log", title_text="|s| (first-order loss change when the edge is removed)",
                     exponentformat="power")
    fig.update_yaxes(title_text="share of values per bin", tickformat=".1%")
    return fig



def pattern_scatter_figure(points: pd.DataFrame, stats: dict) -> go.Figure:
    """Paper Fig. 3a: 2D PCA of the per-question normalised |s| patterns, one point per question
    and model, coloured base / tuned (points, stats: query.pattern_view)."""
    explained = list(stats.get("explained") or [float("nan")] * 2)
    fig = go.Figure()
    for model in ("base", "tuned"):
        d = points[points["model"] == model]
        div = stats.get(model, float("nan"))
        div_txt = f"{div:.4f}" if div is not None and np.isfinite(div) else "undefined"
        fig.add_trace(go.Scatter(
            x=d["pc1"], y=d["pc2"], mode="markers", name=f"{model} (n={len(d)}, diversity {div_txt})",
            marker={"color": MODEL_COLORS[model], "size": 8, "opacity": 0.75,
                    "line": {"color": "white", "width": 0.5}},
            customdata=d["idx"].astype(str).to_numpy()[:, None],
            hovertemplate=f"{model}<br>question %{{customdata[0]}}<br>PC1 %{{x:.4g}}<br>PC2 %{{y:.4g}}"
                          "<extra></extra>"))
    n = stats.get("n", points["idx"].nunique())
    _layout(fig, f"Diversity of activation patterns: PCA of per-question normalised |s| (paper Fig. 3a; "
                 f"n = {n} questions)", height=520, legend={"orientation": "h", "y": -0.18})

    def axis(i: int) -> str:
        r = explained[i] if i < len(explained) else float("nan")
        share = f" ({100 * r:.1f} % of variance)" if np.isfinite(r) else ""
        return f"PC{i + 1} of the normalised |s| patterns{share}"

    fig.update_xaxes(title_text=axis(0), zeroline=True, zerolinecolor="#CCCCCC")
    fig.update_yaxes(title_text=axis(1), zeroline=True, zerolinecolor="#CCCCCC")
    return fig

# ---- groups and across pairs ---------------------------------------------------------------------

def group_bar_figure(overview: pd.DataFrame, metric: str) -> go.Figure:
    """One metric's pooled value per answer group, base and tuned bars (query.group_overview)."""
    sub = overview[overview["metric"] == metric]
    x = [f"{GROUP_LABELS.get(g, g)}<br>n={n}, T_cut={t}" for g, n, t in zip(sub["group"], sub["n"], sub["t_cut"])]
    fig = go.Figure()
    for model in ("base", "tuned"):
        fig.add_trace(go.Bar(x=x, y=sub[model], name=model, marker_color=MODEL_COLORS[model],
                             hovertemplate=f"{model}<br>%{{x}}<br>%{{y:.4g}}<extra></extra>"))
    for xi, (_, r) in zip(x, sub.iterrows()):
        if np.isfinite(r["relative_change"]):
            fig.add_annotation(x=xi, y=max(r["base"], r["tuned"]), text=f"{r['relative_change']:+.1f}%",
                               showarrow=False, yshift=12)
    _layout(fig, f"{METRIC_LABELS.get(metric, metric)} by answer group (label: relative change tuned vs base)",
            height=400, barmode="group", legend={"orientation": "h", "y": -0.3})
    fig.update_yaxes(title_text=METRIC_UNITS.get(metric, ""))
    return fig


def change_vs_gain_figure(points: pd.DataFrame, metric: str, caveat: str = "") -> go.Figure:
    """Relative change of one metric against the tuned model's accuracy gain, one point per
    pair x dataset x alpha (query.change_vs_gain)."""
    sub = points[points["metric"] == metric]
    fig = go.Figure()
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star"]
    for i, (dataset, d) in enumerate(sub.groupby("dataset")):
        fig.add_trace(go.Scatter(
            x=d["accuracy_gain"], y=d["relative_change"], mode="markers+text", name=str(dataset),
            text=[f"{p} α={a:g}" for p, a in zip(d["pair"], d["alpha"])], textposition="top center",
            marker={"size": 11, "symbol": symbols[i % len(symbols)]},
            hovertemplate="%{text}<br>accuracy gain %{x:+.1f} pp<br>change %{y:+.1f}%<extra>" + str(dataset) + "</extra>"))
    fig.add_hline(y=0, line={"color": "grey", "width": 1, "dash": "dot"})
    fig.add_vline(x=0, line={"color": "grey", "width": 1, "dash": "dot"})
    n_pairs = sub["pair"].nunique()
    _layout(fig, f"{METRIC_LABELS.get(metric, metric)}: change vs accuracy gain ({n_pairs} pairs)", height=400,
            legend={"title": {"text": "dataset"}})
    if caveat:  # below the x-axis title (tick labels and title take about 55 px under the axis)
        fig.add_annotation(text=caveat, xref="paper", yref="paper", x=0, y=0, yanchor="top", yshift=-62,
                           showarrow=False, xanchor="left", font={"size": 11, "color": "#B03A2E"})
        fig.update_layout(margin={"b": 100})
    fig.update_xaxes(title_text="accuracy gain, tuned − base (percentage points)")
    fig.update_yaxes(title_text="relative change of the metric (%)", ticksuffix="%")
    return fig


def node_entropy_figure(df: pd.DataFrame) -> go.Figure:
    """Entropy of each source node's outgoing edges, base vs tuned bars (paper Fig. 3b as a chart)."""
    fig = go.Figure()
    for model in ("base", "tuned"):
        fig.add_trace(go.Bar(x=df["node"], y=df[model], name=model, marker_color=MODEL_COLORS[model],
                             customdata=df["n_edges"],
                             hovertemplate=f"{model}<br>node %{{x}}<br>entropy %{{y:.3f}} nats"
                                           "<br>%{customdata} outgoing edges<extra></extra>"))
    _layout(fig, "Entropy of each source node's outgoing-edge distribution (paper Fig. 3b)", height=380,
            barmode="group", legend={"orientation": "h", "y": -0.3})
    fig.update_xaxes(title_text="source node (forward order)", type="category")
    fig.update_yaxes(title_text="entropy (nats)")
    return fig


# ---- tables ----------------------------------------------------------------------------------------

def stars(p: float) -> str:
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def change_cell_colors(change: pd.DataFrame, pvals: pd.DataFrame, level: float = 0.05) -> pd.DataFrame:
    """CSS per cell: red (up) / blue (down) background, strong when p < level, pale otherwise; no
    background for an exact 0 (no change) or a missing cell."""
    def css(c: float, p: float) -> str:
        if c is None or not np.isfinite(c):
            return "color: #999999;"
        if c == 0:  # no change: neither direction's colour
            return "color: #111111;"
        sig = p is not None and np.isfinite(p) and p < level
        if c > 0:
            bg = "#E8776B" if sig else "#F8DCD8"
        else:
            bg = "#6E9FD0" if sig else "#DCE7F3"
        weight = "font-weight: 600;" if sig else ""
        return f"background-color: {bg}; color: #111111; {weight}"
    p = pvals.reindex_like(change)
    return pd.DataFrame([[css(c, q) for c, q in zip(cr, pr)] for cr, pr in zip(change.to_numpy(float),
                                                                                  p.to_numpy(float))],
                        index=change.index, columns=change.columns)


def change_table_text(change: pd.DataFrame, pvals: pd.DataFrame) -> pd.DataFrame:
    """Cells like '+12.3% **' (stars: Wilcoxon p < 0.05 / 0.01 / 0.001), '0.0%' for no change at all;
    '–' when missing."""
    p = pvals.reindex_like(change)
    return pd.DataFrame([[("–" if not np.isfinite(c) else f"{c:+.1f}% {stars(q)}".strip() if c else "0.0%")
                          for c, q in zip(cr, pr)] for cr, pr in zip(change.to_numpy(float), p.to_numpy(float))],
                        index=change.index, columns=change.columns)


def flatten_columns(df: pd.DataFrame, fmt: str = "{dataset} α={alpha:g}") -> pd.DataFrame:
    """(dataset, alpha) column MultiIndex -> single strings (for Streamlit tables and CSV)."""
    out = df.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [fmt.format(dataset=d, alpha=float(a)) for d, a in out.columns]
    return out


def styled_change_table(change: pd.DataFrame, pvals: pd.DataFrame):
    """pandas Styler of one metric's Table 1: text '+x.x% **', coloured by direction and significance."""
    text = flatten_columns(change_table_text(change, pvals))
    colors = change_cell_colors(change, pvals)
    colors.columns = text.columns
    return text.style.apply(lambda _: colors, axis=None)


def to_csv_bytes(df: pd.DataFrame, index: bool = True) -> bytes:
    return df.to_csv(index=index).encode("utf-8")


def to_latex(df_or_styler: Any, caption: str = "", label: str = "") -> str:
    """LaTeX (booktabs) of a DataFrame or Styler; colours of a Styler become \\cellcolor
    (needs \\usepackage[table]{xcolor}); %, _ and & in cells and headers are escaped."""
    if isinstance(df_or_styler, pd.DataFrame):
        styler = df_or_styler.style.format(precision=4, na_rep="–", escape="latex")
    else:
        styler = df_or_styler._copy(deepcopy=True)
        styler.format(escape="latex", na_rep="–")
    styler.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    kw: dict[str, Any] = {"hrules": True, "convert_css": True}
    if caption:
        kw["caption"] = caption
    if label:
        kw["label"] = label
    return styler.to_latex(**kw)


# ---- images ------------------------------------------------------------------------------------------

_KALEIDO_LOCK = threading.Lock()
_KALEIDO_STARTED = False


def _chrome_path() -> str | None:
    return os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


def figure_image(fig: go.Figure | dict, fmt: str = "png", scale: float = 2.0, width: int | None = None) -> bytes:
    """PNG or SVG bytes of a figure through kaleido (headless Chromium, kept running between calls).

    Chromium comes from $BROWSER_PATH or PATH (`apt-get install chromium`); RuntimeError with
    that advice when there is none."""
    global _KALEIDO_STARTED
    import kaleido

    path = _chrome_path()
    if path is None:
        raise RuntimeError("image export needs Chrome/Chromium: install it (apt-get install chromium) "
                           "or set BROWSER_PATH")
    os.environ.setdefault("BROWSER_PATH", path)
    fig = go.Figure(fig) if isinstance(fig, dict) else fig
    width = width or int(fig.layout.width or 1200)
    height = int(fig.layout.height or 450)
    with _KALEIDO_LOCK:
        if not _KALEIDO_STARTED:
            try:
                kaleido.start_sync_server(silence_warnings=True)
            except Exception:  # noqa: BLE001  (fall back to one browser per image)
                pass
            _KALEIDO_STARTED = True
        return kaleido.calc_fig_sync(fig, opts={"format": fmt, "width": width, "height": height,
                                                "scale": scale if fmt == "png" else 1})
