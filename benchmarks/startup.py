"""Time from a fresh clone to the default pair's heatmaps and the summary in a browser, offline.

    VIRTUAL_ENV=<environment with requirements.txt> python benchmarks/startup.py [--repo .] [--screenshots DIR]

Clones the repository (committed state) into a temporary folder with an empty cache, runs the
README's main command (`bash scripts/run.sh`) there with the hub switched off, and drives
Debian's chromium (Playwright) until the first screen ("/") shows the default pair's heatmaps and
the Summary page its tables. The Python environment is VIRTUAL_ENV (scripts/setup.sh finds it
installed), so package installation is not part of the time; a cold `bash scripts/setup.sh` is
reported separately in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

READY = '[data-testid="stApp"][data-test-script-state="notRunning"]'
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_page(page, path: str, selector: str, base: str, timeout_s: float = 120) -> None:
    page.goto(base + path)
    page.wait_for_selector(f"{READY} {selector}", timeout=timeout_s * 1000)
    if page.locator('[data-testid="stException"]').count():
        raise RuntimeError(f"{path}: the page shows an exception")


def main() -> int:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--screenshots", type=Path, default=None, help="save the two pages as PNG files here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "EAP_CACHE_DIR": str(Path(tmp) / "cache")}
        start = time.perf_counter()
        server = subprocess.Popen(["bash", "scripts/run.sh", "--server.port", str(port)], cwd=clone, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    urllib.request.urlopen(base + "/_stcore/health", timeout=1)
                    break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError("run.sh exited:\n" + server.stdout.read())
                    time.sleep(0.5)
            t_server = time.perf_counter() - start
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                wait_page(page, "/", '[data-testid="stPlotlyChart"] .js-plotly-plot', base)
                t_heat = time.perf_counter() - start
                shown = page.url
                if args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.screenshots / "first_screen.png"), full_page=True)
                wait_page(page, "/summary", '[data-testid="stTable"], [data-testid="stDataFrame"]', base)
                t_summary = time.perf_counter() - start
                if args.screenshots:
                    page.screenshot(path=str(args.screenshots / "summary.png"), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"server up {t_server:.1f} s, heatmaps {t_heat:.1f} s ({shown}), summary {t_summary:.1f} s "
          "after `bash scripts/run.sh`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
