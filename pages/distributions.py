"""Distributions: per-question metric values of base vs tuned, with the paired tests beside them."""
import numpy as np
import pandas as pd
import streamlit as st

from eapcore.views import figures, query
from pages.common import cached, cached_figure, open_run, page_header, show_figure, show_table, url_select

page_header("Distributions: base vs tuned, question by question",
            "Each metric computed on every question alone (same settings as the run's pooled metrics), "
            "with the stored paired comparison: Wilcoxon signed-rank and paired permutation tests, bootstrap "
            "CI of the relative change, effect sizes.")

data = open_run("the distributions")
info = data.info

KINDS = {"histogram": "Histograms", "violin": "Violins", "ecdf": "ECDFs", "paired": "Paired lines"}
kind = url_select("Plot", list(KINDS), "plot", format_func=KINDS.get, horizontal_radio=True)

per = cached(query.per_sample)(info)
stats = cached(query.paired_stats)(info)
settings = data.metrics.get("settings") or {}
conf = data.metrics.get("confidence", 0.95)
n_boot, n_perm = data.metrics.get("bootstrap"), data.metrics.get("permutations")


def _num(v, fmt="{:.4g}"):
    return "–" if v is None or not np.isfinite(v) else fmt.format(v)


for metric in query.METRICS:
    r = stats.set_index("metric").loc[metric]
    st.subheader(query.METRIC_LABELS[metric])
    left, right = st.columns([3, 1.25])
    with left:
        show_figure(cached_figure(figures.per_sample_figure, query.per_sample, [info], (), metric, kind),
                    f"{metric}_{kind}_{info.pair}_{info.dataset}_a{info.alpha:g}", f"dist_{metric}")
    with right:
        st.metric("Relative change (pooled, tuned vs base)", _num(r["relative_change"], "{:+.2f} %"),
                  help="100·(M_tuned − M_base)/|M_base| of the pooled metric over all questions and edges")
        st.markdown(
            f"- base **{_num(r['base'])}**, tuned **{_num(r['tuned'])}** ({query.METRIC_UNITS[metric]})\n"
            f"- {conf:.0%} bootstrap CI of the change: **[{_num(r['ci_low'], '{:+.1f}')}, "
            f"{_num(r['ci_high'], '{:+.1f}')}] %** ({n_boot} resamples of questions)\n"
            f"- Wilcoxon signed-rank p = **{query.fmt_p(r['p_value']) or '–'}**\n"
            f"- paired permutation p = **{query.fmt_p(r['p_value_permutation']) or '–'}** ({n_perm} permutations)\n"
            f"- effect size d_z = {_num(r['effect_size_dz'], '{:+.2f}')}, rank-biserial = "
            f"{_num(r['rank_biserial'], '{:+.2f}')}\n"
            f"- n = **{int(r['n']) if np.isfinite(r['n']) else '–'}** paired questions")
    if metric == "information_complexity":
        st.caption(f"Per-sample value: Shannon entropy of the question's normalised |s| over its real edges "
                   f"(pooled metric: entropy option `{settings.get('entropy', 'pooled')}`).")
    elif metric == "kurtosis":
        st.caption(f"Per-sample value: {settings.get('kurtosis', 'fisher')} kurtosis of the question's "
                   f"{settings.get('kurtosis_of', 'signed')} scores; the pooled metric is their mean.")
    else:
        st.caption("Per-sample value: mean |s| over the question's real edges; the pooled metric is their mean.")

st.subheader("All paired tests")
table = stats.copy()
table["metric"] = table["metric"].map(query.METRIC_LABELS)
show_table(table.set_index("metric"), f"paired_tests_{info.pair}_{info.dataset}_a{info.alpha:g}", "tests",
           column_config={"relative_change": st.column_config.NumberColumn("change (%)", format="%+.2f"),
                          "p_value": st.column_config.NumberColumn("Wilcoxon p", format="%.2e"),
                          "p_value_permutation": st.column_config.NumberColumn("permutation p", format="%.2e"),
                          "ci_low": st.column_config.NumberColumn("CI low (%)", format="%+.2f"),
                          "ci_high": st.column_config.NumberColumn("CI high (%)", format="%+.2f")})

st.subheader("Pooled distribution of |s|")
hist = cached(query.abs_score_histogram)(info, 80)
show_figure(figures.abs_histogram_figure(hist, len(data.sample_ids), int(data.mask.sum())),
            f"abs_scores_{info.pair}_{info.dataset}_a{info.alpha:g}", "abs_hist")
zeros = hist.attrs.get("zeros", {})
st.caption("Share of all |s| values (every question × real edge) in each of 80 log-spaced bins shared by both "
           "models. A shift right is higher activation intensity; a wider, flatter curve is higher entropy "
           f"and lower kurtosis. Exact zeros (not drawn): base {zeros.get('base', 0)}, tuned {zeros.get('tuned', 0)}.")

st.subheader("Diversity of activation patterns (paper Fig. 3a)")
points, div = cached(query.pattern_view)(info)
name = f"pattern_pca_{info.pair}_{info.dataset}_a{info.alpha:g}"
left, right = st.columns([3, 1.25])
with left:
    show_figure(figures.pattern_scatter_figure(points, div), name, "pattern_pca")
with right:
    st.metric("Pattern diversity, relative change (tuned vs base)", _num(div["relative_change"], "{:+.2f} %"),
              help="100·(D_tuned − D_base)/|D_base|, D = mean pairwise cosine distance between the questions' "
                   "normalised |s| vectors")
    ev = div["explained"]
    st.markdown(f"- diversity base **{_num(div['base'])}**, tuned **{_num(div['tuned'])}** "
                f"(mean pairwise cosine distance, 0 = identical patterns)\n"
                f"- n = **{div['n']}** questions per model ({div['n'] * (div['n'] - 1) // 2} pairs each), "
                f"{div['n_edges']} real edges\n"
                f"- PC1 / PC2 explain {_num(100 * ev[0], '{:.1f}')} % / {_num(100 * ev[1], '{:.1f}')} % "
                f"of the variance of all {2 * div['n']} patterns")
    for model, why in div["undefined"].items():
        st.warning(f"{model} diversity undefined: {why}")
st.caption(f"Each point is one question's activation pattern in one model: its |s| over the {div['n_edges']} real "
           "edges, divided by its sum (so the pattern sums to 1 and only the shape, not the intensity, counts). "
           f"The {2 * div['n']} patterns of base and tuned together are centred and projected onto their first "
           "two principal components (one shared PCA, so both models sit in the same axes); hover shows the "
           "question idx. Pattern diversity is the mean cosine distance 1 − cos(p_n, p_m) over all pairs of "
           "questions within one model, computed on the full patterns, not on the 2D projection: a wider "
           "cloud in the plot suggests, but does not define, a higher diversity.")
summary = pd.DataFrame({"pattern_diversity": [div["base"], div["tuned"]],
                        "n_questions": [div["n"], div["n"]], "n_edges": [div["n_edges"], div["n_edges"]]},
                       index=pd.Index(["base", "tuned"], name="model"))
summary.loc["relative change (%)"] = [div["relative_change"], np.nan, np.nan]
show_table(summary, f"pattern_diversity_{info.pair}_{info.dataset}_a{info.alpha:g}", "pattern_div",
           caption="Pattern diversity (mean pairwise cosine distance of per-question normalised |s|)")
with st.expander(f"PCA coordinates ({len(points)} points)"):
    show_table(points, name, "pattern_points", index=False,
               caption="2D PCA of per-question normalised |s| patterns (paper Fig. 3a)")
