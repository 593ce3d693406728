#!/usr/bin/env bash
# Run the test suite, first installing and starting what the integration tests need.
#
# As root on Debian (CI, a VM): apt installs hdf5-tools (h5ls), chromium (the report's browser
# test drives it over the DevTools pipe) and a real single-node Slurm (slurm/up.sh), torn down again on exit.
# Without root the suite still runs; tests whose tools are missing skip — except when CI=true,
# where they fail instead (a green CI run must have exercised them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    command -v h5ls >/dev/null || missing+=(hdf5-tools)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "[tests/run.sh] installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    bash slurm/up.sh
    trap 'bash slurm/down.sh' EXIT
else
    echo "[tests/run.sh] not root or no apt-get: using the tools already installed"
fi

# Lint, format and types first: cheap, and a failure here should not wait for the slow suite.
if [ $# -eq 0 ]; then
    echo "[tests/run.sh] ruff check, ruff format --check, mypy cnncam"
    "$PYTHON" -m ruff check .
    "$PYTHON" -m ruff format --check .
    "$PYTHON" -m mypy cnncam
fi

"$PYTHON" -m pytest -q "$@"
