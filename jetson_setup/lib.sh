#!/usr/bin/env bash
# shellcheck disable=SC2034  # the settings below are used by the scripts that source this file
# Shared helpers of the Jetson set-up scripts (sourced by each, never run on its own):
# pinned versions, logging, --dry-run, the Jetson check, disk-space probes, idempotent edits.
#
# Why so careful: on this board a build cache once filled the 32 GB eMMC until the Jetson no
# longer booted. Every script therefore shows what it would do (--dry-run), refuses to change
# a machine that is not an aarch64 Jetson, checks free space before writing, and can be run
# again without changing anything twice.
#
# Overrides (tests use them to simulate a Jetson in dry-run; nothing else needs them):
#   ELMA_JETSON_RELEASE_FILE  instead of /etc/nv_tegra_release
#   ELMA_UNAME_M              instead of `uname -m`
#   ELMA_FAKE_FREE_GB         free space (GB) every probe reports
#   ELMA_FSTAB                instead of /etc/fstab
#   ELMA_LOG_DIR              where the log files go
#   ELMA_TARGET_HOME          home of the user whose ~/.bazelrc and caches are set up
# Settings:
#   ELMA_SSD_MOUNT            mount point of the external SSD (default /mnt/elma-ssd)

# --- pinned versions: jetson_setup/environment.yml must say the same (a test checks) -------
# Python 3.11 because elma_utils needs it (pyproject: requires-python >=3.11; the edge runtime
# uses zip(strict=)); numpy equals the project's requirements.txt. The interpreter is not
# requirements.txt's ai-edge-litert 2.3.0, whose shared objects need glibc 2.34: it is
# tflite-runtime 2.21.0+elma, TensorFlow 2.21.0's own aarch64 interpreter (GLIBC_2.27 at most),
# cut from its wheel by build_tflite_runtime.py (README.md, "Wheels on the TX2").
ELMA_EDGE_PYTHON_VERSION="3.11"
ELMA_EDGE_NUMPY_VERSION="2.4.6"
ELMA_EDGE_INTERPRETER_PACKAGE="tflite-runtime"
ELMA_EDGE_INTERPRETER_VERSION="2.21.0+elma"
ELMA_EDGE_TQDM_VERSION="4.70.1"
ELMA_MINIFORGE_VERSION="${ELMA_MINIFORGE_VERSION:-24.3.0-0}"
# the JetPack 4.6 target this was written for
ELMA_TARGET_L4T="R32.6.1"
# ----------------------------------------------------------------------------------------

ELMA_SSD_MOUNT="${ELMA_SSD_MOUNT:-/mnt/elma-ssd}"
ELMA_FSTAB="${ELMA_FSTAB:-/etc/fstab}"
DRY_RUN=0
ELMA_LOG_FILE=""
SUDO=()   # prefix for commands that need root: empty when already root
SUDO_H=() # the same, with HOME set to root's (pip as root)
if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    SUDO=(sudo)
    SUDO_H=(sudo -H)
fi
AS_USER=() # run as the user the set-up is for, when we are root through sudo
if [[ ${EUID:-$(id -u)} -eq 0 && -n ${SUDO_USER:-} ]]; then
    AS_USER=(sudo -u "$SUDO_USER")
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    # die CODE MESSAGE...
    local code=$1
    shift
    printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
    exit "$code"
}

quote_cmd() {
    local out=() a
    for a in "$@"; do
        out+=("$(printf '%q' "$a")")
    done
    printf '%s' "${out[*]}"
}

# run CMD...: print it; execute it unless --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$(quote_cmd "$@")"
        return 0
    fi
    printf '+ %s\n' "$(quote_cmd "$@")"
    "$@"
}

# run_in DIR CMD...: the same, inside DIR.
run_in() {
    local dir=$1
    shift
    if ((DRY_RUN)); then
        printf '[dry-run] (cd %s && %s)\n' "$(quote_cmd "$dir")" "$(quote_cmd "$@")"
        return 0
    fi
    printf '+ (cd %s && %s)\n' "$(quote_cmd "$dir")" "$(quote_cmd "$@")"
    (cd "$dir" && "$@")
}

# setup_logging NAME: everything printed from here on also goes to a log file.
setup_logging() {
    local name=${1%.sh} dir=${ELMA_LOG_DIR:-}
    if [[ -z $dir ]]; then
        if [[ -w /var/log ]]; then
            dir=/var/log/elma-jetson
        else
            dir="${HOME:-/tmp}/.local/state/elma-jetson"
        fi
    fi
    mkdir -p "$dir"
    ELMA_LOG_FILE="$dir/${name}-$(date +%Y%m%d-%H%M%S)-$$.log"
    exec > >(tee -a "$ELMA_LOG_FILE") 2>&1
    trap 'printf "[%s] ERROR: line %s: %s failed\n" "$(date +%H:%M:%S)" "$LINENO" "$BASH_COMMAND"' ERR
    log "$name: log file $ELMA_LOG_FILE"
    if ((DRY_RUN)); then
        log "dry run: commands are printed, nothing is changed"
    fi
}

# --- the machine -----------------------------------------------------------------------
jetson_release_file() { printf '%s' "${ELMA_JETSON_RELEASE_FILE:-/etc/nv_tegra_release}"; }
machine_arch() { printf '%s' "${ELMA_UNAME_M:-$(uname -m)}"; }

# l4t_release: "R32.6.1" from "# R32 (release), REVISION: 6.1, ...", empty if unknown.
l4t_release() {
    local file
    file=$(jetson_release_file)
    [[ -r $file ]] || return 0
    sed -n 's/^# \(R[0-9]*\) (release), REVISION: \([0-9.]*\),.*/\1.\2/p' "$file" | head -n 1
}

is_jetson() {
    [[ -r $(jetson_release_file) && $(machine_arch) == aarch64 ]]
}

# require_jetson: refuse to change anything on a machine that is not an aarch64 Jetson,
# unless this is a dry run (which changes nothing).
require_jetson() {
    if is_jetson; then
        local rel
        rel=$(l4t_release)
        log "Jetson: L4T ${rel:-unknown} on $(machine_arch)"
        if [[ $rel != "$ELMA_TARGET_L4T" ]]; then
            warn "written for L4T $ELMA_TARGET_L4T (JetPack 4.6); this board runs ${rel:-an unknown release}"
        fi
        return 0
    fi
    local why
    why="no $(jetson_release_file)"
    [[ -r $(jetson_release_file) ]] && why="uname -m is $(machine_arch), not aarch64"
    if ((DRY_RUN)); then
        log "not an aarch64 Jetson ($why): showing the commands only"
        return 0
    fi
    die 3 "refusing to change this machine: it is not an aarch64 Jetson ($why). Use --dry-run to see the commands."
}

# target_home: home of the user the set-up is for (the one who ran sudo, if any).
target_home() {
    if [[ -n ${ELMA_TARGET_HOME:-} ]]; then
        printf '%s' "$ELMA_TARGET_HOME"
        return
    fi
    local user=${SUDO_USER:-$(id -un)}
    getent passwd "$user" | cut -d: -f6
}
target_user() { printf '%s' "${SUDO_USER:-$(id -un)}"; }

# --- disk space ----------------------------------------------------------------------------
# free_gb PATH: free GB on the file system that holds PATH (or its nearest existing parent).
free_gb() {
    if [[ -n ${ELMA_FAKE_FREE_GB:-} ]]; then
        printf '%s' "$ELMA_FAKE_FREE_GB"
        return
    fi
    local p=$1
    while [[ ! -e $p && $p != / ]]; do
        p=$(dirname "$p")
    done
    df -Pk "$p" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'
}

# require_free_gb PATH GB WHAT: refuse (exit 4) when PATH's file system has less than GB free.
require_free_gb() {
    local path=$1 need=$2 what=$3 have
    have=$(free_gb "$path")
    if ((have < need)); then
        die 4 "refusing to start $what: $path has ${have} GB free, it needs at least ${need} GB"
    fi
    log "disk space for $what: $path has ${have} GB free (needs ${need} GB)"
}

# --- idempotent edits ----------------------------------------------------------------------
# append_line_once FILE LINE: add LINE to FILE unless FILE already has exactly that line.
append_line_once() {
    local file=$1 line=$2
    if [[ -f $file ]] && grep -qxF -- "$line" "$file"; then
        log "already in $file: $line"
        return 0
    fi
    if ((DRY_RUN)); then
        printf '[dry-run] append to %s: %s\n' "$file" "$line"
        return 0
    fi
    printf '+ append to %s: %s\n' "$file" "$line"
    if [[ -w $file || (! -e $file && -w $(dirname "$file")) ]]; then
        printf '%s\n' "$line" >>"$file"
    else
        printf '%s\n' "$line" | "${SUDO[@]}" tee -a "$file" >/dev/null
    fi
}

# write_file FILE CONTENT: (re)write FILE only when its content differs.
write_file() {
    local file=$1 content=$2
    if [[ -f $file ]] && [[ "$(cat "$file")" == "$content" ]]; then
        log "unchanged: $file"
        return 0
    fi
    if ((DRY_RUN)); then
        printf '[dry-run] write %s:\n%s\n' "$file" "$content"
        return 0
    fi
    printf '+ write %s\n' "$file"
    printf '%s\n' "$content" | "${SUDO[@]}" tee "$file" >/dev/null
}

# fstab_entry_for_mount FSTAB MOUNTPOINT: the (non-comment) line that mounts MOUNTPOINT.
fstab_entry_for_mount() {
    [[ -f $1 ]] || return 0
    awk -v m="$2" '$1 !~ /^#/ && $2 == m { print; exit }' "$1"
}

# fstab_entry_for_source FSTAB SOURCE: the (non-comment) line whose first field is SOURCE.
fstab_entry_for_source() {
    [[ -f $1 ]] || return 0
    awk -v s="$2" '$1 == s { print; exit }' "$1"
}
