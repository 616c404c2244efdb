#!/usr/bin/env bash
# Issue 13's device check: every row of the speed table, ours beside plain transformers, in under
# 8 minutes on one H200 (bench/gpu_suite.py says what each row measures).
#
#   bench/gpu_suite.sh               # on the GPU machine: bench/results/gpu_suite*-<gpu>.json (+ $OUT)
#   bench/gpu_suite.sh --tiny        # tiny shapes on this machine's CPU: the same code paths
#
# It installs nothing and fetches nothing. It runs under the GPU machine's python3, which has torch,
# transformers and torchvision; the project's other dependencies (FastAPI, SQLAlchemy, faiss, ...)
# travel as wheels in .whl/ (made here by bench/gpu_suite_wheels.sh; name .whl in the device call's
# carry), which are unzipped into a temporary folder put on PYTHONPATH when that python lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null 2>&1; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import fastapi, sqlalchemy, faiss, pydantic_settings" 2>/dev/null; then
    SITE=$(mktemp -d)
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv

# The suite saves its JSON after every row, so a run stopped at the limit still leaves what it measured.
timeout 470 "$PY" bench/gpu_suite.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_suite.log"
exit "${PIPESTATUS[0]}"
