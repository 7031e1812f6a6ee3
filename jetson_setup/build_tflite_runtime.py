#!/usr/bin/env python3
"""Build the TX2's LiteRT interpreter: a ``tflite-runtime`` wheel cut from TensorFlow's own wheel.

No ``ai-edge-litert`` release loads on JetPack 4.6 (glibc 2.27): 2.3.0 needs GLIBC_2.34,
1.1.0-2.0.2 need 2.29-2.30 (``check_wheels.py``), and ``tflite-runtime`` stopped at 2.13 for
Python 3.10 (2.14's wheels need glibc 2.34). TensorFlow's own aarch64 wheel does load:
``tensorflow==2.21.0`` (the version the project exports its bundles with) is tagged
``manylinux_2_27_aarch64`` and its shared objects need at most GLIBC_2.27, GLIBCXX_3.4.22 and
CXXABI_1.3.11. Its TFLite interpreter is self-contained: ``_pywrap_tensorflow_interpreter_wrapper.so``
(a 4 kB stub) and ``libpywrap_tflite_common.so`` (the interpreter, its kernels and XNNPACK,
linking only libc, libm, libdl, libpthread, libstdc++ and libgcc_s), driven by
``interpreter.py``, which already knows how to run as ``tflite_runtime.interpreter``. This
script copies exactly those files, unchanged, into a wheel named ``tflite-runtime`` with the
local version ``2.21.0+elma``:

    tflite_runtime/__init__.py                          (written here: version, source wheel)
    tflite_runtime/interpreter.py                       tensorflow/lite/python/interpreter.py
    tflite_runtime/metrics_portable.py                  tensorflow/lite/python/metrics/metrics.py
    tflite_runtime/metrics_interface.py                 tensorflow/lite/python/metrics/metrics_interface.py
    tflite_runtime/_pywrap_tensorflow_interpreter_wrapper.so   tensorflow/lite/python/ (same name)
    tflite_runtime/libpywrap_tflite_common.so           tensorflow/lite/python/ (found via $ORIGIN)
    tflite_runtime-2.21.0+elma.dist-info/LICENSE        tensorflow/include/LICENSE (Apache-2.0)

The edge runtime takes it as it takes ``tflite_runtime`` (``interpreter_class()``). The wheel
is byte-for-byte reproducible (fixed timestamps and order), so its sha256 can be compared
between machines. The TensorFlow wheel is checked against its published sha256 first.

    # on the board or anywhere with pip and PyPI (downloads the 282 MB TensorFlow wheel once):
    python jetson_setup/build_tflite_runtime.py --out /mnt/elma-ssd/wheels
    # from a TensorFlow wheel you have (any machine, any architecture of that wheel):
    python jetson_setup/build_tflite_runtime.py --tensorflow-wheel tensorflow-2.21.0-....whl
    # from an installed TensorFlow 2.21 (the tests build an x86_64 one from the project's venv):
    python jetson_setup/build_tflite_runtime.py --from-installed .venv/lib/python3.11/site-packages/tensorflow

Prints the wheel's path. Exit status 0 built (or already there), 1 the TensorFlow wheel is not
the pinned one or lacks a file, 2 usage error.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

TF_VERSION = "2.21.0"
LOCAL_LABEL = "elma"
VERSION = f"{TF_VERSION}+{LOCAL_LABEL}"
PYTHON_TAG = "cp311"
# tensorflow==2.21.0's wheels on PyPI (sha256 as published there).
TF_WHEELS = {
    "aarch64": (
        "tensorflow-2.21.0-cp311-cp311-manylinux_2_27_aarch64.whl",
        "4b24aca16d527a3cf1c37f720c04c484c3d20f4d0fdfa98632ac8b9f3be6eb5c",
    ),
}
WHEEL_PLATFORM = {"aarch64": "manylinux_2_27_aarch64"}
DEFAULT_CACHE = Path(os.environ.get("ELMA_WHEEL_CACHE", Path.home() / ".cache" / "elma" / "jetson-wheels"))
# target inside tflite_runtime/  <-  source inside the tensorflow package
MEMBERS = {
    "interpreter.py": "lite/python/interpreter.py",
    "metrics_portable.py": "lite/python/metrics/metrics.py",
    "metrics_interface.py": "lite/python/metrics/metrics_interface.py",
    "_pywrap_tensorflow_interpreter_wrapper.so": "lite/python/_pywrap_tensorflow_interpreter_wrapper.so",
    "libpywrap_tflite_common.so": "lite/python/libpywrap_tflite_common.so",
}
LICENSE = "include/LICENSE"
EPOCH = (2026, 3, 5, 0, 0, 0)  # every member's timestamp: the wheel is reproducible


class BuildError(RuntimeError):
    pass


def wheel_name(platform_tag: str) -> str:
    return f"tflite_runtime-{VERSION}-{PYTHON_TAG}-{PYTHON_TAG}-{platform_tag}.whl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _init_py(source: str) -> bytes:
    return (
        f'"""TensorFlow Lite interpreter {TF_VERSION}, the files of {source} unchanged\n'
        '(repackaged by ELMA\'s jetson_setup/build_tflite_runtime.py: import tflite_runtime.interpreter)."""\n\n'
        f'__version__ = "{TF_VERSION}"\n'
        f'__source__ = "{source}"\n'
    ).encode()


def build_wheel(
    files: dict[str, bytes], license_text: bytes, source: str, platform_tag: str, out_dir: Path
) -> Path:
    """Write the wheel from the tflite_runtime files (target name -> bytes)."""
    dist_info = f"tflite_runtime-{VERSION}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        "Name: tflite-runtime\n"
        f"Version: {VERSION}\n"
        f"Summary: TensorFlow Lite interpreter of tensorflow {TF_VERSION} ({source}), repackaged unchanged\n"
        "License: Apache-2.0\n"
        "Requires-Python: >=3.11,<3.12\n"
        "Requires-Dist: numpy>=1.26\n"
    ).encode()
    wheel = (
        "Wheel-Version: 1.0\n"
        "Generator: elma jetson_setup/build_tflite_runtime.py\n"
        "Root-Is-Purelib: false\n"
        f"Tag: {PYTHON_TAG}-{PYTHON_TAG}-{platform_tag}\n"
    ).encode()
    entries = {f"tflite_runtime/{name}": data for name, data in sorted(files.items())}
    entries["tflite_runtime/__init__.py"] = _init_py(source)
    entries[f"{dist_info}/LICENSE"] = license_text
    entries[f"{dist_info}/METADATA"] = metadata
    entries[f"{dist_info}/WHEEL"] = wheel
    entries[f"{dist_info}/top_level.txt"] = b"tflite_runtime\n"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries.items())
    record += f"{dist_info}/RECORD,,\n"
    entries[f"{dist_info}/RECORD"] = record.encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel_name(platform_tag)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            zf.writestr(info, data)
    os.replace(partial, target)
    return target


def files_from_wheel(tf_wheel: Path) -> tuple[dict[str, bytes], bytes]:
    with zipfile.ZipFile(tf_wheel) as zf:
        names = set(zf.namelist())
        missing = [
            f"tensorflow/{src}" for src in [*MEMBERS.values(), LICENSE] if f"tensorflow/{src}" not in names
        ]
        if missing:
            raise BuildError(
                f"{tf_wheel.name} has no {', '.join(missing)} (not a TensorFlow {TF_VERSION} wheel?)"
            )
        files = {target: zf.read(f"tensorflow/{src}") for target, src in MEMBERS.items()}
        return files, zf.read(f"tensorflow/{LICENSE}")


def files_from_installed(tf_dir: Path) -> tuple[dict[str, bytes], bytes]:
    missing = [src for src in [*MEMBERS.values(), LICENSE] if not (tf_dir / src).is_file()]
    if missing:
        raise BuildError(f"{tf_dir} has no {', '.join(missing)} (not an installed TensorFlow {TF_VERSION}?)")
    return {target: (tf_dir / src).read_bytes() for target, src in MEMBERS.items()}, (
        tf_dir / LICENSE
    ).read_bytes()


def _installed_version(tf_dir: Path) -> str | None:
    for dist in tf_dir.parent.glob("tensorflow-*.dist-info"):
        if m := re.match(r"tensorflow-([^-]+)\.dist-info$", dist.name):
            return m.group(1)
    return None


def fetch_tensorflow_wheel(arch: str, cache: Path) -> Path:
    """The pinned TensorFlow wheel for ``arch`` from the cache, else pip download into it; sha256-checked."""
    name, want = TF_WHEELS[arch]
    path = cache / name
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--python-version", "3.11", "--implementation", "cp"]
        cmd += ["--abi", PYTHON_TAG, "--platform", WHEEL_PLATFORM[arch], "-d", str(cache)]
        done = subprocess.run(
            [*cmd, f"tensorflow=={TF_VERSION}"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0 or not path.is_file():
            raise BuildError(
                f"pip download tensorflow=={TF_VERSION} for {arch} failed: {done.stderr.strip()[-400:]}"
            )
    have = sha256_of(path)
    if have != want:
        raise BuildError(f"{path}: sha256 {have}, PyPI publishes {want} (corrupt or replaced; delete it)")
    return path


def build(
    *,
    out: Path,
    arch: str = "aarch64",
    tensorflow_wheel: Path | None = None,
    from_installed: Path | None = None,
    cache: Path = DEFAULT_CACHE,
) -> Path:
    """Build the wheel (or return the one already in ``out``) and return its path."""
    if from_installed is not None:
        version = _installed_version(from_installed)
        if version != TF_VERSION:
            raise BuildError(f"{from_installed} is TensorFlow {version}, not {TF_VERSION}")
        platform_tag = f"linux_{os.uname().machine}"
        files, license_text = files_from_installed(from_installed)
        return build_wheel(files, license_text, f"tensorflow {TF_VERSION} installed", platform_tag, out)
    if arch not in TF_WHEELS:
        raise BuildError(f"no pinned TensorFlow wheel for {arch} (have {', '.join(TF_WHEELS)})")
    target = out / wheel_name(WHEEL_PLATFORM[arch])
    if target.is_file() and tensorflow_wheel is None:
        return target
    if tensorflow_wheel is None:
        tensorflow_wheel = fetch_tensorflow_wheel(arch, cache)
    elif sha256_of(tensorflow_wheel) != TF_WHEELS[arch][1]:
        raise BuildError(f"{tensorflow_wheel} is not {TF_WHEELS[arch][0]} (sha256 differs)")
    files, license_text = files_from_wheel(tensorflow_wheel)
    return build_wheel(files, license_text, TF_WHEELS[arch][0], WHEEL_PLATFORM[arch], out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_CACHE, help=f"where the wheel goes (default {DEFAULT_CACHE})"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="where the TensorFlow wheel is kept"
    )
    parser.add_argument(
        "--arch", default="aarch64", help="architecture of the TensorFlow wheel (default aarch64)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tensorflow-wheel", type=Path, help=f"use this tensorflow {TF_VERSION} wheel")
    source.add_argument(
        "--from-installed", type=Path, metavar="DIR", help="an installed tensorflow package directory"
    )
    args = parser.parse_args(argv)
    try:
        path = build(
            out=args.out,
            arch=args.arch,
            tensorflow_wheel=args.tensorflow_wheel,
            from_installed=args.from_installed,
            cache=args.cache,
        )
    except BuildError as err:
        print(f"build_tflite_runtime: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
