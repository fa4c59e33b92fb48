"""The dashboard: how RL fine-tuning changes a model's internal circuitry (EAP, base vs tuned).

    streamlit run app.py            # cache: ./cache, or $EAP_CACHE_DIR

Pages only read finished runs through eapcore.views and hand new run specs to eapcore.runs; the
page list is pages/common.py's NAVIGATION. On start, a cache with no run gets the runs shipped in
demo/smollm2/runs.zip and demo/runs.zip; "/" opens the default pair's heatmaps (the SmolLM2 GRPO
pair when its runs are cached: eapcore.runs.registry.FEATURED_PAIRS).
"""
import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eapcore.views import query  # noqa: E402
from pages.common import NAVIGATION, PAGES, finished_runs, import_shipped_runs  # noqa: E402

st.set_page_config(page_title="RL circuit diff", page_icon=":material/hub:", layout="wide")
import_shipped_runs()


def first_screen() -> None:
    """The app's address "/": the default pair's heatmaps when a run is cached, else Home (each
    page at its own address, so /home and every link name the page they show)."""
    params = query.default_view(finished_runs())
    st.switch_page(PAGES["heatmaps"] if params else PAGES["home"], query_params=params)


sections = {section: [st.Page(PAGES[name], title=title, icon=icon, url_path=name) for name, title, icon in pages]
            for section, pages in NAVIGATION.items()}
sections[next(iter(sections))].append(st.Page(first_screen, title="RL circuit diff", url_path="start",
                                              default=True, visibility="hidden"))
st.navigation(sections, expanded=True).run()
