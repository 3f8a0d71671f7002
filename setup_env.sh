#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the pinned dependencies.
# Usage: source setup_env.sh   (or: bash setup_env.sh)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$REPO/.venv/bin/python" ]; then
    "$PYTHON" -m venv "$REPO/.venv"
fi
STAMP="$REPO/.venv/.requirements.sha"
WANT="$(cat "$REPO/requirements.txt" "$REPO/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    "$REPO/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/requirements-dev.txt"
    echo "$WANT" > "$STAMP"
fi
