#!/usr/bin/env bash
# 00 — the Debian packages the other steps need (Ubuntu 18.04 of JetPack 4.6).
# Installs only what is missing, so a second run changes nothing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# libsndfile1 and libportaudio2: the device program's soundfile and sounddevice load them through
# ctypes (soundfile's aarch64 wheel with its own libsndfile needs glibc 2.28, so the board gets
# the none-any wheel); binutils: readelf for jetson_setup/check_wheels.py; espeak-ng: the device
# says its answers with it, and 04_verify.sh's self-test speaks its test question with it.
PACKAGES=(
    build-essential pkg-config git curl wget ca-certificates zip unzip rsync htop
    python3-pip python3-dev libssl-dev openssh-client
    e2fsprogs util-linux parted
    libsndfile1 libportaudio2 binutils espeak-ng
)
WITH_JETPACK=0

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--dry-run] [--with-jetpack]

Installs the system packages of the ELMA edge set-up: ${PACKAGES[*]}.
  --with-jetpack  also the nvidia-jetpack meta package (CUDA 10.2, cuDNN 8.2.1,
                  TensorRT 8.0.1 headers and tools), when the board was flashed without them;
                  about 2.5 GB on the eMMC
  --dry-run       print the commands, change nothing
USAGE
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --dry-run) DRY_RUN=1 ;;
    --with-jetpack) WITH_JETPACK=1 ;;
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

setup_logging "$(basename "$0")"
require_jetson

wanted=("${PACKAGES[@]}")
if ((WITH_JETPACK)); then
    wanted+=(nvidia-jetpack)
fi

missing=()
for pkg in "${wanted[@]}"; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        continue
    fi
    missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    log "all ${#wanted[@]} packages are installed already; nothing to do"
    exit 0
fi

log "missing: ${missing[*]}"
need=2
((WITH_JETPACK)) && need=4
require_free_gb / "$need" "the apt install on the eMMC"
run "${SUDO[@]}" apt-get update
run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
run "${SUDO[@]}" apt-get clean
log "done: ${#missing[@]} packages installed"
