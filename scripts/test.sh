#!/usr/bin/env bash
# Run the test suite in .venv (created on first use). Extra arguments go to pytest.
# By default the tests marked `slow` (real-shaped models, several processes) are left out, which keeps the run under
# 10 minutes on a 2-core machine; `--all`, or CI=true (as .ci/run is called in CI), runs every test, and a `-m` of
# your own replaces the default selection.
# Fails on test failures and also when no test was collected (pytest exit code 5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
bash scripts/install_browser.sh  # chromium for tests/test_view_browser.py (skipped without it)

all=0
[[ "${CI:-}" == "true" ]] && all=1
args=()
for arg in "$@"; do
    if [[ "$arg" == "--all" ]]; then all=1; else args+=("$arg"); fi
done
select=()
if [[ $all -eq 0 && " ${args[*]-} " != *" -m "* && " ${args[*]-} " != *" -m="* ]]; then
    select=(-m "not slow")
    echo "test.sh: leaving out the tests marked slow (bash scripts/test.sh --all runs them too)" >&2
fi

rc=0
.venv/bin/python -m pytest ${select[@]+"${select[@]}"} ${args[@]+"${args[@]}"} || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test.sh: no tests were collected; treating as failure" >&2
fi
exit "$rc"
