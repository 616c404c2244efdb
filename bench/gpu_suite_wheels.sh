#!/usr/bin/env bash
# Fetch, on this machine, the wheels bench/gpu_suite.sh needs on the GPU machine, whose python3 (3.12)
# has torch, transformers, torchvision, numpy and Pillow but not the project's web and catalog stack.
# Into .whl/ (git-ignored; ~30 MB): name it in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    "fastapi>=0.115" "uvicorn>=0.30" "python-multipart>=0.0.9" "sqlalchemy>=2.0" "alembic>=1.13" \
    "faiss-cpu>=1.9" "pydantic>=2.7" "pydantic-settings>=2.3"
# What the GPU machine has stays its own (torch and torchvision are built against its numpy and Pillow);
# typing-extensions and anyio travel because pydantic and starlette need recent ones. No pillow-heif:
# the suite makes no HEIC files, and blip2_embed.images runs without it.
rm -f .whl/numpy-*.whl .whl/pillow-*.whl .whl/packaging-*.whl .whl/idna-*.whl .whl/click-*.whl \
    .whl/h11-*.whl .whl/markupsafe-*.whl .whl/annotated_doc-*.whl
du -sh .whl && ls .whl
