#!/usr/bin/env bash
# Set everything up, then train on the real platelet SBF-SEM sample, segment it, print metrics, draw a picture.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$REPO/setup_env.sh"
cd "$REPO"
exec "$REPO/.venv/bin/python" -m tools.demo --workdir ../runs/demo "$@"
