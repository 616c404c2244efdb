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
        ;;
    *)
        echo "usage: ./dev.sh {demo|test|lint|setup} [args...]" >&2
        exit 2
        ;;
esac
