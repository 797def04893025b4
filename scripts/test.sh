#!/usr/bin/env bash
# Run the test suite in .venv (created on first use). Extra arguments go to pytest.
# Fails on test failures and also when no test was collected (pytest exit code 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
bash scripts/install_browser.sh  # chromium for tests/test_view_browser.py (skipped without it)

rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test.sh: no tests were collected; treating as failure" >&2
fi
exit "$rc"
