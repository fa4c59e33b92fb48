#!/usr/bin/env bash
# Set up, make sure the demo runs are cached (seconds on a CPU), and open the dashboard on localhost.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIRTUAL_ENV:-$PWD/.venv}
scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
"$venv/bin/"python -m eapcore import demo/runs.zip      # the demo runs, computed once by the same code
"$venv/bin/"python -m eapcore sweep --preset demo       # computes whatever the bundle lacks (seconds on a CPU)
exec "$venv/bin/"streamlit run app.py --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false "$@"
