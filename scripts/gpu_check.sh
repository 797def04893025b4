#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: half-precision parity with transformers on the GPU, sweeps with their
# caches on the CPU equal to the default, peak GPU memory of each analysis (benchmarks/bench_scale.py) and the speed
# of the InstructBLIP forward and generation. Writes its logs and tables to $OUT (default gpu_check/).
#
#     bash scripts/gpu_check.sh            # uses .venv if present, else python3 (which must import torch with CUDA)
#     PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Installs nothing: on a machine without the package registries, bring a Python that already has torch (CUDA build),
# transformers and this package's other dependencies; this folder is put on PYTHONPATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-$ROOT/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check.sh: $PYTHON has no CUDA device (torch.cuda.is_available() is False); nothing to check" >&2
    exit 1
fi
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)' \
    | tee "$OUT/device.txt"

status=0
echo "== parity and exactness on CUDA (tests/test_cuda.py, the CUDA test of tests/test_sweep_memory.py)"
"$PYTHON" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py tests/test_sweep_memory.py -k "cuda" \
    2>&1 | tee "$OUT/parity.log" || status=1

echo "== peak memory per analysis (benchmarks/bench_scale.py)"
"$PYTHON" benchmarks/bench_scale.py --device cuda --dtype float16 2>&1 | tee "$OUT/bench_scale.md" || status=1

echo "== speed: InstructBLIP forward, cache and generation against HF"
"$PYTHON" benchmarks/bench_instructblip.py --device cuda --repeats 10 2>&1 | tee "$OUT/bench_instructblip.md" \
    || status=1

echo "gpu_check.sh: logs and tables in $OUT (exit $status)"
exit "$status"
