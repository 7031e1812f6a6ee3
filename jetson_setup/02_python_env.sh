#!/usr/bin/env bash
# 02 — the device program's Python: Python 3.11 (Miniforge, on the SSD) next to the system's 3.6,
# with everything the device program imports (pyproject's `edge` extra: the LiteRT interpreter,
# NumPy, faster-whisper/CTranslate2/onnxruntime, pocketsphinx, librosa, paramiko, ... and their
# runtime dependencies, all pinned) from jetson_setup/environment.yml, and this repository
# installed into it (no dependencies: the edge needs no TensorFlow or Keras).
# Every pinned wheel's shared objects load on JetPack 4.6's glibc 2.27 (check_wheels.py; README.md,
# "Wheels on the TX2"). The LiteRT interpreter is tflite-runtime 2.21.0+elma: build_tflite_runtime.py
# cuts it from TensorFlow 2.21.0's aarch64 wheel (sha256-checked) into $ELMA_SSD_MOUNT/wheels, where
# conda's pip step finds it (PIP_FIND_LINKS).
#
# Why Miniforge: Ubuntu 18.04 has no Python 3.11 package, and conda-forge's aarch64 Python runs
# on its glibc 2.27; the pip wheels pinned in environment.yml are manylinux_2_27 aarch64 wheels.
# Why not the system Python 3.6: elma_utils needs 3.11 (pyproject), and no current NumPy or
# LiteRT wheel exists for 3.6. NVIDIA's JetPack TensorFlow wheel (for the system's 3.6) is the
# alternative, --with-jetpack-tf: tf.lite.Interpreter there, for comparisons outside elma_utils.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
CONDA_DIR=$ELMA_SSD_MOUNT/miniforge3
PREFIX=$ELMA_SSD_MOUNT/envs/elma-edge
WITH_JETPACK_TF=0
JETPACK_TF_INDEX=${ELMA_JETPACK_TF_INDEX:-https://developer.download.nvidia.com/compute/redist/jp/v46}
JETPACK_TF_SPEC=${ELMA_JETPACK_TF_SPEC:-tensorflow==2.5.0+nv21.8}

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--prefix DIR] [--conda-dir DIR] [--repo DIR] [--with-jetpack-tf] [--dry-run]

  --prefix DIR       the environment (default $PREFIX)
  --conda-dir DIR    where Miniforge $ELMA_MINIFORGE_VERSION goes (default $CONDA_DIR)
  --repo DIR         this repository, installed into the environment (default $REPO)
  --with-jetpack-tf  also NVIDIA's TensorFlow wheel for the system Python 3.6
                     ($JETPACK_TF_SPEC from $JETPACK_TF_INDEX;
                     ELMA_JETPACK_TF_SPEC / ELMA_JETPACK_TF_INDEX change them)
  --dry-run          print the commands, change nothing
Run it as your user (not with sudo): the environment belongs to whoever runs it.
USAGE
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --prefix)
        PREFIX=${2:?--prefix needs a value}
        shift
        ;;
    --conda-dir)
        CONDA_DIR=${2:?--conda-dir needs a value}
        shift
        ;;
    --repo)
        REPO=${2:?--repo needs a value}
        shift
        ;;
    --with-jetpack-tf) WITH_JETPACK_TF=1 ;;
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

setup_logging "$(basename "$0")"
require_jetson

ENV_FILE=$REPO/jetson_setup/environment.yml
[[ -f $ENV_FILE ]] || die 2 "no $ENV_FILE (is --repo the ELMA repository?)"
if [[ ${EUID:-$(id -u)} -eq 0 && -n ${SUDO_USER:-} ]]; then
    warn "running under sudo: the environment will belong to root, not $SUDO_USER"
fi

# --- everything goes to the SSD ------------------------------------------------------------------
if [[ $PREFIX == "$ELMA_SSD_MOUNT"/* ]] && ! mountpoint -q "$ELMA_SSD_MOUNT" 2>/dev/null; then
    if ((DRY_RUN)); then
        warn "$ELMA_SSD_MOUNT is not mounted (01_external_ssd.sh mounts it); a real run stops here"
    else
        die 5 "$ELMA_SSD_MOUNT is not mounted: run 01_external_ssd.sh first (the eMMC has no room for this)"
    fi
fi
require_free_gb "$PREFIX" 6 "the Python environment"
CACHE_ENV=(env "PIP_CACHE_DIR=$ELMA_SSD_MOUNT/cache/pip" "CONDA_PKGS_DIRS=$ELMA_SSD_MOUNT/cache/conda-pkgs")

# --- Miniforge ---------------------------------------------------------------------------------------
if [[ -x $CONDA_DIR/bin/conda ]]; then
    log "Miniforge is installed: $CONDA_DIR"
else
    installer=Miniforge3-$ELMA_MINIFORGE_VERSION-Linux-aarch64.sh
    url=https://github.com/conda-forge/miniforge/releases/download/$ELMA_MINIFORGE_VERSION/$installer
    dl=$ELMA_SSD_MOUNT/src
    run mkdir -p "$dl"
    run curl -fsSL -o "$dl/$installer" "$url"
    run curl -fsSL -o "$dl/$installer.sha256" "$url.sha256"
    # the .sha256 file holds the hash (and maybe the name): compare the hash only
    if ((DRY_RUN)); then
        printf '[dry-run] check: sha256sum %s equals the hash in %s\n' "$dl/$installer" "$dl/$installer.sha256"
    else
        want=$(awk '{print $1; exit}' "$dl/$installer.sha256")
        have=$(sha256sum "$dl/$installer" | awk '{print $1}')
        [[ $want == "$have" ]] || die 6 "$installer: sha256 $have, expected $want (download corrupt?)"
        log "sha256 of $installer checked"
    fi
    run bash "$dl/$installer" -b -p "$CONDA_DIR"
fi

# --- the LiteRT interpreter's wheel (no index has it) --------------------------------------------------
WHEELS=$ELMA_SSD_MOUNT/wheels
run "${CACHE_ENV[@]}" "$CONDA_DIR/bin/python" "$REPO/jetson_setup/build_tflite_runtime.py" \
    --out "$WHEELS" --cache "$ELMA_SSD_MOUNT/cache/wheels"

# --- the environment -------------------------------------------------------------------------------
if [[ -x $PREFIX/bin/python ]]; then
    run "${CACHE_ENV[@]}" "PIP_FIND_LINKS=$WHEELS" "$CONDA_DIR/bin/conda" env update -p "$PREFIX" -f "$ENV_FILE" --prune
else
    run "${CACHE_ENV[@]}" "PIP_FIND_LINKS=$WHEELS" "$CONDA_DIR/bin/conda" env create -p "$PREFIX" -f "$ENV_FILE"
fi
run "${CACHE_ENV[@]}" "$PREFIX/bin/python" -m pip install --no-deps -e "$REPO"
run "$PREFIX/bin/python" "$REPO/jetson_setup/verify_edge.py" --versions \
    --expect-python "$ELMA_EDGE_PYTHON_VERSION" \
    --expect "numpy==$ELMA_EDGE_NUMPY_VERSION" \
    --expect "$ELMA_EDGE_INTERPRETER_PACKAGE==$ELMA_EDGE_INTERPRETER_VERSION" \
    --expect "tqdm==$ELMA_EDGE_TQDM_VERSION" \
    --pins "$ENV_FILE"

# --- the alternative: NVIDIA's TensorFlow for the system Python 3.6 ----------------------------------
if ((WITH_JETPACK_TF)); then
    if python3 -c 'import tensorflow' >/dev/null 2>&1; then
        log "the system Python already has TensorFlow: $(python3 -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)"
    else
        run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            libhdf5-serial-dev hdf5-tools libhdf5-dev zlib1g-dev zip libjpeg8-dev liblapack-dev libblas-dev gfortran
        run "${SUDO_H[@]}" "${CACHE_ENV[@]}" python3 -m pip install -U pip testresources setuptools==49.6.0
        run "${SUDO_H[@]}" "${CACHE_ENV[@]}" python3 -m pip install --extra-index-url "$JETPACK_TF_INDEX" "$JETPACK_TF_SPEC"
    fi
fi

log "done: $PREFIX/bin/python (Python $ELMA_EDGE_PYTHON_VERSION, numpy $ELMA_EDGE_NUMPY_VERSION, $ELMA_EDGE_INTERPRETER_PACKAGE $ELMA_EDGE_INTERPRETER_VERSION)"
