#!/usr/bin/env bash
# Set up (scripts/setup.sh), then every check, in this order:
#   ruff check . · ruff format --check . · pytest tests · the notebooks under nbval ·
#   the checks on what the notebooks recorded (tests/test_notebook_records.py)
# The notebooks run in the smoke profile, then in smoke-albert: ELMA_PROFILE is what their
# `parameters` cell reads when no profile is injected. The record checks run last, so that the
# smoke run's metrics they check exist on a clean clone too. Every step runs even after a failure; the exit
# status is non-zero when any step failed (pytest's "no tests collected" counts as a
# failure). The last line is the total: "total: N passed, N failed, N skipped".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT" || exit 1
VENV="${ELMA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

passed=0
failed=0
skipped=0
summary=()

if ! bash scripts/setup.sh; then
    echo "test: scripts/setup.sh failed; nothing else was run"
    echo "total: 0 passed, 1 failed"
    exit 1
fi

# shellcheck source=/dev/null
source scripts/allocator.sh
elma_preload_tcmalloc

RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT

# One check that is not a test runner (a linter): counts as one pass or one failure.
check() {
    local label="$1"
    shift
    echo "=== $label"
    if "$@"; then
        passed=$((passed + 1))
        summary+=("$label: ok")
    else
        failed=$((failed + 1))
        summary+=("$label: FAILED")
    fi
}

# pytest, counted test by test from its junit xml.
run_pytest() {
    local label="$1" xml="$RESULTS/$2.xml" rc counts p f s
    shift 2
    echo "=== $label"
    "$@" --junitxml="$xml"
    rc=$?
    if [[ -f "$xml" ]]; then
        counts="$("$PY" - "$xml" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"] + n["errors"], n["skipped"])
PYEOF
        )" || counts="0 0 0"
    else
        counts="0 0 0"
    fi
    read -r p f s <<<"$counts"
    if [[ $rc -ne 0 && $f -eq 0 ]]; then
        f=1 # no tests collected (exit 5), an internal error, an interrupted run ...
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    skipped=$((skipped + s))
    if [[ $rc -eq 5 ]]; then
        summary+=("$label: FAILED, no tests collected")
    elif [[ $rc -ne 0 ]]; then
        summary+=("$label: FAILED (pytest exit $rc): $p passed, $f failed, $s skipped")
    else
        summary+=("$label: $p passed, $s skipped")
    fi
}

check "ruff check" "$VENV/bin/ruff" check .
check "ruff format" "$VENV/bin/ruff" format --check .
run_pytest "tests" unit "$PY" -m pytest -q tests --ignore=tests/test_notebook_records.py
ELMA_PROFILE=smoke run_pytest "notebooks (nbval, smoke)" nbval \
    "$PY" -m pytest -q --nbval-lax --nbval-current-env notebooks/
# The same notebooks on the ALBERT path (tiny random ALBERT, one shared layer, 30k SentencePiece);
# reports to a temporary directory so that the committed reports/profiles/smoke-albert/ stay as
# `elma pipeline --profile smoke-albert` wrote them.
ELMA_PROFILE=smoke-albert ELMA_REPORTS_DIR="$RESULTS/reports-smoke-albert" \
    run_pytest "notebooks (nbval, smoke-albert)" nbval-albert \
    "$PY" -m pytest -q --nbval-lax --nbval-current-env notebooks/
run_pytest "notebook records (cpu, smoke, smoke-albert)" records "$PY" -m pytest -q tests/test_notebook_records.py

echo
echo "=== summary"
for line in "${summary[@]}"; do
    echo "  $line"
done
echo "total: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
