#!/usr/bin/env bash
# 03 — performance mode for benchmarks: nvpmodel MAXN (mode 0 on a TX2: all six cores, 2 GHz)
# and jetson_clocks (clocks pinned at their maximum, fan on), so latency and energy numbers
# do not depend on the governor's mood. --restore goes back to the state saved on the first run.
#
# TX2 modes: 0 MAXN, 1 MAXQ, 2 MAXP_CORE_ALL, 3 MAXP_CORE_ARM, 4 MAXP_CORE_DENVER.
# nvpmodel's mode survives a reboot; jetson_clocks does not (run this again after booting).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE=0
RESTORE=0
STATE_DIR=${ELMA_STATE_DIR:-/var/lib/elma-jetson}

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--mode N] [--restore] [--dry-run]

  --mode N    nvpmodel mode (default 0 = MAXN on a TX2)
  --restore   back to the clocks and the mode saved before the first change (in $STATE_DIR)
  --dry-run   print the commands, change nothing
USAGE
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --mode)
        MODE=${2:?--mode needs a value}
        shift
        ;;
    --restore) RESTORE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die 2 "unknown option: $1"
        ;;
    esac
    shift
done
[[ $MODE =~ ^[0-9]+$ ]] || die 2 "--mode takes a number, got '$MODE'"

setup_logging "$(basename "$0")"
require_jetson

CLOCKS_SAVED=$STATE_DIR/jetson_clocks.defaults
MODE_SAVED=$STATE_DIR/nvpmodel.previous

# current_mode: the number nvpmodel -q prints on its last line ("NV Power Mode: MAXN" / "0").
current_mode() {
    nvpmodel -q 2>/dev/null | awk '$1 ~ /^[0-9]+$/ && NF == 1 { m = $1 } END { print m }' || true
}

if ((RESTORE)); then
    if [[ -f $CLOCKS_SAVED ]]; then
        run "${SUDO[@]}" jetson_clocks --restore "$CLOCKS_SAVED"
    else
        warn "no saved clocks in $CLOCKS_SAVED: nothing to restore"
    fi
    if [[ -f $MODE_SAVED ]]; then
        run "${SUDO[@]}" nvpmodel -m "$(cat "$MODE_SAVED")"
    fi
    exit 0
fi

now=$(current_mode)
log "nvpmodel mode now: ${now:-unknown}, wanted: $MODE"
run "${SUDO[@]}" mkdir -p "$STATE_DIR"
if [[ ! -f $MODE_SAVED && -n $now ]]; then
    write_file "$MODE_SAVED" "$now"
fi
if [[ $now == "$MODE" ]]; then
    log "nvpmodel is in mode $MODE already"
else
    run "${SUDO[@]}" nvpmodel -m "$MODE"
fi

if [[ -f $CLOCKS_SAVED ]]; then
    log "default clocks were saved before: $CLOCKS_SAVED"
else
    run "${SUDO[@]}" jetson_clocks --store "$CLOCKS_SAVED"
fi
run "${SUDO[@]}" jetson_clocks
run "${SUDO[@]}" jetson_clocks --show
log "done: nvpmodel mode $MODE, clocks at maximum (03_performance_mode.sh --restore undoes it)"
