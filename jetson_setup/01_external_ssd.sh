#!/usr/bin/env bash
# 01 — the external SSD: (format only when asked,) mount by UUID from /etc/fstab, move Bazel's
# output root and the pip/conda/apt caches onto it, and put a swap file there.
#
# Why: the TX2's 32 GB eMMC holds the whole system. A Bazel cache once filled it until the board
# no longer booted, so everything that grows (build trees, caches, swap) lives on the SSD.
# The fstab entry uses the file system's UUID (device names such as /dev/sda1 change with USB
# order) and `nofail`, so the board still boots when the SSD is unplugged.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEVICE=""
MOUNT=$ELMA_SSD_MOUNT
FORMAT=0
SWAP_GB=8
LABEL=elma-ssd

usage() {
    cat <<USAGE
Usage: $(basename "$0") --device DEV [--mount DIR] [--format] [--swap-gb N] [--dry-run]

  --device DEV   the SSD's partition, e.g. /dev/sda1 (never the eMMC, /dev/mmcblk0*)
  --mount DIR    mount point (default $ELMA_SSD_MOUNT; ELMA_SSD_MOUNT sets it for every script)
  --format       create a new ext4 file system on DEV first: ERASES DEV. Without it the
                 existing ext4 file system is used and nothing is formatted.
  --swap-gb N    swap file size on the SSD in GB (default $SWAP_GB; 0: no swap file)
  --dry-run      print the commands, change nothing
USAGE
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --device)
        DEVICE=${2:?--device needs a value}
        shift
        ;;
    --mount)
        MOUNT=${2:?--mount needs a value}
        shift
        ;;
    --swap-gb)
        SWAP_GB=${2:?--swap-gb needs a value}
        shift
        ;;
    --format) FORMAT=1 ;;
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

[[ -n $DEVICE ]] || {
    usage >&2
    die 2 "--device is required"
}
[[ $SWAP_GB =~ ^[0-9]+$ ]] || die 2 "--swap-gb takes a whole number of GB, got '$SWAP_GB'"
[[ $MOUNT == /* ]] || die 2 "--mount must be an absolute path, got '$MOUNT'"

setup_logging "$(basename "$0")"
require_jetson

# --- safety checks (read-only, also in a dry run) ----------------------------------------------
root_source=$(findmnt -n -o SOURCE / 2>/dev/null || true)
if [[ $DEVICE == /dev/mmcblk0* || $DEVICE == "$root_source" ]]; then
    die 5 "refusing to use $DEVICE: it is the eMMC / root file system, not the external SSD"
fi
if [[ ! -b $DEVICE ]]; then
    if ((DRY_RUN)); then
        warn "$DEVICE is not a block device here (dry run goes on)"
    else
        die 5 "$DEVICE is not a block device (lsblk lists the disks)"
    fi
fi

# --- the file system and its UUID --------------------------------------------------------------
if ((FORMAT)); then
    if findmnt -rn -S "$DEVICE" >/dev/null 2>&1; then
        die 5 "refusing to format $DEVICE: it is mounted (umount it first)"
    fi
    # choose the UUID ourselves, so the fstab line is known before mkfs runs
    UUID=${ELMA_FAKE_UUID:-$(cat /proc/sys/kernel/random/uuid)}
    warn "--format: everything on $DEVICE will be erased"
    run "${SUDO[@]}" mkfs.ext4 -F -L "$LABEL" -U "$UUID" "$DEVICE"
else
    if [[ -n ${ELMA_FAKE_UUID:-} ]]; then
        UUID=$ELMA_FAKE_UUID
        FSTYPE=ext4
    else
        UUID=$(blkid -s UUID -o value "$DEVICE" 2>/dev/null || true)
        FSTYPE=$(blkid -s TYPE -o value "$DEVICE" 2>/dev/null || true)
    fi
    if [[ -z $UUID ]]; then
        if ((DRY_RUN)); then
            UUID="UUID-OF-${DEVICE##*/}"
            warn "no file system found on $DEVICE; a real run stops here (add --format to create one)"
        else
            die 5 "no file system on $DEVICE: add --format to create one (erases $DEVICE)"
        fi
    elif [[ $FSTYPE != ext4 ]]; then
        die 5 "$DEVICE holds $FSTYPE, not ext4 (swap files and Unix permissions need ext4): use --format"
    fi
fi
log "SSD: $DEVICE, UUID $UUID, mount point $MOUNT"

# --- /etc/fstab: mount by UUID -------------------------------------------------------------------
FSTAB_LINE="UUID=$UUID $MOUNT ext4 defaults,nofail,noatime,x-systemd.device-timeout=10s 0 2"
existing=$(fstab_entry_for_mount "$ELMA_FSTAB" "$MOUNT")
if [[ -n $existing && $existing != UUID=$UUID* ]]; then
    die 5 "$ELMA_FSTAB already mounts something else on $MOUNT: '$existing' (edit it by hand)"
fi
other=$(fstab_entry_for_source "$ELMA_FSTAB" "UUID=$UUID")
if [[ -n $other && $(awk '{print $2}' <<<"$other") != "$MOUNT" ]]; then
    die 5 "$ELMA_FSTAB already mounts UUID=$UUID elsewhere: '$other'"
fi
if [[ -n $existing ]]; then
    log "already in $ELMA_FSTAB: $existing"
else
    append_line_once "$ELMA_FSTAB" "$FSTAB_LINE"
fi

run "${SUDO[@]}" mkdir -p "$MOUNT"
if mountpoint -q "$MOUNT" 2>/dev/null; then
    log "$MOUNT is mounted already"
else
    run "${SUDO[@]}" mount -T "$ELMA_FSTAB" "$MOUNT"
fi
if ((!DRY_RUN)) && ! mountpoint -q "$MOUNT"; then
    die 5 "$MOUNT is not a mount point after mounting: stopping before anything is written to the eMMC"
fi

# --- caches and Bazel's output root on the SSD -----------------------------------------------------
USER_NAME=$(target_user)
USER_HOME=$(target_home)
BAZEL_ROOT=$MOUNT/bazel
PIP_CACHE=$MOUNT/cache/pip
CONDA_PKGS=$MOUNT/cache/conda-pkgs
APT_ARCHIVES=$MOUNT/cache/apt/archives

run "${SUDO[@]}" mkdir -p "$BAZEL_ROOT" "$PIP_CACHE" "$CONDA_PKGS" "$APT_ARCHIVES/partial" "$MOUNT/tmp" "$MOUNT/src"
run "${SUDO[@]}" chown "$USER_NAME:" "$BAZEL_ROOT" "$PIP_CACHE" "$CONDA_PKGS" "$MOUNT/tmp" "$MOUNT/src"
run "${SUDO[@]}" chmod 1777 "$MOUNT/tmp"

# Bazel: every bazel command of this user gets --output_user_root on the SSD ...
append_line_once "$USER_HOME/.bazelrc" "startup --output_user_root=$BAZEL_ROOT"
if [[ $(stat -c %U "$USER_HOME/.bazelrc" 2>/dev/null) != "$USER_NAME" ]]; then
    run "${SUDO[@]}" chown "$USER_NAME:" "$USER_HOME/.bazelrc"
fi
# ... and the default location (~/.cache/bazel) points there too, for tools that bypass ~/.bazelrc
if [[ -L $USER_HOME/.cache/bazel && $(readlink "$USER_HOME/.cache/bazel") == "$BAZEL_ROOT" ]]; then
    log "already a link: $USER_HOME/.cache/bazel -> $BAZEL_ROOT"
else
    if [[ -e $USER_HOME/.cache/bazel ]]; then
        run "${SUDO[@]}" mv "$USER_HOME/.cache/bazel" "$BAZEL_ROOT/moved-from-emmc-$(date +%Y%m%d%H%M%S)"
    fi
    run "${AS_USER[@]}" mkdir -p "$USER_HOME/.cache"
    run "${AS_USER[@]}" ln -s "$BAZEL_ROOT" "$USER_HOME/.cache/bazel"
fi

# pip and conda caches: /etc/environment is read at login by every user (pip 9 on 18.04 has no
# `pip config`); apt archives: an apt.conf.d snippet.
append_line_once /etc/environment "PIP_CACHE_DIR=$PIP_CACHE"
append_line_once /etc/environment "CONDA_PKGS_DIRS=$CONDA_PKGS"
write_file /etc/apt/apt.conf.d/90elma-ssd-cache "Dir::Cache::archives \"$APT_ARCHIVES\";"
run "${SUDO[@]}" apt-get clean

# --- swap file -------------------------------------------------------------------------------------
if ((SWAP_GB > 0)); then
    SWAPFILE=$MOUNT/swapfile
    want_bytes=$((SWAP_GB * 1024 * 1024 * 1024))
    have_bytes=$(stat -c %s "$SWAPFILE" 2>/dev/null || echo 0)
    if ((have_bytes == want_bytes)); then
        log "swap file $SWAPFILE exists with ${SWAP_GB} GB"
    else
        if swapon --show=NAME --noheadings 2>/dev/null | grep -qxF "$SWAPFILE"; then
            run "${SUDO[@]}" swapoff "$SWAPFILE"
        fi
        require_free_gb "$MOUNT" $((SWAP_GB + 1)) "a ${SWAP_GB} GB swap file"
        run "${SUDO[@]}" fallocate -l "${SWAP_GB}G" "$SWAPFILE"
        run "${SUDO[@]}" chmod 600 "$SWAPFILE"
        run "${SUDO[@]}" mkswap "$SWAPFILE"
    fi
    if swapon --show=NAME --noheadings 2>/dev/null | grep -qxF "$SWAPFILE"; then
        log "swap file $SWAPFILE is active"
    else
        run "${SUDO[@]}" swapon "$SWAPFILE"
    fi
    append_line_once "$ELMA_FSTAB" "$SWAPFILE none swap sw,nofail 0 0"
fi

log "done: SSD mounted at $MOUNT; Bazel output root $BAZEL_ROOT; caches under $MOUNT/cache"
