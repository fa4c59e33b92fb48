"""The dashboard: how RL fine-tuning changes a model's internal circuitry (EAP, base vs tuned).

    streamlit run app.py            # cache: ./cache, or $EAP_CACHE_DIR

Pages only read finished runs through eapcore.query and hand new run specs to eapcore.runner.
"""
import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

st.set_page_config(page_title="RL circuit diff", page_icon=":material/hub:", layout="wide")

pages = {
    "Overview": [
        st.Page("pages/home.py", title="Home", icon=":material/home:", default=True, url_path="home"),
        st.Page("pages/run.py", title="Run", icon=":material/play_arrow:", url_path="run"),
    ],
    "One run": [
        st.Page("pages/heatmaps.py", title="Heatmaps", icon=":material/grid_on:", url_path="heatmaps"),
        st.Page("pages/distributions.py", title="Distributions", icon=":material/bar_chart:", url_path="distributions"),
        st.Page("pages/groups.py", title="Correct vs incorrect", icon=":material/balance:", url_path="groups"),
        st.Page("pages/samples.py", title="Samples", icon=":material/search:", url_path="samples"),
    ],
    "Across runs": [
        st.Page("pages/summary.py", title="Summary", icon=":material/table_chart:", url_path="summary"),
    ],
}
st.navigation(pages, expanded=True).run()
