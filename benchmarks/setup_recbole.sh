#!/usr/bin/env bash
# Create the isolated RecBole 1.2.1 venv used by benchmarks/recbole_anchor.py.
#
#   benchmarks/setup_recbole.sh [VENV]      (default: .venv-recbole in the repository root)
#
# RecBole never goes into the project's .venv: it needs old numpy/pandas/scipy. torch is pinned
# FIRST and exactly, so that pip takes the machine's CPU build and never pulls CUDA wheels;
# everything after it installs under a constraint that keeps that torch. Idempotent: a stamp in
# the venv records the pins, and a second run with the same pins does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-recbole}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
# recbole 1.2.1 predates numpy 2 (np.float_ etc.), pandas 2.3 and scipy 1.14 (removed APIs);
# it imports ray, whose 2.x wheels import pkg_resources (gone in setuptools 81).
PINS=(
    "recbole==1.2.1"
    "numpy<2"
    "pandas<2.3"
    "scipy<1.14"
    "setuptools<81"
)
STAMP="$VENV/.recbole-installed"
WANT="$TORCH_PIN ${PINS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c "import recbole" 2>/dev/null; then
    echo "RecBole venv already set up: $VENV ($("$VENV/bin/python" -c 'import recbole, torch; print("recbole", recbole.__version__, "torch", torch.__version__)'))"
    exit 0
fi

PY="$VENV/bin/python"
test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_PIN"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
CONSTRAINTS="$VENV/recbole-constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"
"$PY" -m pip install -q -c "$CONSTRAINTS" "${PINS[@]}"

if "$PY" -m pip list 2>/dev/null | grep -qiE '^(nvidia-|triton )'; then
    echo "error: CUDA wheels were installed into $VENV; remove the folder and re-run (torch must come first)" >&2
    exit 1
fi
"$PY" - <<'EOF'
import os
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
import numpy, pandas, scipy, torch
import recbole
from recbole.quick_start import run_recbole  # imports ray, pkg_resources, the trainers
from recbole.model.sequential_recommender import SASRec
print(f"recbole {recbole.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"pandas {pandas.__version__}, scipy {scipy.__version__}")
EOF
echo "$WANT" > "$STAMP"
echo "RecBole venv ready: $VENV"
