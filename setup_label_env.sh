#!/usr/bin/env bash
# Create (or reuse) .venv-label, the environment that runs the MONAI Label 0.8.5 server with this bundle.
# It is separate from .venv: monailabel needs torchvision, which only the torch pair in requirements-label.txt has.
# Usage: bash setup_label_env.sh   (a second call installs nothing; about 5.5 GB on disk, mostly CUDA libraries)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$REPO/.venv-label"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Keep git away from the environment even where .gitignore lacks the line (Python >= 3.13's venv does the same).
[ -f "$VENV/.gitignore" ] || printf '*\n' > "$VENV/.gitignore"
STAMP="$VENV/.requirements.sha"
WANT="$(cat "$REPO/requirements.txt" "$REPO/requirements-label.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    # requirements.txt pins torch for .venv; here torch comes from requirements-label.txt instead.
    grep -v -E '^[[:space:]]*torch([^A-Za-z0-9_.-]|$)' "$REPO/requirements.txt" > "$TMP/base.txt"
    grep -v -E '#[[:space:]]*no-deps' "$REPO/requirements-label.txt" > "$TMP/label.txt"
    grep -E '#[[:space:]]*no-deps' "$REPO/requirements-label.txt" | sed 's/#.*//' > "$TMP/nodeps.txt"
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${PIP[@]}" -r "$TMP/base.txt" -r "$TMP/label.txt"
    # monailabel's declared dependencies include sam2 (a source build that hangs) and numpy<2 pins: skip them.
    "${PIP[@]}" --no-deps -r "$TMP/nodeps.txt"
    # Stamp only an environment whose server imports (this is what failed, one module at a time, without the list).
    "$VENV/bin/python" -c "import torchvision, monailabel.app, monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle" \
        > /dev/null
    echo "$WANT" > "$STAMP"
fi
