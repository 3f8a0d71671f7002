#!/usr/bin/env bash
# Set everything up, then run the whole test suite.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$REPO/setup_env.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m pytest tests -q -rs "$@"
