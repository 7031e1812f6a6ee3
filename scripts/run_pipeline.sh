#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run notebooks/ in order with papermill:
#   bash scripts/run_pipeline.sh [PROFILE] [elma pipeline options]
# PROFILE: smoke | cpu (default) | full | cpu-v2 | full-v2 (see elma_utils/config.py).
# Options go to `elma pipeline`, e.g. --only 02,03 --force.
# Finished notebooks are skipped on the next run (reports/runs/state-PROFILE.json);
# results: reports/REPORT.md, reports/metrics/, reports/figures/, executed copies in reports/runs/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

profile=cpu
if [[ $# -gt 0 && "$1" != -* ]]; then
    profile="$1"
    shift
fi

bash scripts/setup.sh
# shellcheck source=/dev/null
source scripts/allocator.sh
elma_preload_tcmalloc
exec "${ELMA_VENV:-$ROOT/.venv}/bin/elma" pipeline --profile "$profile" "$@"
