#!/usr/bin/env bash
# Install the pinned requirements into the active virtual environment, or into .venv (created if
# missing). Idempotent: does nothing when that environment already holds these requirements.
# Usage: scripts/setup.sh [dev]   ("dev" adds the test tools and Debian's chromium for browser tests)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIRTUAL_ENV:-$PWD/.venv}
req=requirements.txt
[ "${1:-}" = dev ] && req=requirements-dev.txt
stamp=$venv/.eapcore-installed-$(cat requirements.txt "$req" requirements-nodeps.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  touch "$stamp"
fi
if [ "${1:-}" = dev ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: /usr/bin/chromium missing (install Debian's chromium); the browser test will be skipped" >&2
  fi
fi
