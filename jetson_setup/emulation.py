#!/usr/bin/env python3
"""Run the device program as an aarch64 board would, on this x86 machine (qemu-user).

A TX2 cannot be borrowed by CI, so the device's Python, its wheels and its code run here under
``qemu-aarch64-static`` (user-mode emulation: no binfmt, no chroot, no root at run time):

* an arm64 Debian root (``debootstrap --foreign --variant=minbase``: Python 3.11, libsndfile1,
  libportaudio2, libgomp1), its packages unpacked with ``dpkg -x``;
* the device environment's wheels, exactly the pins of ``environment.yml`` (``tflite-runtime``
  built by ``build_tflite_runtime.py``), installed host-side with ``pip install --target
  --platform manylinux_2_17_aarch64 .. manylinux_2_27_aarch64 --no-deps`` (pip inside the
  emulated root fails its certificate checks) and byte-compiled host-side;
* a TX2's ``/proc/cpuinfo`` (CPUs 0, 3-5 Cortex-A57, 1-2 Denver 2) and
  ``/sys/devices/system/cpu/{possible,present,online}`` (0-5) inside the root: qemu-user reads
  a path from ``QEMU_LD_PREFIX`` first when it exists there, and onnxruntime's CPU probe
  segfaults on the x86 host's;
* ``QEMU_CPU=cortex-a57`` (the TX2's ARM cores; with qemu's default ``max`` CPU, int8
  answers diverged).

The root is built once (about a minute, ~600 MB of downloads) and kept as a tarball (zstd, else gzip) plus
its unpacked copy under ``ELMA_JETSON_EMU_CACHE`` (default ``$ELMA_CACHE_DIR/jetson-emu``,
else ``~/.cache/elma/jetson-emu``: outside the clone, so CI's fresh clones share it); the
name holds a hash of the recipe and the pins, so a changed ``environment.yml`` builds a new one.

What this proves and what not: the device's code and wheels run on an ARMv8 (Cortex-A57)
instruction set with the pinned versions. The root's glibc is Debian 12's 2.36, not JetPack
4.6's 2.27 (Ubuntu 18.04's arm64 archive is not reachable from here), so passing here does not
show that the wheels load on the board's glibc: ``check_wheels.py`` (readelf) shows that.
Emulated time says nothing about the TX2's speed.

    python jetson_setup/emulation.py build           # build or reuse; prints the root
    python jetson_setup/emulation.py python -- -c 'import platform; print(platform.machine())'
    python jetson_setup/emulation.py verify -- --imports --self-test   # verify_edge.py, emulated

Needs root (debootstrap), ``qemu-user-static``, ``debootstrap``, ``dpkg`` and a
Debian mirror (``ELMA_DEBIAN_MIRROR``, default deb.debian.org) and PyPI for the first build.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENVIRONMENT = HERE / "environment.yml"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import build_tflite_runtime  # noqa: E402  (beside this file)
import check_wheels  # noqa: E402

RECIPE = 2  # bump when the root's recipe changes (the cache key holds it)
SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "libsndfile1", "libportaudio2", "libgomp1")
PYTHON = "usr/bin/python3.11"
SITE = "opt/elma-edge/site-packages"
QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a57"
TOOLS = {QEMU: "qemu-user-static", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
# JetPack 4.6 on a TX2: CPUs 0 and 3-5 are Cortex-A57 (ARM 0x41, part 0xd07), 1-2 Denver 2
# (NVIDIA 0x4e, part 0x003); as /proc/cpuinfo shows them with all six on (nvpmodel -m 0).
_A57 = ("0x41", "0x1", "0xd07", "3")
_DENVER2 = ("0x4e", "0x0", "0x003", "0")
TX2_CORES = (_A57, _DENVER2, _DENVER2, _A57, _A57, _A57)


class EmulationUnavailable(RuntimeError):
    """A tool, a permission or the network the emulation needs is missing (the message says which)."""


def cache_root() -> Path:
    if os.environ.get("ELMA_JETSON_EMU_CACHE"):
        return Path(os.environ["ELMA_JETSON_EMU_CACHE"])
    if os.environ.get("ELMA_CACHE_DIR"):
        return Path(os.environ["ELMA_CACHE_DIR"]) / "jetson-emu"
    return Path.home() / ".cache" / "elma" / "jetson-emu"


def missing_tools() -> list[str]:
    """Debian packages to install for the tools that are not on PATH."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def pins() -> list[tuple[str, str]]:
    return check_wheels.read_pins(ENVIRONMENT)


def cache_key() -> str:
    text = f"{RECIPE} {SUITE} {' '.join(DEBIAN_PACKAGES)} {QEMU_CPU}\n"
    text += "".join(f"{n}=={v}\n" for n, v in pins()) + build_tflite_runtime.TF_WHEELS["aarch64"][1]
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tx2_cpuinfo() -> str:
    blocks = []
    for i, (implementer, variant, part, revision) in enumerate(TX2_CORES):
        blocks.append(
            f"processor\t: {i}\nmodel name\t: ARMv8 Processor rev {revision} (v8l)\nBogoMIPS\t: 62.50\n"
            "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
            f"CPU implementer\t: {implementer}\nCPU architecture: 8\nCPU variant\t: {variant}\n"
            f"CPU part\t: {part}\nCPU revision\t: {revision}\n"
        )
    return "\n".join(blocks) + "\n"


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        raise EmulationUnavailable(
            f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-600:]}"
        )
    return done


def _say(message: str) -> None:
    print(f"emulation: {message}", file=sys.stderr, flush=True)


def install_wheels(site: Path, wheel_cache: Path) -> None:
    """The pins of environment.yml for aarch64 into ``site`` (host-side pip), byte-compiled.

    The wheels are downloaded into ``wheel_cache`` first (``check_wheels.py``'s cache: the
    readelf check then reads exactly the files installed here) and installed from it only."""
    build_tflite_runtime.build(out=wheel_cache, cache=wheel_cache)
    requirements = site.parent / "requirements.txt"
    requirements.write_text("".join(f"{n}=={v}\n" for n, v in pins()))
    tags = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    tags += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for plat in check_wheels.platforms("aarch64", 17, 27):
        tags += ["--platform", plat]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    local = ["--find-links", str(wheel_cache)]
    _run(
        [*pip, "download", "--no-deps", *tags, *local, "-d", str(wheel_cache), "-r", str(requirements)],
        "pip download",
    )
    install = [*pip, "install", "--no-deps", "--no-index", *local, *tags, "--target", str(site)]
    _run([*install, "-r", str(requirements)], "pip install of the aarch64 wheels")
    # same bytecode for every 3.11.x: compiled here, the emulated Python skips that work
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], capture_output=True, check=False
    )


def build_root(target: Path, mirror: str, wheel_cache: Path) -> None:
    """debootstrap (first stage), dpkg -x every .deb, the TX2's CPU files, the wheels."""
    if os.geteuid() != 0:
        raise EmulationUnavailable("building the arm64 root needs root (debootstrap)")
    include = ",".join(DEBIAN_PACKAGES)
    cmd = ["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", f"--include={include}"]
    _run([*cmd, SUITE, str(target), mirror], f"debootstrap {SUITE} arm64 from {mirror}")
    archives = target / "var" / "cache" / "apt" / "archives"
    for deb in sorted(archives.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(target)], f"dpkg-deb -x {deb.name}")
        deb.unlink()
    if not (target / PYTHON).is_file():
        raise EmulationUnavailable(f"no {PYTHON} in the arm64 root")
    (target / "proc").mkdir(exist_ok=True)
    (target / "proc" / "cpuinfo").write_text(tx2_cpuinfo())
    cpu = target / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(f"0-{len(TX2_CORES) - 1}\n")
    site = target / SITE
    site.mkdir(parents=True)
    install_wheels(site, wheel_cache)


def ensure_root(*, mirror: str | None = None, wheel_cache: Path | None = None) -> Path:
    """The unpacked root for the current pins: reused, unpacked from its tarball, or built."""
    missing = missing_tools()
    if missing:
        raise EmulationUnavailable(f"missing tools: apt-get install {' '.join(missing)}")
    mirror = mirror or os.environ.get("ELMA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    wheel_cache = wheel_cache or check_wheels.DEFAULT_CACHE
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    name = f"arm64-{SUITE}-{cache_key()}"
    compress, suffix = ("--zstd", ".tar.zst") if shutil.which("zstd") else ("--gzip", ".tar.gz")
    root, tarball = cache / name, cache / f"{name}{suffix}"
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=cache))
    try:
        if tarball.is_file():
            start = time.perf_counter()
            _run(["tar", compress, "-xf", str(tarball), "-C", str(work)], f"unpacking {tarball}")
            _say(f"unpacked {tarball.name} in {time.perf_counter() - start:.1f} s")
        else:
            start = time.perf_counter()
            _say(f"building the arm64 root {name} (once; about a minute and ~600 MB of downloads)")
            build_root(work, mirror, wheel_cache)
            partial = tarball.with_name(tarball.name + ".partial")
            _run(["tar", compress, "-cf", str(partial), "-C", str(work), "."], "packing the root")
            os.replace(partial, tarball)
            _say(
                f"built {tarball.name} ({tarball.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s"
            )
        (work / ".complete").write_text(name + "\n")
        os.replace(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in cache.glob(f"arm64-{SUITE}-*"):  # roots of other pins (not this key's, even half-built)
        if old.name.split(".", 1)[0] != name:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return root


def environment(root: Path, extra_path: list[str] | None = None, home: str | None = None) -> dict[str, str]:
    """What the emulated Python runs with: the root as qemu's prefix, the repository and the
    device wheels on its path, an A57 CPU."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_", "VIRTUAL_ENV"))}
    path = [str(REPO), str(root / SITE), *(extra_path or [])]
    return {
        **keep,
        "QEMU_LD_PREFIX": str(root),
        "QEMU_CPU": QEMU_CPU,
        "PYTHONPATH": os.pathsep.join(path),
        "PYTHONNOUSERSITE": "1",
        "HOME": home or keep.get("HOME", "/root"),
        "OMP_NUM_THREADS": "2",
    }


def python_command(root: Path, *args: str) -> list[str]:
    return [shutil.which(QEMU) or QEMU, str(root / PYTHON), *args]


def python_wrapper(root: Path, path: Path) -> Path:
    """An executable that runs the emulated Python (for scripts that take a Python's path, as
    ``04_verify.sh --python``); run it with :func:`environment`'s variables."""
    path.write_text(f'#!/bin/sh\nexec {" ".join(python_command(root))} "$@"\n')
    path.chmod(0o755)
    return path


def run_python(root: Path, *args: str, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The emulated aarch64 Python 3.11 with ``args`` (stdout/stderr captured as text)."""
    env = kwargs.pop("env", None) or environment(root)
    return subprocess.run(
        python_command(root, *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "python", "verify"))
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="after --: arguments of python / verify_edge.py"
    )
    args = parser.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    try:
        root = ensure_root()
    except EmulationUnavailable as err:
        print(f"emulation: {err}", file=sys.stderr)
        return 2
    if args.action == "build":
        print(root)
        return 0
    if args.action == "verify":
        rest = [str(HERE / "verify_edge.py"), *rest]
    return subprocess.run(python_command(root, *rest), env=environment(root), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
