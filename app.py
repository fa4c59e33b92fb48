"""The dashboard: how RL fine-tuning changes a model's internal circuitry (EAP, base vs tuned).

    streamlit run app.py            # cache: ./cache, or $EAP_CACHE_DIR

Pages only read finished runs through eapcore.views and hand new run specs to eapcore.runs; the
page list is pages/common.py's NAVIGATION.
"""
import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pages.common import NAVIGATION, PAGES  # noqa: E402  (after the project root is importable)

st.set_page_config(page_title="RL circuit diff", page_icon=":material/hub:", layout="wide")

default = next(iter(PAGES))
sections = {section: [st.Page(PAGES[name], title=title, icon=icon, url_path=name, default=name == default)
                      for name, title, icon in pages]
            for section, pages in NAVIGATION.items()}
st.navigation(sections, expanded=True).run()
