#!/usr/bin/env bash
# Create .venv in the repo root and install the package editable with its test extra.
# Idempotent: a stamp file keyed on the sha256 of pyproject.toml skips the install on re-runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
TORCH_PIN="torch==2.13.0"

STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$STAMP" && -x "$VENV/bin/python" ]]; then
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    PY=""
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys' >/dev/null 2>&1; then
            PY="$cand"
            break
        fi
    done
    if [[ -z "$PY" ]]; then
        echo "setup_env.sh: no python3.11 or python3 found on PATH" >&2
        exit 1
    fi
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "setup_env.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); hooked-vlm needs >= 3.10" >&2
        exit 1
    fi
    echo "setup_env.sh: creating .venv with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
    "$PY" -m venv "$VENV"
fi

echo "setup_env.sh: installing into .venv (first run or pyproject.toml changed)" >&2
rm -f "$VENV"/.installed-*
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# torch first and pinned: on a CPU-only machine this resolves to the local CPU build; leaving it to the
# resolver of the editable install could pull a multi-GB CUDA build.
"${PIP[@]}" install "$TORCH_PIN"
"${PIP[@]}" install -e ".[test]"
touch "$STAMP"
echo "setup_env.sh: done" >&2
