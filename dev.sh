#!/usr/bin/env bash
# One entry point for a fresh machine: `./dev.sh demo` or `./dev.sh test` (extra args go to the command).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: with the CPU build on this disk already there, the project's torch range
    # (which 2.13.0 satisfies) installs nothing more instead of pulling a multi-GB CUDA build.
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q "torch>=2.4,<2.15"
    fi
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    test)
        setup
        # The Postgres catalog tests run wherever a Postgres answers on 127.0.0.1:5432 (trust auth,
        # database `test`, as on the dev and CI machines); say so either way.
        if [ -z "${BLIP2_TEST_DATABASE_URL:-}" ] && command -v pg_isready >/dev/null 2>&1 \
            && pg_isready -q -h 127.0.0.1 -p 5432 -d test -U postgres; then
            export BLIP2_TEST_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test"
        fi
        if [ -n "${BLIP2_TEST_DATABASE_URL:-}" ]; then
            echo "dev.sh: Postgres tests run against ${BLIP2_TEST_DATABASE_URL%%\?*}"
        else
            echo "dev.sh: Postgres tests will be SKIPPED: no Postgres on 127.0.0.1:5432 and BLIP2_TEST_DATABASE_URL unset"
        fi
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    demo)
        setup
        exec "$VENV/bin/blip2-search" demo "$@"
        ;;
    lint)
        setup
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        # Every product package; strict where pyproject.toml says (settings, search service, vector index, ...).
        "$VENV/bin/mypy" blip2_embed catalog indexer search_api blip2_search blip2_train migrations
        # The dependency rule of docs/architecture.md (tests/blip2_search/test_architecture.py runs it too).
        "$VENV/bin/python" -m blip2_search.tools.imports
        ;;
    *)
        echo "usage: ./dev.sh {demo|test|lint|setup} [args...]" >&2
        exit 2
        ;;
esac
