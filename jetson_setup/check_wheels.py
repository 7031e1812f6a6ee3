#!/usr/bin/env python3
"""Check that every pinned package has a wheel the Jetson TX2 (JetPack 4.6) can load.

A wheel's manylinux tag is only its maker's claim: ai-edge-litert 2.3.0 is tagged
manylinux_2_27 but its shared objects need GLIBC_2.34. So this fetches (or finds in a
cache) the aarch64 wheel pip would pick on the board for each ``NAME==VERSION`` pin, reads
the symbol versions every ELF file in it needs (``readelf -V``: ``.gnu.version_r``), and
compares the highest GLIBC_, GLIBCXX_ and CXXABI_ with what the board's libraries provide.

    # online (pip download into the cache; PyPI reachable), the pins of environment.yml:
    python jetson_setup/check_wheels.py --cache ~/.cache/elma/jetson-wheels
    # offline, from that cache only (a copy of it on another machine, say):
    python jetson_setup/check_wheels.py --cache DIR --offline
    # other pins, Markdown for the README, all details as JSON:
    python jetson_setup/check_wheels.py --pins requirements.txt --markdown --json out.json

Results per pin: ``OK`` (a wheel pip on the board accepts, needing no newer symbols),
``pure Python``, ``TOO NEW`` (only wheels tagged for a newer glibc, or its shared objects
need newer symbol versions than the board has), ``NO aarch64 WHEEL`` (none for Python 3.11
on aarch64 at all), ``NOT IN CACHE`` (--offline and nothing cached). Exit status: 0 every
pin loads on the board, 1 at least one does not, 2 a usage error or a missing tool.

A pin with a local version, ``tflite-runtime==2.21.0+elma`` (the board's LiteRT interpreter), is
on no index: it is built into the cache by ``build_tflite_runtime.py`` (from TensorFlow 2.21.0's
aarch64 wheel, sha256-checked) and then judged like any other wheel.

Needs ``readelf`` (binutils) and, unless --offline, pip and the package index. Runs on any
machine (it never imports or runs the wheels' code).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # build_tflite_runtime.py, for the board's interpreter wheel
DEFAULT_PINS = HERE / "environment.yml"
DEFAULT_CACHE = Path(os.environ.get("ELMA_WHEEL_CACHE", Path.home() / ".cache" / "elma" / "jetson-wheels"))

# What JetPack 4.6 (L4T R32.6.1) provides: its root file system is Ubuntu 18.04 "bionic".
#   glibc:     bionic's libc6 is 2.27 (2.27-3ubuntu1.x)   -> symbol versions up to GLIBC_2.27
#   libstdc++: bionic's libstdc++6 is built from gcc 8 (8.4.0-1ubuntu1~18.04; the default
#              compiler is gcc 7, the runtime library is gcc 8's) -> GLIBCXX_3.4.25 and
#              CXXABI_1.3.11 (libstdc++'s ABI policy table: GCC 8.1.0 = GLIBCXX_3.4.25,
#              CXXABI_1.3.11; GCC 9.1.0 adds GLIBCXX_3.4.26, CXXABI_1.3.12).
JETPACK_46 = {"GLIBC": "2.27", "GLIBCXX": "3.4.25", "CXXABI": "1.3.11"}
TARGET_NAME = "JetPack 4.6 (Ubuntu 18.04: glibc 2.27, libstdc++ of gcc 8)"
FAMILIES = ("GLIBC", "GLIBCXX", "CXXABI")
PYTHON = "3.11"
NEWEST_MANYLINUX = 45  # how far up "newer" tags are looked for (manylinux_2_28 .. _2_45)
ELF_MACHINES = {"aarch64": "AArch64", "x86_64": "Advanced Micro Devices X86-64"}

# Packages whose wheel loads a system library through ctypes (nothing readelf can see).
SYSTEM_LIBRARIES = {
    "sounddevice": "loads libportaudio via ctypes (apt: libportaudio2)",
    "soundfile": "the none-any wheel loads the system's libsndfile (apt: libsndfile1)",
}

# Libraries the board has without asking (Ubuntu 18.04's libc6, libstdc++6, libgcc1, zlib1g;
# libgomp1 with build-essential from 00_system_packages.sh). Any other library a wheel links to
# and does not bundle is named in the result's note.
BASE_LIBRARIES = {
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libutil.so.1",
    "libresolv.so.2",
    "libstdc++.so.6",
    "libgcc_s.so.1",
    "libz.so.1",
    "libgomp.so.1",
    "libgomp.so.1.0.0",
    "ld-linux-aarch64.so.1",
    "ld-linux-x86-64.so.2",
}

OK, PURE, TOO_NEW, NO_WHEEL, NOT_CACHED, ERROR = (
    "OK",
    "pure Python",
    "TOO NEW",
    "NO aarch64 WHEEL",
    "NOT IN CACHE",
    "ERROR",
)
LOADS = (OK, PURE)

_PIN = re.compile(r"^\s*(?:-\s*)?([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)\s*(?:#.*)?$")
_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def normalize(name: str) -> str:
    """PEP 503: ``PyNaCl`` and ``pynacl``, ``typing_extensions`` and ``typing-extensions`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def read_pins(path: Path) -> list[tuple[str, str]]:
    """``NAME==VERSION`` lines of a requirements file or of environment.yml's pip section."""
    pins = []
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins.append((match.group(1), match.group(2)))
    return pins


# ----------------------------------------------------------------------- ELF (readelf)
@dataclasses.dataclass
class ElfInfo:
    path: str
    machine: str = ""
    soname: str = ""
    needed: list[str] = dataclasses.field(default_factory=list)
    # library file name -> the symbol versions needed from it (readelf's "File:" / "Name:")
    version_needs: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    # symbol version -> the undefined (imported) symbols bound to it, e.g. GLIBC_2.28 -> fcntl64
    imports: dict[str, set[str]] = dataclasses.field(default_factory=dict)


def parse_readelf(text: str, path: str = "") -> ElfInfo:
    """Parse ``readelf -h -d -V --dyn-syms -W`` output: machine, SONAME, NEEDED, the symbol
    versions needed from each library (.gnu.version_r) and the imported symbols per version."""
    info = ElfInfo(path=path)
    in_needs = False
    current = None
    for line in text.splitlines():
        if m := re.match(r"\s*Machine:\s+(.+?)\s*$", line):
            info.machine = m.group(1)
        elif m := re.search(r"\(SONAME\)\s+Library soname: \[(.+)\]", line):
            info.soname = m.group(1)
        elif m := re.search(r"\(NEEDED\)\s+Shared library: \[(.+)\]", line):
            info.needed.append(m.group(1))
        elif m := re.match(r"\s*\d+: [0-9a-f]+\s+\S+\s+\w+\s+\w+\s+\w+\s+UND (\S+?)@+(\S+)", line):
            info.imports.setdefault(m.group(2), set()).add(m.group(1))
        if line.startswith("Version needs section"):
            in_needs = True
            continue
        if in_needs:
            if m := re.search(r"Version: \d+\s+File: (\S+)\s+Cnt:", line):
                current = m.group(1)
                info.version_needs.setdefault(current, set())
            elif (m := re.search(r"Name: (\S+)\s+Flags:", line)) and current is not None:
                info.version_needs[current].add(m.group(1))
            elif line.strip() and not line.lstrip().startswith(("Addr:", "0x", "0")):
                in_needs = False  # the next section of the output
    return info


def readelf(path: Path) -> ElfInfo:
    done = subprocess.run(
        ["readelf", "-h", "-d", "-V", "--dyn-syms", "-W", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},  # the labels parse_readelf reads are untranslated
    )
    if done.returncode != 0 and not done.stdout:
        raise RuntimeError(f"readelf failed on {path}: {done.stderr.strip()}")
    return parse_readelf(done.stdout, str(path))


def highest(versions: Iterable[str], family: str) -> str | None:
    """The highest ``FAMILY_x.y.z`` among symbol version names (GLIBC_2.2.5 < GLIBC_2.17)."""
    found = [
        v.split("_", 1)[1]
        for v in versions
        if v.startswith(family + "_") and v[len(family) + 1 :][:1].isdigit()
    ]
    return max(found, key=version_tuple) if found else None


def needs_of(elfs: Sequence[ElfInfo]) -> dict[str, str | None]:
    """Highest GLIBC/GLIBCXX/CXXABI needed from libraries *outside* the wheel.

    A version needed from a library the wheel bundles itself (a renamed libstdc++, say) is
    satisfied inside the wheel, so it does not count against the board."""
    inside = {Path(e.path).name for e in elfs} | {e.soname for e in elfs if e.soname}
    outside: set[str] = set()
    for e in elfs:
        for lib, names in e.version_needs.items():
            if lib not in inside:
                outside |= names
    return {f: highest(outside, f) for f in FAMILIES}


# -------------------------------------------------------------------------- wheel tags
def wheel_tags(filename: str) -> dict | None:
    m = _WHEEL.match(filename)
    if not m:
        return None
    d = m.groupdict()
    return {**d, "plats": d["plat"].split("."), "pys": d["py"].split("."), "abis": d["abi"].split(".")}


def plat_glibc(plat: str, arch: str) -> tuple[int, int] | None:
    """(2, 27) for manylinux_2_27_<arch>, (2, 17) for manylinux2014_<arch>; None otherwise."""
    if m := _MANYLINUX.match(plat):
        return (int(m.group(1)), int(m.group(2))) if m.group(3) == arch else None
    for legacy, glibc in _LEGACY.items():
        if plat == f"{legacy}_{arch}":
            return glibc
    return None


def wheel_fits_python(tags: dict, python: str) -> bool:
    """cp311-cp311, cp3x-abi3 (x <= 11), py3-none: what pip on that Python accepts."""
    major, minor = version_tuple(python)[:2]
    for py in tags["pys"]:
        for abi in tags["abis"]:
            if py in (f"py{major}", f"py{major}{minor}") and abi == "none":
                return True
            if py == f"cp{major}{minor}" and abi in (f"cp{major}{minor}", "none", "abi3"):
                return True
            m = re.fullmatch(r"cp(\d)(\d+)", py)
            if m and abi == "abi3" and int(m.group(1)) == major and int(m.group(2)) <= minor:
                return True
    return False


def wheel_platform(tags: dict, arch: str) -> tuple[str, tuple[int, int] | None]:
    """("any", None), ("arch", lowest glibc its tags allow) or ("other", None)."""
    if "any" in tags["plats"]:
        return "any", None
    glibcs = [g for p in tags["plats"] if (g := plat_glibc(p, arch))]
    return ("arch", min(glibcs)) if glibcs else ("other", None)


def short_tag(tags: dict) -> str:
    return ".".join(re.sub(r"_(aarch64|x86_64)$", "", p) for p in tags["plats"])


# --------------------------------------------------------------------------- the check
@dataclasses.dataclass
class Result:
    package: str
    version: str
    result: str
    wheel: str = ""
    tag: str = ""
    needs: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(FAMILIES))
    why: str = ""
    note: str = ""
    elf_files: int = 0
    external_needed: list[str] = dataclasses.field(default_factory=list)
    other_version_needs: list[str] = dataclasses.field(default_factory=list)
    too_new_symbols: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def scan_wheel(wheel: Path, arch: str) -> tuple[list[ElfInfo], list[str]]:
    """readelf on every ELF file of this machine in the wheel; the names of those of others
    (SpeechRecognition's none-any wheel ships flac executables for x86 and macOS, say)."""
    elfs, foreign = [], []
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        for member in zf.infolist():
            if member.is_dir():
                continue
            with zf.open(member) as fh:
                if fh.read(4) != b"\x7fELF":
                    continue
            out = Path(tmp) / "elf"
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            info = readelf(out)
            info.path = member.filename
            if info.machine != ELF_MACHINES.get(arch, arch):
                foreign.append(f"{member.filename} ({info.machine})")
            else:
                elfs.append(info)
    return elfs, foreign


def judge(package: str, version: str, wheel: Path, arch: str, limits: dict[str, str]) -> Result:
    tags = wheel_tags(wheel.name) or {"plats": ["?"]}
    res = Result(package, version, OK, wheel=wheel.name, tag=short_tag(tags))
    kind, glibc_tag = wheel_platform(tags, arch)
    elfs, foreign = scan_wheel(wheel, arch)
    res.elf_files = len(elfs)
    notes = []
    if normalize(package) in SYSTEM_LIBRARIES and not (normalize(package) == "soundfile" and elfs):
        notes.append(SYSTEM_LIBRARIES[normalize(package)])  # soundfile's platform wheels bundle it
    if foreign:
        notes.append(f"{len(foreign)} ELF files for other machines ignored, e.g. {foreign[0]}")
    res.note = "; ".join(notes)
    if not elfs:
        res.result = PURE if kind == "any" else OK
        if kind == "arch" and glibc_tag > version_tuple(limits["GLIBC"])[:2]:
            res.result, res.why = TOO_NEW, f"tag needs glibc {glibc_tag[0]}.{glibc_tag[1]}"
        return res
    res.needs = needs_of(elfs)
    inside = {Path(e.path).name for e in elfs} | {e.soname for e in elfs if e.soname}
    res.external_needed = sorted({n for e in elfs for n in e.needed} - inside)
    res.other_version_needs = sorted(
        {
            v
            for e in elfs
            for lib, names in e.version_needs.items()
            if lib not in inside
            for v in names
            if not v.startswith(tuple(f + "_" for f in FAMILIES))
        }
    )
    unusual = [lib for lib in res.external_needed if lib not in BASE_LIBRARIES]
    if unusual:
        res.note = "; ".join(filter(None, [res.note, "links to system " + ", ".join(unusual)]))
    why = []
    if kind == "arch" and glibc_tag > version_tuple(limits["GLIBC"])[:2]:
        why.append(f"tag manylinux_{glibc_tag[0]}_{glibc_tag[1]}: pip on the board refuses it")
    for family in FAMILIES:
        need = res.needs[family]
        if need and version_tuple(need) > version_tuple(limits[family]):
            symbols = sorted(
                {
                    sym
                    for e in elfs
                    for ver, syms in e.imports.items()
                    if ver.startswith(family + "_")
                    and version_tuple(ver.split("_", 1)[1]) > version_tuple(limits[family])
                    for sym in syms
                }
            )
            res.too_new_symbols[family] = symbols
            # the few C symbols by name (fcntl64, statx: built against a newer glibc), else a count
            named = 0 < len(symbols) <= 3 and all(len(sym) <= 24 for sym in symbols)
            shown = ", ".join(symbols) if named else f"{len(symbols)} symbols"
            why.append(f"{family}_{need} > {limits[family]}" + (f": {shown}" if symbols else ""))
    if why:
        res.result, res.why = TOO_NEW, "; ".join(why)
    return res


def cached_wheels(cache: Path, package: str, version: str, arch: str, python: str) -> list[Path]:
    """Wheels in the cache for this pin that pip on the board could consider (any or arch)."""
    found = []
    for wheel in sorted(cache.glob("*.whl")):
        tags = wheel_tags(wheel.name)
        if not tags or normalize(tags["name"]) != normalize(package) or tags["version"] != version:
            continue
        if wheel_fits_python(tags, python) and wheel_platform(tags, arch)[0] != "other":
            found.append(wheel)
    return found


def best_wheel(wheels: list[Path], arch: str, limits: dict[str, str]) -> Path | None:
    """What pip on the board would pick: a platform wheel its glibc accepts, else none-any,
    else (to report what it needs) the wheel with the oldest tag."""
    glibc = version_tuple(limits["GLIBC"])[:2]

    def key(wheel: Path) -> tuple:
        kind, tag = wheel_platform(wheel_tags(wheel.name), arch)
        if kind == "arch" and tag <= glibc:
            return (0, tuple(-x for x in tag))  # the newest tag the board accepts, as pip does
        if kind == "any":
            return (1, ())
        return (2, tag)

    return min(wheels, key=key) if wheels else None


def no_wheel_marker(cache: Path, package: str, version: str, arch: str, python: str) -> Path:
    return cache / f"{normalize(package)}-{version}-cp{python.replace('.', '')}-{arch}.no-wheel"


def platforms(arch: str, low: int, high: int) -> list[str]:
    plats = [f"manylinux_2_{minor}_{arch}" for minor in range(low, high + 1)]
    if low <= 17:
        plats.append(f"manylinux2014_{arch}")
    return plats


def pip_download(package: str, version: str, cache: Path, plats: list[str], python: str) -> tuple[bool, str]:
    """pip download --no-deps of one pin for these platforms; (found, pip's output)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
    ]
    cmd += ["--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}"]
    for plat in plats:
        cmd += ["--platform", plat]
    cmd += ["-d", str(cache), f"{package}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.returncode == 0, done.stdout + done.stderr


def _not_found(output: str) -> bool:
    return "No matching distribution found" in output or "Could not find a version" in output


def build_local(package: str, version: str, cache: Path, arch: str) -> str | None:
    """Build a wheel PyPI does not have (the board's tflite-runtime) into the cache; None when
    built, else why not."""
    import build_tflite_runtime as btr  # beside this script

    if (normalize(package), version) != ("tflite-runtime", btr.VERSION):
        return f"{package}=={version} is not on PyPI and not built here (only tflite-runtime=={btr.VERSION})"
    if arch not in btr.TF_WHEELS:
        return f"no pinned TensorFlow wheel for {arch} to build it from"
    try:
        btr.build(out=cache, arch=arch, cache=cache)
    except btr.BuildError as err:
        return str(err)
    return None


def check_pin(
    package: str, version: str, cache: Path, *, offline: bool, arch: str, python: str, limits: dict[str, str]
) -> Result:
    glibc_minor = version_tuple(limits["GLIBC"])[1]
    wheels = cached_wheels(cache, package, version, arch, python)
    pick = best_wheel(wheels, arch, limits)
    marker = no_wheel_marker(cache, package, version, arch, python)
    if "+" in version and pick is None and not offline:
        # a local version (+elma): built from another project's wheel, see build_tflite_runtime.py
        why = build_local(package, version, cache, arch)
        if why:
            return Result(package, version, ERROR, why=why)
        wheels = cached_wheels(cache, package, version, arch, python)
        pick = best_wheel(wheels, arch, limits)
    elif not offline and (pick is None or not _accepted(pick, arch, limits)):
        # first what pip on the board would accept, then newer tags (to say what they need)
        for plats in (platforms(arch, 17, glibc_minor), platforms(arch, glibc_minor + 1, NEWEST_MANYLINUX)):
            ok, output = pip_download(package, version, cache, plats, python)
            if ok:
                break
            if not _not_found(output):
                return Result(package, version, ERROR, why="pip download failed: " + output.strip()[-300:])
        wheels = cached_wheels(cache, package, version, arch, python)
        pick = best_wheel(wheels, arch, limits)
        if pick is None:
            marker.write_text(f"pip download found no {arch} wheel for Python {python}\n")
        else:
            marker.unlink(missing_ok=True)
    if pick is None:
        if marker.exists():
            return Result(package, version, NO_WHEEL, why=f"no wheel for Python {python} on {arch}")
        return Result(package, version, NOT_CACHED, why=f"no wheel in {cache}")
    return judge(package, version, pick, arch, limits)


def _accepted(wheel: Path, arch: str, limits: dict[str, str]) -> bool:
    kind, tag = wheel_platform(wheel_tags(wheel.name), arch)
    return kind == "any" or (kind == "arch" and tag <= version_tuple(limits["GLIBC"])[:2])


# -------------------------------------------------------------------------------- output
COLUMNS = ("package", "version", "wheel tag", "GLIBC", "GLIBCXX", "CXXABI", "result")


def rows(results: Sequence[Result]) -> list[list[str]]:
    out = []
    for r in results:
        result = r.result + (f" ({r.why})" if r.why else "") + (f"; {r.note}" if r.note else "")
        needs = [r.needs.get(f) or "-" for f in FAMILIES]
        out.append([r.package, r.version, r.tag or "-", *needs, result])
    return out


def render_text(results: Sequence[Result], limits: dict[str, str]) -> str:
    table = [list(COLUMNS), ["board", "", TARGET_NAME.split(" (")[0], *(limits[f] for f in FAMILIES), ""]]
    table += rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in table
    ]
    return "\n".join(lines)


def render_markdown(results: Sequence[Result], limits: dict[str, str]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines.append(f"| *the board* | | *{TARGET_NAME}* | " + " | ".join(limits[f] for f in FAMILIES) + " | |")
    for r, row in zip(results, rows(results), strict=True):
        row[-1] = f"**{r.result}**" + row[-1][len(r.result) :]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    bad = [r for r in results if r.result not in LOADS]
    if not bad:
        return f"all {len(results)} pins have a wheel that loads on the board"
    return f"{len(bad)} of {len(results)} pins have no wheel that loads on the board: " + ", ".join(
        f"{r.package}=={r.version} ({r.result})" for r in bad
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "pins", nargs="*", metavar="NAME==VERSION", help="pins to check (default: --pins file)"
    )
    parser.add_argument(
        "--pins", dest="pins_file", type=Path, default=None, help=f"default {DEFAULT_PINS.name}"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"wheel cache (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--offline", action="store_true", help="use only the wheels in --cache")
    parser.add_argument("--arch", default="aarch64", help="machine of the wheels (default aarch64)")
    parser.add_argument("--python-version", default=PYTHON, help=f"default {PYTHON}")
    for family in FAMILIES:
        parser.add_argument(
            f"--{family.lower()}", default=JETPACK_46[family], help=f"default {JETPACK_46[family]}"
        )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path, help="also write every detail to this JSON file")
    args = parser.parse_args(argv)
    if shutil.which("readelf") is None:
        print("check_wheels: readelf not found (apt-get install binutils)", file=sys.stderr)
        return 2
    pins = [tuple(p.split("==", 1)) for p in args.pins]
    if any(len(p) != 2 for p in pins):
        parser.error("pins are NAME==VERSION")
    if args.pins_file or not pins:
        pins += read_pins(args.pins_file or DEFAULT_PINS)
    if not pins:
        parser.error("no NAME==VERSION pins given")
    limits = {f: getattr(args, f.lower()) for f in FAMILIES}
    args.cache.mkdir(parents=True, exist_ok=True)
    results = [
        check_pin(
            name,
            version,
            args.cache,
            offline=args.offline,
            arch=args.arch,
            python=args.python_version,
            limits=limits,
        )
        for name, version in pins
    ]
    print(render_markdown(results, limits) if args.markdown else render_text(results, limits))
    print()
    print(summary(results))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "target": TARGET_NAME,
                    "limits": limits,
                    "arch": args.arch,
                    "python": args.python_version,
                    "results": [dataclasses.asdict(r) for r in results],
                },
                indent=1,
            )
            + "\n"
        )
    if any(r.result == ERROR for r in results):
        return 2
    return 0 if all(r.result in LOADS for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
