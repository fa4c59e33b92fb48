"""Server-side render time of each dashboard page from a warm cache, on paper-sized fake runs
(100 samples, 28 layers, layer granularity: scores [100, 57, 113]; alpha 0.5, and alpha 0.1 on the
same questions for the Compare page).

    .venv/bin/python benchmarks/page_render.py [--repeats 7]

Each page is run once cold (first load: files read, caches filled), then `repeats` times warm
through streamlit.testing's AppTest (the same script run a browser triggers, minus the network).
Prints a Markdown table of cold, median and max warm seconds, and the median CPU seconds of a warm
run (this process's CPU time: less disturbed than wall time by other jobs on a shared machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VIEWS = [  # (label, page, query params, widget changes after the first run)
    ("Home", "pages/home.py", {}, None),
    ("Heatmaps: dst layer × module", "pages/heatmaps.py", {"view": "dst"}, None),
    ("Heatmaps: src × dst layer (q)", "pages/heatmaps.py", {"view": "layers", "kind": "q"}, None),
    ("Heatmaps: full 57 × 113 matrix", "pages/heatmaps.py", {"view": "full"}, None),
    ("Heatmaps: full matrix, FDR off", "pages/heatmaps.py", {"view": "full", "fdr": "off"}, None),
    ("Compare α 0.1 vs 0.5: dst layer × module", "pages/compare.py", {"view": "dst"}, None),
    ("Compare α 0.1 vs 0.5: full matrix", "pages/compare.py", {"view": "full"}, None),
    ("Distributions (histograms)", "pages/distributions.py", {}, None),
    ("Distributions (ECDF)", "pages/distributions.py", {"plot": "ecdf"}, None),
    ("Samples", "pages/samples.py", {}, None),
    ("Correct vs incorrect", "pages/groups.py", {}, None),
    ("Summary", "pages/summary.py", {}, None),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    from fake_runs import make_paper_run

    root = Path(tempfile.mkdtemp(prefix="eap-bench-"))
    t = time.perf_counter()
    for alpha in (0.5, 0.1):
        make_paper_run(root, alpha)
    print(f"fake paper-sized runs written in {time.perf_counter() - t:.1f} s to {root}", file=sys.stderr)
    os.environ["EAP_CACHE_DIR"] = str(root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from streamlit.testing.v1 import AppTest

    rows = []
    for label, page, params, _ in VIEWS:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        for k, v in params.items():
            at.query_params[k] = v
        t = time.perf_counter()
        at.switch_page(page).run()
        cold = time.perf_counter() - t
        if at.exception:
            raise SystemExit(f"{label}: {at.exception[0].message}")
        warm, cpu = [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            at.run()
            warm.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rows.append((label, cold, statistics.median(warm), max(warm), statistics.median(cpu)))
        print(f"{label}: cold {cold:.3f} s, warm median {statistics.median(warm):.3f} s", file=sys.stderr)
    print(f"\nMachine: {platform.node()} · {platform.processor() or platform.machine()} · "
          f"{os.cpu_count()} CPUs · Python {platform.python_version()}\n")
    print("| page / view | cold (s) | warm median (s) | warm max (s) | warm CPU median (s) |\n|---|---|---|---|---|")
    for label, cold, med, mx, cpu in rows:
        print(f"| {label} | {cold:.3f} | {med:.3f} | {mx:.3f} | {cpu:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
