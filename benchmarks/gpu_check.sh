#!/usr/bin/env bash
# The GPU checks in one command (at most 8 minutes on one GPU); see benchmarks/gpu_check.py.
#
#   CPS_KODAK=/data/kodak benchmarks/gpu_check.sh [--output-dir DIR] [--dry-run]
#
# Writes gpu_check.json and gpu_check.md (default: benchmarks/results/local/gpu_check/);
# exits 1 if a check fails. PYTHON overrides the interpreter (default: .venv/bin/python
# when present, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    python=python3
    [[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
fi
exec timeout --signal=INT --kill-after=10 480 "$python" "$root/benchmarks/gpu_check.py" "$@"
