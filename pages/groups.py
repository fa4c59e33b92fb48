"""Correct vs incorrect: the four answer groups of a pair compared on every metric."""
import streamlit as st

from eapcore.views import figures, query
from pages.common import (PAGES, cached, finished_runs, load, no_runs_message, page_header, run_page_params, run_picker,
                          show_figure, show_table, url_select)

page_header("Correct vs incorrect answers",
            "The same pair, dataset and α run on each answer group (both correct, both wrong, only base "
            "right, only tuned right): does the tuned model's circuitry change the same way whether or not "
            "its answers are right?")

runs = finished_runs()
info = run_picker(runs, pick_group=False) if runs else None
if info is None:
    no_runs_message("the group comparison")
    st.stop()
siblings = query.group_siblings(info, runs)
st.markdown(f"**{info.pair}** on **{info.dataset}** · α = {info.alpha:g} · {info.granularity} graph · "
            f"groups cached: **{len(siblings)} of 4** "
            f"({', '.join(query.GROUP_LABELS[g] for g in siblings) or 'none'})")
missing = [g for g in query.GROUPS if g not in siblings]
if missing:
    st.info("Not run yet for the group(s) " + ", ".join(query.GROUP_LABELS[g] for g in missing) +
            ". Runs that differ only in the `group` setting appear here; start them on the Run page.")
    st.page_link(PAGES["run"], label=f"Run the missing groups ({query.GROUP_LABELS[missing[0]]} first)",
                 icon=":material/play_arrow:", query_params=run_page_params(info.key, group=missing[0]))
if len(siblings) < 1:
    st.stop()

datas = {g: d for g, r in siblings.items() if (d := load(r)) is not None}
overview = query.group_overview(datas)
metric = url_select("Metric", list(query.METRICS), "metric", format_func=query.METRIC_LABELS.get,
                    horizontal_radio=True)

show_figure(figures.group_bar_figure(overview, metric), f"groups_{metric}_{info.pair}_{info.dataset}", "group_bar")
st.caption("Pooled metric of each group's selected questions, base and tuned. Each group is its own run: it has "
           "its own T_ref and T_cut (= ⌊α·T_ref⌋), so absolute values across groups also reflect answer length; "
           "compare the relative changes. n = questions drawn (at most N; small groups give wide CIs).")

st.subheader("Base vs tuned within each group (paired tests)")
tab = overview.copy()
tab["group"] = tab["group"].map(query.GROUP_LABELS)
tab["metric"] = tab["metric"].map(query.METRIC_LABELS)
tab["p"] = tab["p_value"].map(query.fmt_p)
show_table(tab.drop(columns=["p_value"]).set_index(["metric", "group"]), f"groups_overview_{info.pair}_{info.dataset}",
           "group_overview",
           column_config={"relative_change": st.column_config.NumberColumn("change (%)", format="%+.2f"),
                          "ci_low": st.column_config.NumberColumn("CI low (%)", format="%+.1f"),
                          "ci_high": st.column_config.NumberColumn("CI high (%)", format="%+.1f"),
                          "p": st.column_config.TextColumn("Wilcoxon p"),
                          "t_cut": st.column_config.NumberColumn("T_cut (tokens)")})

st.subheader("Between two groups, one model (independent samples)")
if len(datas) < 2:
    st.caption("Needs at least two groups cached.")
    st.stop()
c1, c2, c3 = st.columns(3)
present = list(datas)
model = url_select("Model", ["tuned", "base"], "model", container=c1)
ga = url_select("Group A (reference)", present, "ga", container=c2, format_func=query.GROUP_LABELS.get,
                default="both_wrong" if "both_wrong" in present else present[0])
gb = url_select("Group B", [g for g in present if g != ga], "gb", container=c3, format_func=query.GROUP_LABELS.get,
                default="both_correct")

cmp = cached(query.compare_groups, 2, spinner="Bootstrap and permutation tests…")(siblings[ga], siblings[gb], model)
cmp["metric"] = cmp["metric"].map(query.METRIC_LABELS)
cmp["p (Mann-Whitney)"] = cmp["p_value"].map(query.fmt_p)
cmp["p (permutation)"] = cmp["p_value_permutation"].map(query.fmt_p)
cols = ["metric", "a", "b", "relative_change", "ci_low", "ci_high", "p (Mann-Whitney)", "p (permutation)",
        "cohen_d", "rank_biserial", "n_a", "n_b"]
show_table(cmp[cols].set_index("metric"), f"group_compare_{model}_{ga}_vs_{gb}", "group_compare",
           column_config={"a": st.column_config.NumberColumn(f"A: {query.GROUP_LABELS[ga]}", format="%.4g"),
                          "b": st.column_config.NumberColumn(f"B: {query.GROUP_LABELS[gb]}", format="%.4g"),
                          "relative_change": st.column_config.NumberColumn("change B vs A (%)", format="%+.2f"),
                          "ci_low": st.column_config.NumberColumn("CI low (%)", format="%+.1f"),
                          "ci_high": st.column_config.NumberColumn("CI high (%)", format="%+.1f"),
                          "cohen_d": st.column_config.NumberColumn("Cohen's d", format="%+.2f"),
                          "rank_biserial": st.column_config.NumberColumn("rank-biserial", format="%+.2f")})
st.caption(f"The {model} model's pooled metrics on group B against group A: Mann-Whitney U and a permutation test "
           f"on per-question values ({cmp.attrs['n_permutations']} permutations), {cmp['confidence'].iloc[0]:.0%} "
           f"bootstrap CI of the relative change ({cmp.attrs['n_bootstrap']} resamples per group), "
           "Cohen's d and rank-biserial (positive: B higher). The groups were truncated at different T_cut.")
