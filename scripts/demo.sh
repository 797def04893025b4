#!/usr/bin/env bash
# Run the demo (hooked_vlm.demo) in .venv (created on first use). Extra arguments go to the demo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
exec .venv/bin/python -m hooked_vlm.demo "$@"
