#!/usr/bin/env bash
# 90 — for the record, not part of the set-up: build Bazel 0.26.1 from its dist zip and
# TensorFlow 1.15 from source on the TX2, everything on the SSD. Guarded by --source-build.
#
# History (why ELMA's edge runs LiteRT instead): TF 1.15 wants Bazel 0.26.1, which has no
# aarch64 binary, so Bazel itself is built first; TF 1.15 then does not build against the
# cuDNN 8 / TensorRT 8 of JetPack 4.6; and Bazel's cache under ~/.cache filled the 32 GB eMMC
# until the board no longer booted. So: --output_user_root on the SSD, and a disk-space check
# that refuses to start when the file system of that root has less room than the build needs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SOURCE_BUILD=0
TF_VERSION=v1.15.5
BAZEL_VERSION=0.26.1
NEED_GB=${ELMA_TF_BUILD_NEED_GB:-40}
JOBS=4

usage() {
    cat <<USAGE
Usage: $(basename "$0") --source-build [--tf-version TAG] [--need-gb N] [--jobs N] [--dry-run]

Builds Bazel $BAZEL_VERSION (dist zip) and TensorFlow $TF_VERSION with CUDA 10.2 / cuDNN 8 /
TensorRT 8 for the TX2 (compute capability 6.2). Expect a day of building, and expect
TF 1.15 to fail on cuDNN 8 / TensorRT 8: this script documents what was tried.
  --source-build  required: says you really mean to start this build
  --tf-version    TensorFlow git tag (default $TF_VERSION)
  --need-gb N     refuse to start with less than N GB free for the build (default $NEED_GB;
                  ELMA_TF_BUILD_NEED_GB sets it)
  --jobs N        parallel build jobs (default $JOBS; 8 GB RAM and swap are the limit)
  --dry-run       print the commands, change nothing
USAGE
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --source-build) SOURCE_BUILD=1 ;;
    --tf-version)
        TF_VERSION=${2:?--tf-version needs a value}
        shift
        ;;
    --need-gb)
        NEED_GB=${2:?--need-gb needs a value}
        shift
        ;;
    --jobs)
        JOBS=${2:?--jobs needs a value}
        shift
        ;;
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
[[ $NEED_GB =~ ^[0-9]+$ && $JOBS =~ ^[1-9][0-9]*$ ]] || die 2 "--need-gb and --jobs take whole numbers"

setup_logging "$(basename "$0")"
if ((!SOURCE_BUILD)); then
    usage >&2
    die 2 "not starting: this is the source build kept for the record; add --source-build to run it"
fi
require_jetson

MNT=$ELMA_SSD_MOUNT
BAZEL_ROOT=$MNT/bazel
SRC=$MNT/src
WHEELS=$MNT/wheels
BUILD_TMP=$MNT/tmp

# --- never on the eMMC, never without room ------------------------------------------------------
if ! mountpoint -q "$MNT" 2>/dev/null; then
    if ((DRY_RUN)); then
        warn "$MNT is not mounted; a real run stops here (01_external_ssd.sh mounts the SSD)"
    else
        die 5 "$MNT is not mounted: the build would fill the eMMC (run 01_external_ssd.sh first)"
    fi
fi
require_free_gb "$BAZEL_ROOT" "$NEED_GB" "the TensorFlow build (Bazel output root $BAZEL_ROOT)"
swap_mb=$(free -m 2>/dev/null | awk '/^Swap:/ { print $2 }' || true)
if ((${swap_mb:-0} < 6000)); then
    warn "only ${swap_mb:-0} MB of swap: the build runs out of memory on 8 GB without ~8 GB swap (01_external_ssd.sh --swap-gb 8)"
fi

# --- build dependencies ----------------------------------------------------------------------------
deps=(openjdk-8-jdk zip unzip patch pkg-config zlib1g-dev python3-dev python3-pip git)
missing=()
for pkg in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
run env "PIP_CACHE_DIR=$MNT/cache/pip" python3 -m pip install --user six wheel mock future 'numpy<1.19'
run env "PIP_CACHE_DIR=$MNT/cache/pip" python3 -m pip install --user --no-deps keras_applications==1.0.8 keras_preprocessing==1.1.0

# --- Bazel from the dist zip (no aarch64 binary exists for 0.26.1) -------------------------------
run mkdir -p "$SRC" "$WHEELS" "$BUILD_TMP" "$BAZEL_ROOT"
if command -v bazel >/dev/null 2>&1 && bazel --output_user_root="$BAZEL_ROOT" version 2>/dev/null | grep -q "Build label: $BAZEL_VERSION"; then
    log "Bazel $BAZEL_VERSION is installed: $(command -v bazel)"
else
    zip=bazel-$BAZEL_VERSION-dist.zip
    url=https://github.com/bazelbuild/bazel/releases/download/$BAZEL_VERSION/$zip
    run curl -fsSL -o "$SRC/$zip" "$url"
    run curl -fsSL -o "$SRC/$zip.sha256" "$url.sha256"
    if ((DRY_RUN)); then
        printf '[dry-run] check: sha256sum %s equals the hash in %s\n' "$SRC/$zip" "$SRC/$zip.sha256"
    else
        want=$(awk '{print $1; exit}' "$SRC/$zip.sha256")
        have=$(sha256sum "$SRC/$zip" | awk '{print $1}')
        [[ $want == "$have" ]] || die 6 "$zip: sha256 $have, expected $want"
    fi
    run unzip -q -o "$SRC/$zip" -d "$SRC/bazel-$BAZEL_VERSION"
    run_in "$SRC/bazel-$BAZEL_VERSION" env "TMPDIR=$BUILD_TMP" \
        "EXTRA_BAZEL_ARGS=--host_javabase=@local_jdk//:jdk" bash ./compile.sh
    run "${SUDO[@]}" install -m 0755 "$SRC/bazel-$BAZEL_VERSION/output/bazel" /usr/local/bin/bazel
fi

# --- TensorFlow ------------------------------------------------------------------------------------
TF_DIR=$SRC/tensorflow
if [[ -d $TF_DIR/.git ]]; then
    log "TensorFlow source is there: $TF_DIR"
else
    run git clone --depth 1 --branch "$TF_VERSION" https://github.com/tensorflow/tensorflow.git "$TF_DIR"
fi
TF_CONFIG=(
    "PYTHON_BIN_PATH=/usr/bin/python3" "USE_DEFAULT_PYTHON_LIB_PATH=1"
    "TF_NEED_CUDA=1" "TF_CUDA_VERSION=10.2" "TF_CUDNN_VERSION=8"
    "TF_NEED_TENSORRT=1" "TF_TENSORRT_VERSION=8" "TF_CUDA_COMPUTE_CAPABILITIES=6.2"
    "TF_CUDA_PATHS=/usr/local/cuda,/usr/lib/aarch64-linux-gnu,/usr/include"
    "GCC_HOST_COMPILER_PATH=/usr/bin/gcc" "TF_CUDA_CLANG=0" "TF_DOWNLOAD_CLANG=0"
    "TF_NEED_ROCM=0" "TF_NEED_OPENCL_SYCL=0" "TF_ENABLE_XLA=0" "TF_NEED_MPI=0"
    "TF_SET_ANDROID_WORKSPACE=0" "CC_OPT_FLAGS=-march=armv8-a"
)
run_in "$TF_DIR" env "${TF_CONFIG[@]}" ./configure
run_in "$TF_DIR" env "TMPDIR=$BUILD_TMP" bazel --output_user_root="$BAZEL_ROOT" build \
    --config=opt --config=cuda --config=nonccl \
    --local_ram_resources=4096 --local_cpu_resources="$JOBS" --jobs="$JOBS" \
    //tensorflow/tools/pip_package:build_pip_package
run_in "$TF_DIR" ./bazel-bin/tensorflow/tools/pip_package/build_pip_package "$WHEELS"
log "done: the wheel is in $WHEELS (pip3 install --user $WHEELS/tensorflow-*.whl)"
