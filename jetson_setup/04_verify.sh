#!/usr/bin/env bash
# 04 — verify the set-up: report the versions that matter (L4T, CUDA, cuDNN, TensorRT, Pythons,
# NumPy, the LiteRT interpreter), compare the edge environment with every pin of
# environment.yml, import every module of the device program and every library it loads on
# first use (speech recognisers, VAD, audio, SSH: where a wheel built for a newer glibc fails),
# run the device program's self-test (one step of each part: the QA path on the bundle, the
# audio front end, the speech gate, pocketsphinx, faster-whisper, an SSH connection through a
# loopback endpoint; verify_edge.py --self-test), and answer a sample question with an edge
# bundle (verified by sha256 before loading), with energy per question from tegrastats.
#
# It changes nothing, so it also runs on a machine that is not a Jetson (say, to check a
# bundle with --python .venv/bin/python); there it says so. Exit status: 0 all fine,
# 1 a version differs from the pins, 3 a device module or library does not import,
# 5 a self-test step failed, 2 the bundle is refused or cannot answer (with several, the
# first of these that failed).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${ELMA_EDGE_PYTHON:-$ELMA_SSD_MOUNT/envs/elma-edge/bin/python}
BUNDLE=""
REPEAT=3
QUESTION=""
CONTEXT=""
CLIP=""
STEPS=""

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--bundle DIR] [--python PATH] [--repeat N] [--question Q --context C]
       [--clip AUDIO] [--steps LIST] [--dry-run]

  --bundle DIR   an edge bundle (elma_utils.export: manifest.json, *.tflite, tokenizer/) to
                 load and ask a sample question
  --python PATH  the edge Python (default $PY; ELMA_EDGE_PYTHON sets it)
  --repeat N     measured answers after one warm-up (default $REPEAT)
  --question Q / --context C   your own sample instead of the built-in one
  --clip AUDIO   a spoken question for the self-test's speech steps (default: espeak-ng's)
  --steps LIST   the self-test's steps (default all: qa (with --bundle), audio, vad, sphinx,
                 whisper_load, whisper, ssh)
  --dry-run      print the commands, run nothing
USAGE
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --bundle)
        BUNDLE=${2:?--bundle needs a value}
        shift
        ;;
    --python)
        PY=${2:?--python needs a value}
        shift
        ;;
    --repeat)
        REPEAT=${2:?--repeat needs a value}
        shift
        ;;
    --question)
        QUESTION=${2:?--question needs a value}
        shift
        ;;
    --context)
        CONTEXT=${2:?--context needs a value}
        shift
        ;;
    --clip)
        CLIP=${2:?--clip needs a value}
        shift
        ;;
    --steps)
        STEPS=${2:?--steps needs a value}
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
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die 2 "--repeat takes a positive number, got '$REPEAT'"
if [[ -n $QUESTION && -z $CONTEXT || -z $QUESTION && -n $CONTEXT ]]; then
    die 2 "--question and --context go together"
fi

setup_logging "$(basename "$0")"
if is_jetson; then
    log "Jetson: L4T $(l4t_release) on $(machine_arch)"
else
    log "not a Jetson ($(machine_arch)): reporting this machine (nothing is changed either way)"
fi

# probe LABEL CMD...: print "LABEL: <first lines of output>" (read-only commands only).
probe() {
    local label=$1 out
    shift
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$(quote_cmd "$@")"
        return 0
    fi
    if out=$("$@" 2>&1) && [[ -n $out ]]; then
        printf '%-14s %s\n' "$label:" "$(head -n 3 <<<"$out" | paste -sd ' ' -)"
    else
        printf '%-14s %s\n' "$label:" "not available"
    fi
}

log "--- machine and JetPack"
probe "kernel" uname -srm
probe "model" sh -c "tr -d '\\0' </proc/device-tree/model"
probe "L4T" head -n 1 "$(jetson_release_file)"
probe "CUDA" sh -c 'nvcc --version 2>/dev/null | tail -n 1 || cat /usr/local/cuda/version.txt'
# shellcheck disable=SC2016  # ${Version} is dpkg-query's field, not a shell variable
probe "cuDNN" dpkg-query -W -f='${Version}' libcudnn8
# shellcheck disable=SC2016
probe "TensorRT" dpkg-query -W -f='${Version}' tensorrt
probe "nvpmodel" nvpmodel -q
probe "swap" swapon --show --noheadings
# shellcheck disable=SC2016  # $1 is expanded by sh -c
probe "disk /" sh -c 'df -h --output=avail,size,target "$1" | tail -n 1' _ /
# shellcheck disable=SC2016
probe "disk SSD" sh -c 'df -h --output=avail,size,target "$1" | tail -n 1' _ "$ELMA_SSD_MOUNT"
probe "system python" python3 --version
probe "tegrastats" sh -c 'command -v tegrastats'

log "--- the edge Python ($PY) against the pins"
status=0
if ((!DRY_RUN)) && [[ ! -x $PY ]]; then
    die 2 "no edge Python at $PY (02_python_env.sh creates it; --python names another)"
fi
run "$PY" "$HERE/verify_edge.py" --versions \
    --expect-python "$ELMA_EDGE_PYTHON_VERSION" \
    --expect "numpy==$ELMA_EDGE_NUMPY_VERSION" \
    --expect "$ELMA_EDGE_INTERPRETER_PACKAGE==$ELMA_EDGE_INTERPRETER_VERSION" \
    --pins "$HERE/environment.yml" || status=1

log "--- the device program: every module and the libraries it loads"
run "$PY" "$HERE/verify_edge.py" --imports || { ((status)) || status=3; }

log "--- the device program's self-test: QA, audio, speech gate, recognisers, SSH"
selftest=(--self-test)
[[ -n $BUNDLE ]] && selftest+=(--qa "$BUNDLE")
[[ -n $CLIP ]] && selftest+=(--clip "$CLIP")
[[ -n $STEPS ]] && selftest+=(--steps "$STEPS")
run "$PY" "$HERE/verify_edge.py" "${selftest[@]}" || { ((status)) || status=5; }

if [[ -n $BUNDLE ]]; then
    log "--- a sample question on $BUNDLE"
    args=(--bundle "$BUNDLE" --repeat "$REPEAT")
    if [[ -n $QUESTION ]]; then
        args+=(--question "$QUESTION" --context "$CONTEXT")
    fi
    run "$PY" "$HERE/verify_edge.py" "${args[@]}" || { ((status)) || status=2; }
else
    warn "no --bundle given: the edge model was not run"
fi

if ((status == 0)); then
    log "verify: all checks passed"
else
    log "verify: FAILED (status $status; see above)"
fi
exit "$status"
