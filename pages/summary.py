"""Summary: the paper's Table 1, one readable table per metric; accuracy; change vs accuracy gain."""
import pandas as pd
import streamlit as st

from eapcore.views import figures, query
from pages.common import cached_over_runs, finished_runs, no_runs_message, page_header, show_figure, show_table, url_select

page_header("Summary across pairs, datasets and α",
            "The paper's Table 1 split into one table per metric: relative change (%) of the tuned model's "
            "metric against the base model's, per model pair (rows) and dataset × truncation α (columns).")

runs = finished_runs()
if not runs:
    no_runs_message("the summary")
    st.stop()

rows = cached_over_runs(query.summary_rows)(runs)
c1, c2 = st.columns(2)
groups = [g for g in query.GROUPS if g in set(rows["group"])]
group = url_select("Answer group", groups, "group", default="both_correct", container=c1,
                   format_func=query.GROUP_LABELS.get)
grans = sorted(set(rows["granularity"]))
gran = url_select("Granularity", grans, "gran", default="layer", container=c2)
rows = rows[(rows["group"] == group) & (rows["granularity"] == gran)]

st.markdown("Cells: **+12.3% \\*\\*** = relative change 100·(tuned − base)/|base| of the pooled metric; "
            "stars: Wilcoxon signed-rank p < 0.05 \\*, < 0.01 \\*\\*, < 0.001 \\*\\*\\* (paired by question). "
            "Colour: :red-background[red = tuned higher], :blue-background[blue = tuned lower]; strong colour "
            "when p < 0.05, pale when not significant, none for exactly 0.0% (no change); – not run. The paper's "
            "expectation for online RL (GRPO, PPO): intensity ↑, complexity ↑, kurtosis ↓.")

for metric in query.METRICS:
    change, pvals, dropped = query.table1(rows, metric)
    st.subheader(f"{query.METRIC_LABELS[metric]} ({query.METRIC_UNITS[metric]})")
    if change.empty:
        st.caption("No runs.")
        continue
    styler = figures.styled_change_table(change, pvals)
    export = figures.flatten_columns(change).round(3)
    show_table(export, f"table1_{metric}_{group}_{gran}", f"t1_{metric}", styler=styler,
               caption=f"Relative change (%) of {query.METRIC_LABELS[metric].lower()}, tuned vs base")
    n = rows[rows["metric"] == metric].drop_duplicates(["pair", "dataset", "alpha"])["n"]
    note = f"n per cell: {int(n.min())}–{int(n.max())} questions." if len(n) else ""
    if dropped:
        note += f" {dropped} older duplicate run(s) for the same cell are not shown (latest kept)."
    st.caption(note)

st.subheader("Accuracy")
acc = cached_over_runs(query.accuracy_table)(runs)
if acc.empty:
    st.caption("No graded answers in the cache.")
else:
    show = acc.rename(columns={f"n_{g}": query.GROUP_LABELS[g] for g in query.GROUPS})
    show_table(show, f"accuracy_{group}", "accuracy", index=False,
               column_config={"base_accuracy": st.column_config.NumberColumn("base acc. (%)", format="%.1f"),
                              "tuned_accuracy": st.column_config.NumberColumn("tuned acc. (%)", format="%.1f"),
                              "accuracy_gain": st.column_config.NumberColumn("gain (pp)", format="%+.1f"),
                              "n": st.column_config.NumberColumn("questions graded")})
    st.caption("Greedy accuracy on the whole dataset (every graded question, not only the selected ones); "
               "the last four columns count the questions in each answer group.")

st.subheader("Metric change vs accuracy gain across pairs")
points, corr = query.change_vs_gain(rows, acc) if not acc.empty else (pd.DataFrame(), pd.DataFrame())
if points.empty:
    st.caption("Needs runs with graded answers.")
    st.stop()
metric = url_select("Metric", list(query.METRICS), "metric", format_func=query.METRIC_LABELS.get,
                    horizontal_radio=True)
show_figure(figures.change_vs_gain_figure(points, metric, query.pairs_caveat(points)), f"change_vs_gain_{metric}", "cvg")
st.caption("One point per pair × dataset × α. The reviewer asked whether larger metric changes go with larger "
           "accuracy gains; the correlations below are across pairs (the figure says when there are too few).")
if not corr.empty:
    c = corr[corr["metric"] == metric].copy()
    c["metric"] = c["metric"].map(query.METRIC_LABELS)
    show_table(c, f"correlation_{metric}", "corr", index=False,
               column_config={"pearson_r": st.column_config.NumberColumn("Pearson r", format="%+.2f"),
                              "spearman_rho": st.column_config.NumberColumn("Spearman ρ", format="%+.2f"),
                              "pearson_p": st.column_config.NumberColumn(format="%.3g"),
                              "spearman_p": st.column_config.NumberColumn(format="%.3g")})
