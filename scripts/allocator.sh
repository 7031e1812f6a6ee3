#!/usr/bin/env bash
# Sourced by scripts/run_pipeline.sh and scripts/test.sh: preload tcmalloc when it is installed.
# TensorFlow frees and reallocates hundreds of MB each training step; glibc's malloc gives the
# blocks back to the kernel, so each step faults fresh pages in again, which is slow on a virtual
# machine. tcmalloc keeps them (`python -m elma_utils.bench.allocator` measures both on this
# machine). ELMA_MALLOC=system keeps glibc's malloc. Allocation does not change any result.
elma_preload_tcmalloc() {
    if [[ "${ELMA_MALLOC:-tcmalloc}" == "system" ]]; then
        echo "allocator: glibc malloc (ELMA_MALLOC=system)" >&2
        return 0
    fi
    local lib
    # awk reads to the end: an early exit would kill ldconfig with SIGPIPE (fatal under pipefail)
    lib="$(ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 / && !lib {lib = $NF} END {print lib}' || true)"
    if [[ -z "$lib" || ! -e "$lib" ]]; then
        echo "allocator: glibc malloc (tcmalloc not installed: apt-get install libtcmalloc-minimal4)" >&2
        return 0
    fi
    case ":${LD_PRELOAD:-}:" in
    *":$lib:"*) ;;
    *) export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" ;;
    esac
    # tcmalloc reports every allocation over 1 GiB on stderr; TensorFlow's are expected
    export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
    echo "allocator: tcmalloc preloaded ($lib); ELMA_MALLOC=system uses glibc's malloc" >&2
}
