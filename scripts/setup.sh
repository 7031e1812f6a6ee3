#!/usr/bin/env bash
# Set up everything ELMA needs on a Debian/Ubuntu machine; safe to run again (a second run
# changes nothing). Steps:
#   1. Debian packages (apt-get update + install only when one is missing)
#   2. .venv with Python 3.11 (created when missing)
#   3. pip install -r requirements.txt (only when requirements.txt changed since the last
#      successful install: its sha256 is kept in .venv/.elma-requirements.sha256)
#   4. pip install -e . --no-deps (only when missing or pyproject.toml changed)
#   5. the Jupyter kernel "python3" inside .venv, then pip check
#
# Environment:
#   ELMA_SKIP_APT=1   do not look at Debian packages at all
#   ELMA_PYTHON=...   interpreter used to create .venv (default: python3.11, else python3 if 3.11)
#   ELMA_VENV=...     venv directory (default: .venv in the repository)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

VENV="${ELMA_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
REQ_STAMP="$VENV/.elma-requirements.sha256"
PKG_STAMP="$VENV/.elma-package.sha256"
APT_PACKAGES=(openssh-server openssh-client espeak-ng sox shellcheck libsndfile1 ffmpeg binutils iproute2 qemu-user-static debootstrap libtcmalloc-minimal4)

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

sha256_of() { sha256sum "$1" | awk '{print $1}'; }

# ---------------------------------------------------------------- 1. Debian packages
install_debian_packages() {
    if [[ "${ELMA_SKIP_APT:-0}" == "1" ]]; then
        say "Debian packages: not checked (ELMA_SKIP_APT=1)"
        return
    fi
    if ! command -v dpkg >/dev/null 2>&1; then
        say "Debian packages: no dpkg here; install yourself: ${APT_PACKAGES[*]}"
        return
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "Debian packages: all present (${APT_PACKAGES[*]})"
        return
    fi
    local sudo=()
    if [[ "$(id -u)" != "0" ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            die "missing Debian packages: ${missing[*]}; run as root, install sudo, or install them and rerun (ELMA_SKIP_APT=1 skips this check)"
        fi
    fi
    say "Debian packages: installing ${missing[*]}"
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update -qq
    "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------- 2. virtual environment
find_python() {
    if [[ -n "${ELMA_PYTHON:-}" ]]; then
        echo "$ELMA_PYTHON"
        return
    fi
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    die "Python 3.11 not found; install it or set ELMA_PYTHON to a Python 3.11 interpreter"
}

make_venv() {
    if [[ -x "$PY" ]]; then
        "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
            die "$VENV uses Python $("$PY" -c 'import platform; print(platform.python_version())'), not 3.11; remove it and rerun"
        say "venv: $VENV exists"
        return
    fi
    local python
    python="$(find_python)"
    say "venv: creating $VENV with $python"
    "$python" -m venv "$VENV"
    rm -f "$REQ_STAMP" "$PKG_STAMP"
}

# ---------------------------------------------------------------- 3./4. packages
install_requirements() {
    local want have=""
    want="$(sha256_of requirements.txt)"
    [[ -f "$REQ_STAMP" ]] && have="$(cat "$REQ_STAMP")"
    if [[ "$want" == "$have" ]]; then
        say "requirements.txt unchanged since the last install (sha256 ${want:0:12}); not reinstalling"
        return
    fi
    say "requirements.txt: installing the pins (sha256 ${want:0:12})"
    "$PY" -m pip install --disable-pip-version-check -q -r requirements.txt
    echo "$want" >"$REQ_STAMP"
    rm -f "$PKG_STAMP"
}

install_package() {
    local want have=""
    want="$(sha256_of pyproject.toml)"
    [[ -f "$PKG_STAMP" ]] && have="$(cat "$PKG_STAMP")"
    # The import runs from / so that it finds the installed package, not ./elma_utils.
    if [[ "$want" == "$have" && -x "$VENV/bin/elma" ]] &&
        (cd / && "$PY" -c 'import pathlib, sys, elma_utils; sys.exit(pathlib.Path(elma_utils.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())' "$ROOT") 2>/dev/null; then
        say "elma: installed (editable) from $ROOT"
        return
    fi
    say "elma: pip install -e . --no-deps"
    # No build isolation: setuptools is pinned in requirements.txt, and this works offline.
    "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
    echo "$want" >"$PKG_STAMP"
}

# ---------------------------------------------------------------- 5. kernel + check
register_kernel() {
    # The "python3" kernel that Jupyter finds first must belong to this venv.
    local where
    where="$("$VENV/bin/jupyter" kernelspec list --json 2>/dev/null |
        "$PY" -c 'import json, sys; print(json.load(sys.stdin)["kernelspecs"].get("python3", {}).get("resource_dir", ""))' ||
        true)"
    if [[ -n "$where" && "$where" == "$VENV"/* ]]; then
        say "kernel: python3 at $where"
        return
    fi
    say "kernel: registering python3 in $VENV"
    "$PY" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ELMA)" >/dev/null
}

install_debian_packages
make_venv
install_requirements
install_package
register_kernel
"$PY" -m pip check --disable-pip-version-check >/dev/null || {
    "$PY" -m pip check --disable-pip-version-check >&2 || true
    die "pip check found broken requirements (above)"
}
say "pip check: no broken requirements"
say "done"
