#!/usr/bin/env bash
# Install what the browser tests (tests/test_view_browser.py) need: Debian's chromium, when it is absent and we are
# root. Playwright itself comes with the `test` extra; it drives this executable (no browser is downloaded).
# Never fails the test run: without chromium (no root, no apt, mirror unreachable) the browser tests skip and say why.
set -uo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [[ -n "${HOOKED_VLM_CHROMIUM:-}" ]]; then
    exit 0
fi
if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no chromium, and not root with apt-get: the browser tests will skip" >&2
    exit 0
fi
echo "install_browser.sh: installing chromium with apt-get (for the browser tests)" >&2
if timeout 600 apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium >/dev/null 2>&1; then
    echo "install_browser.sh: $(chromium --version 2>/dev/null | head -1)" >&2
else
    echo "install_browser.sh: apt-get could not install chromium (no mirror reachable?): the browser tests will skip" >&2
fi
exit 0
