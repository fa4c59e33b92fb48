#!/usr/bin/env bash
# Set up (with test tools and chromium) and run the whole test suite in one pytest process.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIRTUAL_ENV:-$PWD/.venv}
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
set +e
"$venv/bin/"python -m pytest -q -p no:cacheprovider --durations=10 "$@"
rc=$?
set -e
if [ $rc = 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
