#!/usr/bin/env bash
# Set up, make sure the demo runs are cached (seconds on a CPU), and open the dashboard on localhost.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIRTUAL_ENV:-$PWD/.venv}
scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
"$venv/bin/"python -m eapcore sweep --preset demo
exec "$venv/bin/"streamlit run app.py --server.address 127.0.0.1 --server.headless true --browser.gatherUsageStats false "$@"
