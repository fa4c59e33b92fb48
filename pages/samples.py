"""Samples: one question at a time: answers, truncation point, correctness, metrics, heatmap."""
import html

import streamlit as st

from eapcore.views import figures, maps, query
from pages.common import cached, cached_figure, open_run, page_header, show_figure, show_table, url_select

page_header("Samples: one question at a time",
            "Each model's own greedy answer to the question; the highlighted part (the first T_cut answer "
            "tokens) is what the EAP loss scores, the rest is not seen by the attribution.")

data = open_run("the samples")
info = data.info

ids = data.sample_ids


sample = url_select(f"Question ({len(ids)} selected for this run)", ids, "sample",
                    format_func=lambda i: query.sample_label(data, i))
view = cached(query.sample_view)(info, sample)

st.markdown(f"**Question {sample}.** {html.escape(str(view.get('question') or '(no question text stored)'))}")
st.markdown(f"Reference answer: `{view.get('gt')}` · T_cut = **{view['t_cut']}** answer tokens scored")


def _escape(text: str) -> str:
    """HTML text with its line breaks as <br>: a blank line would end the markdown HTML block and
    leave the rest of the answer outside the highlight."""
    return html.escape(text).replace("\r\n", "\n").replace("\n", "<br>")


def answer_html(part: dict, t_cut: int) -> str:
    if part["tokenizer"]:
        scored, rest = _escape(part["scored_text"] or ""), _escape(part["rest_text"] or "")
    else:
        scored = _escape(" ".join(map(str, part["scored_ids"])))
        rest = _escape(" ".join(map(str, part["rest_ids"])))
    marker = (f"<span style='color:#fff;background:#B03A2E;border-radius:3px;padding:0 4px;margin:0 2px;"
              f"font-size:0.75em'>✂ T_cut={t_cut}</span>")
    return (f"<div style='font-family:ui-monospace,monospace;font-size:0.85em;white-space:pre-wrap;"
            f"line-height:1.5;border:1px solid #ddd;border-radius:6px;padding:8px;max-height:320px;overflow:auto'>"
            f"<span style='background:#FDEBD0'>{scored}</span>{marker}<span style='color:#888'>{rest}</span></div>")


cols = st.columns(2)
for col, model in zip(cols, ("base", "tuned")):
    part = view[model]
    with col:
        ok = part["correct"]
        badge = {True: ":green-badge[correct]", False: ":red-badge[wrong]"}.get(ok, ":gray-badge[ungraded]")
        st.markdown(f"#### {model.capitalize()} model {badge}")
        loss = "–" if part["loss"] is None else f"{part['loss']:.3g}"
        pred = f"prediction `{part['pred']}`" if part["pred"] not in (None, "") else "no boxed answer"
        st.caption(f"`{part['model']}` · {pred} · {part['n_tokens']} answer tokens "
                   f"({part['n_prompt_tokens']} prompt tokens) · clean loss on the scored part {loss} nats")
        st.markdown(answer_html(part, view["t_cut"]), unsafe_allow_html=True)
        if not part["tokenizer"]:
            st.caption("No tokenizer found locally for this model: token ids are shown. The stored answer text:")
            st.text(part["code"] or "")

st.subheader("This question's metrics")
show_table(query.sample_metrics(view), f"sample_{sample}_metrics_{info.pair}", "sample_metrics",
           column_config={"relative_change": st.column_config.NumberColumn("change (%)", format="%+.2f"),
                          "base": st.column_config.NumberColumn(format="%.5g"),
                          "tuned": st.column_config.NumberColumn(format="%.5g")})
st.caption("Per-question values: mean |s| over real edges, Shannon entropy (nats) of the normalised |s|, and "
           "kurtosis of the scores, each for this question alone.")

fig = cached_figure(figures.map_view_figure, maps.run_map, [info], ("dst", "", view["position"]), data.graph.n_layers,
                    tested=False, title=f"Question {sample}: mean |s| by destination layer and module")
show_figure(fig, f"sample_{sample}_heatmap_{info.pair}", "sample_heatmap")
st.caption("This question's scores only (no averaging over questions), aggregated as on the Heatmaps page.")
