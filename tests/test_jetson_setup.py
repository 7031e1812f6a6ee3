"""jetson_setup/: every script in dry-run on a simulated Jetson, refusals, idempotence, pins.

The scripts change a real board (fstab, swap, mkfs), so here they run with --dry-run and
with the probes pointed at temporary files (ELMA_JETSON_RELEASE_FILE, ELMA_UNAME_M,
ELMA_FSTAB, ELMA_FAKE_FREE_GB, ...). The helpers that write files are also run for real on
temporary files, and 04_verify.sh (which changes nothing) runs for real on a small bundle.
environment.yml must hold the whole device program (pyproject's `edge` extra), equal to
requirements.txt except where the board needs other wheels (DEVICE_DIFFERS, LEFT_OUT);
check_wheels.py (which glibc each pinned wheel needs) runs offline on wheels made here from the
venv's own shared objects, its readelf reading checked against the version names in their bytes,
and for real on every wheel of environment.yml (all must load on JetPack 4.6).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from elma_utils.config import PROJECT_ROOT

SETUP = PROJECT_ROOT / "jetson_setup"
CHANGING = [
    "00_system_packages.sh",
    "01_external_ssd.sh",
    "02_python_env.sh",
    "03_performance_mode.sh",
    "90_tensorflow_from_source.sh",
]
SCRIPTS = [*CHANGING, "04_verify.sh"]
NEEDED_ARGS = {
    "01_external_ssd.sh": ["--device", "/dev/sda1"],
    "90_tensorflow_from_source.sh": ["--source-build"],
}
UUID = "0a1b2c3d-1111-2222-3333-444455556666"
MNT = "/mnt/elma-ssd"
FSTAB_LINE = f"UUID={UUID} {MNT} ext4 defaults,nofail,noatime,x-systemd.device-timeout=10s 0 2"
SWAP_LINE = f"{MNT}/swapfile none swap sw,nofail 0 0"
# /etc/nv_tegra_release of JetPack 4.6 (L4T R32.6.1) on a TX2 (t186ref)
RELEASE = "# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t186ref, EABI: aarch64, DATE: Mon Jul 26 19:36:31 UTC 2021\n"
# Where the board's environment (environment.yml) differs from requirements.txt, the x86
# development machine's: package -> (requirements.txt, environment.yml). Why: environment.yml's
# header and README.md, "Wheels on the TX2" (each x86 pin's aarch64 wheel needs glibc > 2.27).
DEVICE_DIFFERS = {
    "onnxruntime": ("1.32.0", "1.28.0"),
    "av": ("18.1.0", "14.2.0"),
    "huggingface-hub": ("2.4.0", "0.31.4"),
}
DEVICE_ONLY = {"tflite-runtime": "2.21.0+elma"}  # instead of ai-edge-litert 2.3.0
LEFT_OUT = {
    "ai-edge-litert",
    "ml-dtypes",
    "backports-strenum",
    "hf-xet",
    "httpx2",
    "httpcore2",
    "h11",
    "anyio",
    "truststore",
}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A simulated TX2: release file, aarch64, plenty of disk, temporary fstab/home/logs."""
    release = tmp_path / "nv_tegra_release"
    release.write_text(RELEASE)
    (tmp_path / "home").mkdir()
    (tmp_path / "fstab").write_text("# <file system> <mount point> <type> <options> <dump> <pass>\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("ELMA_")}
    return {
        **base,
        "ELMA_JETSON_RELEASE_FILE": str(release),
        "ELMA_UNAME_M": "aarch64",
        "ELMA_LOG_DIR": str(tmp_path / "logs"),
        "ELMA_FSTAB": str(tmp_path / "fstab"),
        "ELMA_FAKE_UUID": UUID,
        "ELMA_FAKE_FREE_GB": "500",
        "ELMA_TARGET_HOME": str(tmp_path / "home"),
        "ELMA_STATE_DIR": str(tmp_path / "state"),
    }


def run(script: str, *args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SETUP / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def dry(script: str, *args: str, env: dict[str, str]) -> str:
    """Run in dry-run; it must succeed. Returns stdout (stderr is merged into it by the log)."""
    result = run(script, *NEEDED_ARGS.get(script, []), *args, "--dry-run", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def commands(output: str) -> list[str]:
    """The commands a dry run printed, without the sudo prefix a non-root run adds."""
    lines = [line[len("[dry-run] ") :] for line in output.splitlines() if line.startswith("[dry-run] ")]
    return [re.sub(r"^sudo (-H |-u \S+ )?", "", line) for line in lines]


def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    tool = bindir / name
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(0o755)
    return bindir


# ------------------------------------------------------------------------- every script
@pytest.mark.parametrize("script", [*SCRIPTS, "lib.sh"])
def test_scripts_are_strict_bash_and_shellcheck_clean(script: str) -> None:
    path = SETUP / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    if script != "lib.sh":
        assert os.access(path, os.X_OK), f"{script} is not executable"
        assert "\nset -euo pipefail\n" in text
        assert "require_jetson" in text or script == "04_verify.sh"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, check=False).returncode == 0
    check = subprocess.run(
        ["shellcheck", "-x", "--shell=bash", script], cwd=SETUP, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_dry_run(script: str, env) -> None:
    result = run(script, "--help", env=env)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ") and "--dry-run" in result.stdout
    bad = run(script, "--no-such-option", env=env)
    assert bad.returncode == 2 and "unknown option: --no-such-option" in bad.stdout + bad.stderr


@pytest.mark.parametrize("script", CHANGING)
@pytest.mark.parametrize("machine", ["no release file", "x86_64"])
def test_refuses_to_change_a_machine_that_is_not_a_jetson(script: str, machine: str, env, tmp_path) -> None:
    if machine == "no release file":
        env["ELMA_JETSON_RELEASE_FILE"] = str(tmp_path / "missing")
        why = "no " + str(tmp_path / "missing")
    else:
        env["ELMA_UNAME_M"] = "x86_64"
        why = "uname -m is x86_64, not aarch64"
    fstab_before = Path(env["ELMA_FSTAB"]).read_text()
    result = run(script, *NEEDED_ARGS.get(script, []), env=env)
    assert result.returncode == 3, result.stdout
    assert f"refusing to change this machine: it is not an aarch64 Jetson ({why})" in result.stdout
    assert not commands(result.stdout) and "\n+ " not in result.stdout  # nothing was run
    assert Path(env["ELMA_FSTAB"]).read_text() == fstab_before
    # the same on the same machine in dry-run: commands shown, nothing refused
    out = dry(script, env=env)
    assert "not an aarch64 Jetson" in out and "showing the commands only" in out
    assert commands(out)


@pytest.mark.parametrize("script", CHANGING)
def test_every_run_is_logged_to_a_file(script: str, env, tmp_path) -> None:
    out = dry(script, env=env)
    logs = list((tmp_path / "logs").glob(f"{script[:-3]}-*.log"))
    assert len(logs) == 1
    logged = logs[0].read_text()
    assert "Jetson: L4T R32.6.1 on aarch64" in logged
    assert commands(out) and commands(out)[-1] in logged


# ------------------------------------------------------------------------- the SSD (01)
def test_ssd_is_mounted_by_uuid_from_fstab_and_never_formatted_unasked(env) -> None:
    out = dry("01_external_ssd.sh", env=env)
    cmds = commands(out)
    assert f"append to {env['ELMA_FSTAB']}: {FSTAB_LINE}" in cmds
    assert f"mount -T {env['ELMA_FSTAB']} {MNT}" in cmds
    assert not any("mkfs" in c for c in cmds)
    assert "# <file system>" in Path(env["ELMA_FSTAB"]).read_text()  # dry run: untouched
    assert len(Path(env["ELMA_FSTAB"]).read_text().splitlines()) == 1


def test_format_only_when_asked_with_the_uuid_written_to_fstab(env) -> None:
    cmds = commands(dry("01_external_ssd.sh", "--format", env=env))
    mkfs = f"mkfs.ext4 -F -L elma-ssd -U {UUID} /dev/sda1"
    assert mkfs in cmds
    assert cmds.index(mkfs) < cmds.index(f"append to {env['ELMA_FSTAB']}: {FSTAB_LINE}")


def test_bazel_output_root_and_caches_move_to_the_ssd(env) -> None:
    home = env["ELMA_TARGET_HOME"]
    cmds = commands(dry("01_external_ssd.sh", env=env))
    assert f"append to {home}/.bazelrc: startup --output_user_root={MNT}/bazel" in cmds
    assert f"ln -s {MNT}/bazel {home}/.cache/bazel" in cmds
    assert f"append to /etc/environment: PIP_CACHE_DIR={MNT}/cache/pip" in cmds
    assert f"append to /etc/environment: CONDA_PKGS_DIRS={MNT}/cache/conda-pkgs" in cmds
    assert "write /etc/apt/apt.conf.d/90elma-ssd-cache:" in cmds
    out = dry("01_external_ssd.sh", env=env)
    assert f'Dir::Cache::archives "{MNT}/cache/apt/archives";' in out.splitlines()


def test_an_old_bazel_cache_on_the_emmc_is_moved(env) -> None:
    home = Path(env["ELMA_TARGET_HOME"])
    (home / ".cache" / "bazel").mkdir(parents=True)
    cmds = commands(dry("01_external_ssd.sh", env=env))
    moves = [c for c in cmds if c.startswith(f"mv {home}/.cache/bazel {MNT}/bazel/moved-from-emmc-")]
    assert len(moves) == 1
    assert cmds.index(moves[0]) < cmds.index(f"ln -s {MNT}/bazel {home}/.cache/bazel")


def test_mount_point_follows_elma_ssd_mount(env) -> None:
    env["ELMA_SSD_MOUNT"] = "/media/fast"
    cmds = commands(dry("01_external_ssd.sh", env=env))
    assert f"append to {env['ELMA_FSTAB']}: {FSTAB_LINE.replace(MNT, '/media/fast')}" in cmds
    assert "fallocate -l 8G /media/fast/swapfile" in cmds


@pytest.mark.parametrize(
    ("args", "size"), [([], "8G"), (["--swap-gb", "4"], "4G"), (["--swap-gb", "0"], None)]
)
def test_swap_file_size(args: list[str], size: str | None, env) -> None:
    cmds = commands(dry("01_external_ssd.sh", *args, env=env))
    swap = f"{MNT}/swapfile"
    if size is None:
        assert not any("swapfile" in c for c in cmds)
        return
    expected = [f"fallocate -l {size} {swap}", f"chmod 600 {swap}", f"mkswap {swap}", f"swapon {swap}"]
    assert [c for c in cmds if swap in c and not c.startswith("append")] == expected
    assert f"append to {env['ELMA_FSTAB']}: {SWAP_LINE}" in cmds


def test_swap_file_refused_on_a_full_ssd(env) -> None:
    env["ELMA_FAKE_FREE_GB"] = "3"
    result = run("01_external_ssd.sh", "--device", "/dev/sda1", "--dry-run", env=env)
    assert result.returncode == 4
    assert f"refusing to start a 8 GB swap file: {MNT} has 3 GB free, it needs at least 9 GB" in result.stdout
    assert not any("fallocate" in c for c in commands(result.stdout))


def test_second_run_adds_nothing_twice(env) -> None:
    home = Path(env["ELMA_TARGET_HOME"])
    fstab = Path(env["ELMA_FSTAB"])
    fstab.write_text(fstab.read_text() + FSTAB_LINE + "\n" + SWAP_LINE + "\n")
    (home / ".bazelrc").write_text(f"startup --output_user_root={MNT}/bazel\n")
    (home / ".cache").mkdir()
    (home / ".cache" / "bazel").symlink_to(f"{MNT}/bazel")
    out = dry("01_external_ssd.sh", env=env)
    cmds = commands(out)
    assert not any(c.startswith(f"append to {fstab}") for c in cmds)
    assert not any(".bazelrc" in c or c.startswith("ln -s") for c in cmds)
    assert f"already in {fstab}: {FSTAB_LINE}" in out
    assert f"already in {fstab}: {SWAP_LINE}" in out
    assert f"already a link: {home}/.cache/bazel -> {MNT}/bazel" in out


def test_fstab_conflicts_and_the_emmc_are_refused(env) -> None:
    fstab = Path(env["ELMA_FSTAB"])
    fstab.write_text(f"UUID=ffff-0000 {MNT} ext4 defaults 0 2\n")
    result = run("01_external_ssd.sh", "--device", "/dev/sda1", "--dry-run", env=env)
    assert result.returncode == 5 and "already mounts something else on /mnt/elma-ssd" in result.stdout
    fstab.write_text(f"UUID={UUID} /data ext4 defaults 0 2\n")
    result = run("01_external_ssd.sh", "--device", "/dev/sda1", "--dry-run", env=env)
    assert result.returncode == 5 and f"already mounts UUID={UUID} elsewhere" in result.stdout
    result = run("01_external_ssd.sh", "--device", "/dev/mmcblk0p1", "--format", "--dry-run", env=env)
    assert result.returncode == 5 and "it is the eMMC / root file system" in result.stdout
    assert not any("mkfs" in c for c in commands(result.stdout))
    result = run("01_external_ssd.sh", "--dry-run", env=env)
    assert result.returncode == 2 and "--device is required" in result.stdout + result.stderr


# --------------------------------------------------------------------- lib.sh for real
def _lib(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {SETUP / 'lib.sh'}; {snippet}"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_append_line_once_and_write_file_really_write_once(env, tmp_path) -> None:
    target = tmp_path / "fstab.real"
    target.write_text("# existing\n")
    line = FSTAB_LINE
    result = _lib(
        f"append_line_once {target} '{line}'; append_line_once {target} '{line}'; "
        f"append_line_once {target} '{SWAP_LINE}'",
        env,
    )
    assert result.returncode == 0, result.stderr
    assert target.read_text().splitlines() == ["# existing", line, SWAP_LINE]
    assert f"already in {target}: {line}" in result.stdout
    conf = tmp_path / "apt.conf"
    result = _lib(f"write_file {conf} 'a \"b\";'; write_file {conf} 'a \"b\";'", env)
    assert conf.read_text() == 'a "b";\n' and f"unchanged: {conf}" in result.stdout


def test_probes_release_free_space_and_refusal(env, tmp_path) -> None:
    assert _lib("l4t_release", env).stdout == "R32.6.1\n"
    assert _lib("is_jetson && echo yes", env).stdout == "yes\n"
    real = {k: v for k, v in env.items() if k != "ELMA_FAKE_FREE_GB"}
    free_here = int(_lib(f"free_gb {tmp_path}", real).stdout)
    assert free_here == shutil.disk_usage(tmp_path).free // 2**30
    assert int(_lib(f"free_gb {tmp_path}/not/yet/there", real).stdout) == free_here  # nearest parent
    env["ELMA_FAKE_FREE_GB"] = "7"
    result = _lib(f"require_free_gb {tmp_path} 8 'the test'", env)
    assert result.returncode == 4 and "has 7 GB free, it needs at least 8 GB" in result.stderr


# ------------------------------------------------------------------- the source build (90)
def test_source_build_needs_its_flag(env) -> None:
    result = run("90_tensorflow_from_source.sh", "--dry-run", env=env)
    assert result.returncode == 2 and "add --source-build" in result.stdout + result.stderr
    assert not commands(result.stdout)


def test_source_build_refused_on_low_disk(env) -> None:
    env["ELMA_FAKE_FREE_GB"] = "5"
    result = run("90_tensorflow_from_source.sh", "--source-build", "--dry-run", env=env)
    assert result.returncode == 4
    assert (
        f"refusing to start the TensorFlow build (Bazel output root {MNT}/bazel): "
        f"{MNT}/bazel has 5 GB free, it needs at least 40 GB" in result.stdout
    )
    assert not commands(result.stdout)  # refused before any command
    env["ELMA_TF_BUILD_NEED_GB"] = "4"
    assert run("90_tensorflow_from_source.sh", "--source-build", "--dry-run", env=env).returncode == 0


def test_source_build_puts_bazel_output_root_on_the_ssd(env) -> None:
    cmds = commands(dry("90_tensorflow_from_source.sh", env=env))
    dist = "https://github.com/bazelbuild/bazel/releases/download/0.26.1/bazel-0.26.1-dist.zip"
    assert f"curl -fsSL -o {MNT}/src/bazel-0.26.1-dist.zip {dist}" in cmds
    assert any(
        c.startswith(f"(cd {MNT}/src/bazel-0.26.1 && env TMPDIR={MNT}/tmp") and "compile.sh" in c
        for c in cmds
    )
    build = [c for c in cmds if " build " in c and "bazel" in c]
    assert len(build) == 1 and f"bazel --output_user_root={MNT}/bazel build" in build[0]
    assert "//tensorflow/tools/pip_package:build_pip_package" in build[0]
    configure = next(c for c in cmds if c.endswith("./configure)"))
    for setting in (
        "TF_CUDA_VERSION=10.2",
        "TF_CUDNN_VERSION=8",
        "TF_TENSORRT_VERSION=8",
        "TF_CUDA_COMPUTE_CAPABILITIES=6.2",
    ):
        assert setting in configure
    assert "git clone --depth 1 --branch v1.15.5 https://github.com/tensorflow/tensorflow.git" in " ".join(
        cmds
    )


# ---------------------------------------------------------------------- packages (00)
def test_system_packages_installs_only_what_is_missing(env, tmp_path) -> None:
    bindir = fake_bin(tmp_path, "dpkg-query", "exit 1")  # nothing installed
    env["PATH"] = f"{bindir}:{env['PATH']}"
    cmds = commands(dry("00_system_packages.sh", env=env))
    install = [c for c in cmds if "apt-get install" in c]
    assert len(install) == 1 and "build-essential" in install[0] and "python3-pip" in install[0]
    # what the device program's soundfile/sounddevice load through ctypes, and readelf
    assert {"libsndfile1", "libportaudio2", "binutils", "espeak-ng"} <= set(install[0].split())
    assert "nvidia-jetpack" not in install[0]
    assert "nvidia-jetpack" in commands(dry("00_system_packages.sh", "--with-jetpack", env=env))[1]
    fake_bin(tmp_path, "dpkg-query", "echo 'install ok installed'")  # everything installed
    out = dry("00_system_packages.sh", env=env)
    assert not commands(out) and "nothing to do" in out


# ---------------------------------------------------------------------- Python env (02)
def test_python_env_from_environment_yml_on_the_ssd(env) -> None:
    cmds = commands(dry("02_python_env.sh", env=env))
    url = "https://github.com/conda-forge/miniforge/releases/download/24.3.0-0/Miniforge3-24.3.0-0-Linux-aarch64.sh"
    assert f"curl -fsSL -o {MNT}/src/Miniforge3-24.3.0-0-Linux-aarch64.sh {url}" in cmds
    assert any(c.startswith("check: sha256sum") for c in cmds)
    create = next(c for c in cmds if " env create " in c)
    assert create.endswith(f"conda env create -p {MNT}/envs/elma-edge -f {SETUP}/environment.yml")
    assert f"PIP_CACHE_DIR={MNT}/cache/pip" in create
    # the interpreter's wheel is built first, where conda's pip step finds it
    build = f"{MNT}/miniforge3/bin/python {SETUP}/build_tflite_runtime.py --out {MNT}/wheels --cache {MNT}/cache/wheels"
    assert any(c.endswith(build) for c in cmds)
    assert cmds.index(next(c for c in cmds if c.endswith(build))) < cmds.index(create)
    assert f"PIP_FIND_LINKS={MNT}/wheels" in create
    assert any(c.endswith(f"-m pip install --no-deps -e {PROJECT_ROOT}") for c in cmds)
    check = next(c for c in cmds if "--versions" in c)
    for pin in ("--expect-python 3.11", "--expect numpy==2.4.6", "--expect tflite-runtime==2.21.0+elma"):
        assert pin in check, check
    assert check.endswith(f"--pins {SETUP}/environment.yml")  # every pin, not only these
    assert not any("jp/v46" in c for c in cmds)
    jp = commands(dry("02_python_env.sh", "--with-jetpack-tf", env=env))
    assert any(
        "--extra-index-url https://developer.download.nvidia.com/compute/redist/jp/v46" in c for c in jp
    )


def test_python_env_second_run_updates_instead_of_reinstalling(env, tmp_path) -> None:
    conda = tmp_path / "miniforge"
    fake_bin(conda, "conda", "exit 0")
    prefix = tmp_path / "envs" / "edge"
    fake_bin(prefix, "python", "exit 0")
    cmds = commands(dry("02_python_env.sh", "--conda-dir", str(conda), "--prefix", str(prefix), env=env))
    assert not any(c.startswith("curl") or " env create " in c for c in cmds)
    update = next(
        c for c in cmds if c.endswith(f"conda env update -p {prefix} -f {SETUP}/environment.yml --prune")
    )
    assert f"PIP_FIND_LINKS={MNT}/wheels" in update


# -------------------------------------------------------------------- performance (03)
@pytest.mark.parametrize(("current", "expect_switch"), [("0", False), ("2", True)])
def test_performance_mode_switches_only_when_needed(current: str, expect_switch: bool, env, tmp_path) -> None:
    bindir = fake_bin(tmp_path, "nvpmodel", f"echo 'NV Power Mode: MODE_{current}'; echo {current}")
    env["PATH"] = f"{bindir}:{env['PATH']}"
    out = dry("03_performance_mode.sh", env=env)
    cmds = commands(out)
    assert ("nvpmodel -m 0" in cmds) is expect_switch
    assert f"nvpmodel mode now: {current}, wanted: 0" in out
    state = env["ELMA_STATE_DIR"]
    assert cmds[-3:] == [
        f"jetson_clocks --store {state}/jetson_clocks.defaults",
        "jetson_clocks",
        "jetson_clocks --show",
    ]
    Path(state).mkdir()
    Path(state, "jetson_clocks.defaults").write_text("saved\n")
    Path(state, "nvpmodel.previous").write_text("2\n")
    cmds = commands(dry("03_performance_mode.sh", env=env))
    assert not any("--store" in c for c in cmds)
    restore = commands(dry("03_performance_mode.sh", "--restore", env=env))
    assert restore == [f"jetson_clocks --restore {state}/jetson_clocks.defaults", "nvpmodel -m 2"]


# ------------------------------------------------------------------- pins agree
def _lib_pins() -> dict[str, str]:
    text = (SETUP / "lib.sh").read_text()
    return dict(re.findall(r'^ELMA_EDGE_(\w+)="([^"]+)"$', text, re.M))


def _env_yml() -> tuple[str, dict[str, str]]:
    spec = yaml.safe_load((SETUP / "environment.yml").read_text())
    deps = spec["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    pins = dict(p.split("==", 1) for p in pip)
    return python.split("=", 1)[1], pins


def test_environment_yml_and_scripts_pin_the_same_versions() -> None:
    lib = _lib_pins()
    python, pins = _env_yml()
    assert python == lib["PYTHON_VERSION"] == "3.11"
    assert pins["numpy"] == lib["NUMPY_VERSION"]
    assert pins[lib["INTERPRETER_PACKAGE"]] == lib["INTERPRETER_VERSION"]
    assert pins["tqdm"] == lib["TQDM_VERSION"]


def _requirements() -> dict[str, str]:
    reqs = {}
    for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("#")[0].strip().split("==", 1)
            reqs[_norm(name)] = version
    return reqs


def test_edge_pins_equal_the_project_requirements_except_where_the_board_differs() -> None:
    _, pins = _env_yml()
    reqs, pins = _requirements(), {_norm(n): v for n, v in pins.items()}
    expected = {
        n: DEVICE_DIFFERS[n][1] if n in DEVICE_DIFFERS else DEVICE_ONLY.get(n, reqs.get(n)) for n in pins
    }
    assert pins == expected, {n: (v, expected[n]) for n, v in pins.items() if v != expected[n]}
    for name, (x86, _board) in DEVICE_DIFFERS.items():
        assert reqs[name] == x86, name  # the x86 pin it replaces is still the project's
    assert set(DEVICE_ONLY).isdisjoint(reqs)
    assert set(reqs) >= LEFT_OUT and LEFT_OUT.isdisjoint(pins)
    header = (SETUP / "environment.yml").read_text().split("name: elma-edge")[0]
    for name, (x86, board) in DEVICE_DIFFERS.items():
        assert re.search(
            rf"{name.replace('-', '[-_]')}\s+{re.escape(board)}\s+instead of (\S+ )?{re.escape(x86)}", header
        ), name
    assert "tflite-runtime 2.21.0+elma  instead of ai-edge-litert 2.3.0" in header


# ------------------------------------------------------------------ verify (04), for real
@pytest.fixture(scope="module")
def bundle(minilm_tokenizer, tmp_path_factory) -> Path:
    """A float32 edge bundle of a tiny random 2-layer model (made here, as notebook 04 does)."""
    import keras

    from elma_utils.export.bundle import write_bundle
    from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
    from elma_utils.model.multi_exit import MultiExitQAModel
    from elma_utils.model.qa_model import SpanQAModel

    keras.utils.set_random_seed(0)
    span = SpanQAModel(build_bert_backbone(dropout=0.0, **{**TINY_BERT, "num_layers": 2}))
    span.build_for()
    return write_bundle(
        MultiExitQAModel.from_span_model(span),
        minilm_tokenizer,
        tmp_path_factory.mktemp("edge") / "float32",
        seq_len=64,
        precision="float32",
        thresholds={"policy": "entropy", "E_T": 0.5, "rule": "max"},
        model_version="jetson-setup-test",
        doc_stride=32,
        max_query_len=24,
    )


def _json_after(output: str, key: str, whole: bool = False) -> dict:
    """The JSON object verify_edge.py printed whose first key is ``key`` (its value, or all of it)."""
    start = output.index('{\n "' + key + '"')
    found = json.JSONDecoder().raw_decode(output[start:])[0]
    return found if whole else found[key]


@pytest.mark.slow
def test_verify_answers_a_sample_question_with_the_bundle(bundle: Path, env, tmp_path) -> None:
    """04_verify.sh for real with the x86 venv: everything runs and passes except the version
    check, which finds exactly the packages the board pins differently."""
    env = {**env, "HOME": str(tmp_path)}
    result = run(
        "04_verify.sh",
        "--python",
        sys.executable,
        "--bundle",
        str(bundle),
        "--repeat",
        "2",
        env=env,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "verify: FAILED (status 1" in out
    versions = _json_after(out, "versions")
    assert versions["numpy"] == "2.4.6" and versions["ai-edge-litert"] == "2.3.0"
    assert versions["tflite-runtime"] is None
    reqs = _requirements()
    board = {name: board for name, (_, board) in DEVICE_DIFFERS.items()}
    expected = [
        f"tflite-runtime not installed (pinned {DEVICE_ONLY['tflite-runtime']})"
    ] * 2  # --expect, --pins
    expected += [
        f"{n} {reqs[_norm(n)]} (pinned {board[_norm(n)]})" for n in _env_yml()[1] if _norm(n) in board
    ]
    report = _json_after(out, "versions", whole=True)
    assert sorted(report["mismatches"]) == sorted(expected)
    answer = _json_after(out, "edge_answer")
    assert answer["model_version"] == "jetson-setup-test" and answer["layers"] == 2
    assert answer["answer"] and answer["answer"] in (
        "The Jetson TX2 is an embedded computer made by NVIDIA. It has a 256-core Pascal GPU, six ARM CPU "
        "cores and 8 GB of memory shared by the CPU and the GPU. It was released in March 2017 and runs "
        "Ubuntu as part of NVIDIA's JetPack."
    )
    assert answer["exit_layer"] in (1, 2) and len(answer["latency_ms"]) == 2
    assert answer["interpreter"] == "ai_edge_litert.interpreter.Interpreter"
    energy = answer["energy"]
    assert energy["items"] == 2 and energy["source"] in ("tegrastats", "rapl", "cpu_time")
    assert (energy["joules"] is None) == (energy["source"] == "cpu_time")
    assert "L4T:" in out and "system python:" in out  # the version report ran
    assert _json_after(out, "versions")["elma"] == "0.1.0"
    assert f'"pins_checked": {len(_env_yml()[1]) + 2}' in out  # environment.yml's and the two --expect
    imports = _json_after(out, "imports")
    assert imports["failed"] == {} and imports["heavy_frameworks_loaded"] == []
    assert imports["interpreter"] == "ai_edge_litert.interpreter.Interpreter"
    selftest = _json_after(out, "self_test")
    assert selftest["failed"] == [], selftest
    assert list(selftest["steps"]) == ["qa", "audio", "vad", "sphinx", "whisper_load", "whisper", "ssh"]
    qa = selftest["steps"]["qa"]["bundles"][str(bundle)]["answers"]
    assert [a["question"] for a in qa] == [q for q, _ in verify_edge.SAMPLES]
    assert qa[0]["answer"] == answer["answer"]  # the same question, the same bundle
    assert selftest["steps"]["sphinx"]["transcript"] == verify_edge.SPOKEN  # espeak-ng's clip
    assert selftest["steps"]["vad"]["segments"] and selftest["steps"]["audio"]["trimmed_seconds"] > 0.5
    assert selftest["steps"]["ssh"]["reply_matches"]
    for module in ("elma_utils.edge.runtime", "elma_utils.edge.ssh_client", "elma_utils.edge.sync"):
        assert module in imports["ok"]
    for module in (
        "elma_utils.speech.recognizers",
        "elma_utils.speech.audio",
        "faster_whisper",
        "onnxruntime",
    ):
        assert module in imports["ok"]
    for module in ("av", "pocketsphinx", "librosa", "paramiko", "elma_utils.edge.runtime:interpreter_class"):
        assert module in imports["ok"]
    assert Path(imports["whisper_model"], "model.bin").is_file()


@pytest.mark.slow
def test_verify_fails_clearly_on_a_tampered_bundle_or_a_wrong_version(bundle: Path, env, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    part = broken / "layer_1.tflite"
    part.write_bytes(part.read_bytes()[:-10])
    result = run(
        "04_verify.sh", "--python", sys.executable, "--bundle", str(broken), "--steps", "qa", env=env
    )
    assert result.returncode == 1  # the first failure: x86's versions are not the board's
    assert "edge bundle check failed: layer_1.tflite" in result.stdout
    selftest = _json_after(result.stdout, "self_test")
    assert selftest["failed"] == ["qa"] and "layer_1.tflite" in selftest["steps"]["qa"]["error"]
    assert "verify: FAILED (status 1" in result.stdout
    alone = subprocess.run(
        [sys.executable, str(SETUP / "verify_edge.py"), "--bundle", str(broken)],
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 2 and "edge bundle check failed: layer_1.tflite" in alone.stderr
    alone = subprocess.run(
        [sys.executable, str(SETUP / "verify_edge.py"), "--self-test", "--steps", "qa", "--qa", str(broken)],
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 5 and _json_after(alone.stdout, "self_test")["failed"] == ["qa"]
    mismatch = subprocess.run(
        [sys.executable, str(SETUP / "verify_edge.py"), "--versions", "--expect", "numpy==1.0.0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mismatch.returncode == 1
    assert json.loads(mismatch.stdout)["mismatches"] == ["numpy 2.4.6 (pinned 1.0.0)"]
    pins = tmp_path / "pins.yml"
    pins.write_text("  - pip:\n      - tqdm==4.70.1\n      - jiwer==0.0.1  # wrong\n      - python=3.11\n")
    mismatch = subprocess.run(
        [sys.executable, str(SETUP / "verify_edge.py"), "--versions", "--pins", str(pins)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mismatch.returncode == 1
    report = json.loads(mismatch.stdout)
    assert report["pins_checked"] == 2 and report["mismatches"] == ["jiwer 4.0.0 (pinned 0.0.1)"]


def test_verify_dry_run_and_missing_python(env, tmp_path) -> None:
    out = dry("04_verify.sh", "--bundle", "/b", env=env)
    cmds = commands(out)
    assert "nvpmodel -q" in cmds and any(c.startswith("dpkg-query") and c.endswith("tensorrt") for c in cmds)
    py = f"{MNT}/envs/elma-edge/bin/python {SETUP}/verify_edge.py"
    assert cmds[-1] == f"{py} --bundle /b --repeat 3"
    versions = next(c for c in cmds if c.startswith(f"{py} --versions"))
    assert versions.endswith(f"--pins {SETUP}/environment.yml")
    assert cmds[-3] == f"{py} --imports"  # every device module and library, before the bundle
    assert cmds[-2] == f"{py} --self-test --qa /b"  # then one step of each part of the program
    cmds = commands(dry("04_verify.sh", "--clip", "/q.wav", "--steps", "vad,ssh", env=env))
    assert cmds[-1] == f"{py} --self-test --clip /q.wav --steps vad\\,ssh"  # printf %q escapes the comma
    result = run("04_verify.sh", "--python", str(tmp_path / "nope"), env=env)
    assert result.returncode == 2 and "no edge Python at" in result.stdout + result.stderr


# ------------------------------------------------- the whole device program (edge extra)
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_installs_the_whole_edge_extra_with_its_pins() -> None:
    import tomllib

    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    edge = dict(req.split("==", 1) for req in extras["edge"])
    _, pins = _env_yml()
    pins = {_norm(n): v for n, v in pins.items()}
    # the board's versions where its wheels differ; ai-edge-litert's place is tflite-runtime's
    want = {
        n: DEVICE_DIFFERS.get(_norm(n), (v, v))[1] for n, v in edge.items() if _norm(n) != "ai-edge-litert"
    }
    assert "ai-edge-litert" in edge and "tflite-runtime" in pins
    wrong = {n: (v, pins.get(_norm(n))) for n, v in want.items() if pins.get(_norm(n)) != v}
    assert not wrong, f"edge extra (pyproject) vs environment.yml: {wrong}"
    assert {"paramiko", "faster-whisper", "pocketsphinx", "librosa", "onnxruntime"} <= set(pins)
    # and the runtime closure the extra pulls in, not only the extra itself
    closure = {"av", "tokenizers", "huggingface-hub", "numba", "llvmlite", "scipy", "soxr", "cffi", "invoke"}
    closure |= set(DEVICE_ONLY)  # the interpreter
    assert closure <= set(pins), closure - set(pins)
    assert len(pins) > 2 * len(edge)


# ------------------------------------------------- check_wheels.py (glibc of the wheels)
def _load_script(name: str):
    """A jetson_setup/*.py script as a module (it is run as a script, not installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SETUP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check_wheels = _load_script("check_wheels")
verify_edge = _load_script("verify_edge")
# Two real shared objects of the project's own venv (requirements.txt pins them)
import _cffi_backend  # noqa: E402
import sentencepiece  # noqa: E402

CFFI_SO = Path(_cffi_backend.__file__)  # C, needs only libc
SPM_SO = next(Path(sentencepiece.__file__).parent.glob("_sentencepiece*.so"))  # C++, a bundled libgomp
SPM_LIBS = sorted(Path(sentencepiece.__file__).parent.parent.glob("sentencepiece.libs/libgomp-*.so*"))
needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")


def _versions_in_bytes(path: Path, family: str) -> set[str]:
    """The version names the file's string table holds, read without readelf."""
    return {
        m.decode()
        for m in re.findall(rb"(?<=\x00)(" + family.encode() + rb"_[0-9][0-9.]*)(?=\x00)", path.read_bytes())
    }


def test_parse_readelf_orders_versions_numerically_and_stops_at_the_section_end() -> None:
    text = """ELF Header:
  Machine:                           AArch64
Dynamic section at offset 0x1 contains 3 entries:
 0x0000000000000001 (NEEDED)             Shared library: [libstdc++.so.6]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000000e (SONAME)             Library soname: [libdemo.so]
Symbol table '.dynsym' contains 3 entries:
   Num:    Value          Size Type    Bind   Vis      Ndx Name
     1: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND fcntl64@GLIBC_2.28 (3)
     2: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND free@GLIBC_2.17 (2)
Version needs section '.gnu.version_r' contains 2 entries:
 Addr: 0x0000000000000798  Offset: 0x000798  Link: 4 (.dynstr)
  000000: Version: 1  File: libstdc++.so.6  Cnt: 2
  0x0010:   Name: GLIBCXX_3.4.9  Flags: none  Version: 5
  0x0020:   Name: CXXABI_1.3.11  Flags: none  Version: 4
  0x0030: Version: 1  File: libc.so.6  Cnt: 3
  0x0040:   Name: GLIBC_2.2.5  Flags: none  Version: 3
  0x0050:   Name: GLIBC_2.28  Flags: none  Version: 2
  0x0060:   Name: GLIBC_2.17  Flags: none  Version: 6

Displaying notes found in: .note.gnu.build-id
  Name: GLIBC_9.99  Flags: none  Version: 9
"""
    info = check_wheels.parse_readelf(text)
    assert info.machine == "AArch64" and info.soname == "libdemo.so"
    assert info.needed == ["libstdc++.so.6", "libc.so.6"]
    assert info.version_needs == {
        "libstdc++.so.6": {"GLIBCXX_3.4.9", "CXXABI_1.3.11"},
        "libc.so.6": {"GLIBC_2.2.5", "GLIBC_2.28", "GLIBC_2.17"},
    }
    assert info.imports == {"GLIBC_2.28": {"fcntl64"}, "GLIBC_2.17": {"free"}}
    assert check_wheels.needs_of([info]) == {"GLIBC": "2.28", "GLIBCXX": "3.4.9", "CXXABI": "1.3.11"}
    assert check_wheels.highest(["GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.3.4"], "GLIBC") == "2.17"
    assert check_wheels.highest(["GLIBCXX_3.4.9", "GLIBCXX_3.4.30", "GLIBC_2.34"], "GLIBCXX") == "3.4.30"


@needs_readelf
def test_readelf_of_real_shared_objects_matches_their_string_tables() -> None:
    """The venv's own .so files (x86_64 here): what the checker reads equals the highest
    version names found in each file's bytes, and the 3-part GLIBC_2.2.5 sorts below 2.14."""
    cffi = check_wheels.readelf(CFFI_SO)
    spm = check_wheels.readelf(SPM_SO)
    machine = check_wheels.ELF_MACHINES.get(os.uname().machine, "")
    assert cffi.machine == spm.machine == machine
    assert "libc.so.6" in cffi.needed and "libstdc++.so.6" in spm.needed
    for path, info in ((CFFI_SO, cffi), (SPM_SO, spm)):
        needs = check_wheels.needs_of([info])
        for family in check_wheels.FAMILIES:
            in_bytes = _versions_in_bytes(path, family)
            expected = max(
                (v.split("_", 1)[1] for v in in_bytes), key=check_wheels.version_tuple, default=None
            )
            assert needs[family] == expected, (path.name, family, in_bytes)
    assert check_wheels.needs_of([cffi])["GLIBC"] is not None
    assert check_wheels.needs_of([cffi])["GLIBCXX"] is None  # C only
    assert check_wheels.needs_of([spm])["GLIBCXX"] and check_wheels.needs_of([spm])["CXXABI"]
    assert "GLIBC_2.2.5" in _versions_in_bytes(CFFI_SO, "GLIBC") or os.uname().machine != "x86_64"


def _wheel(cache: Path, filename: str, files: dict[str, bytes]) -> Path:
    import zipfile

    path = cache / filename
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SETUP / "check_wheels.py"), *args], capture_output=True, text=True, check=False
    )


@needs_readelf
def test_check_wheels_offline_judges_each_kind_of_wheel(tmp_path) -> None:
    """A cache of small wheels made from the venv's real .so files, judged for this machine's
    architecture against a glibc 2.17 board: each result kind, the table, JSON, exit status."""
    arch = os.uname().machine
    cache = tmp_path / "cache"
    cache.mkdir()
    cffi, spm = CFFI_SO.read_bytes(), SPM_SO.read_bytes()
    cffi_glibc = check_wheels.needs_of([check_wheels.readelf(CFFI_SO)])["GLIBC"]
    spm_needs = check_wheels.needs_of([check_wheels.readelf(SPM_SO)])
    assert check_wheels.version_tuple(cffi_glibc) <= (2, 17) < check_wheels.version_tuple(spm_needs["GLIBC"])
    _wheel(cache, f"demo_c-1.0-cp311-cp311-manylinux_2_17_{arch}.whl", {"demo_c/_c.so": cffi})
    _wheel(
        cache, f"demo_c-1.0-cp311-cp311-manylinux_2_17_{'ppc64le' if arch != 'ppc64le' else 's390x'}.whl", {}
    )
    # the C++ module with the libgomp its wheel bundles (what it needs from that is satisfied inside)
    bundled = {f"demo_cxx.libs/{lib.name}": lib.read_bytes() for lib in SPM_LIBS}
    _wheel(cache, f"demo_cxx-2.0-cp311-cp311-manylinux_2_17_{arch}.whl", {"demo_cxx/_m.so": spm, **bundled})
    _wheel(cache, "demo_pure-3.0-py3-none-any.whl", {"demo_pure/__init__.py": b"x = 1\n"})
    _wheel(cache, f"demo_newtag-4.0-cp311-abi3-manylinux_2_28_{arch}.whl", {"demo_newtag/_c.so": cffi})
    _wheel(cache, f"demo_other_py-5.0-cp312-cp312-manylinux_2_17_{arch}.whl", {"x/_c.so": cffi})
    check_wheels.no_wheel_marker(cache, "demo-gone", "6.0", arch, "3.11").write_text("none\n")
    pins = ["demo-c==1.0", "Demo.CXX==2.0", "demo_pure==3.0", "demo-newtag==4.0", "demo-other-py==5.0"]
    pins += ["demo-gone==6.0"]
    report = tmp_path / "r.json"
    args = ["--cache", str(cache), "--offline", "--arch", arch, "--glibc", "2.17", "--json", str(report)]
    done = _check(*pins, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    results = {r["package"]: r for r in json.loads(report.read_text())["results"]}
    assert results["demo-c"]["result"] == "OK" and results["demo-c"]["needs"]["GLIBC"] == cffi_glibc
    assert results["demo-c"]["tag"] == "manylinux_2_17"
    cxx = results["Demo.CXX"]
    assert cxx["result"] == "TOO NEW" and cxx["needs"] == spm_needs
    assert f"GLIBC_{spm_needs['GLIBC']} > 2.17" in cxx["why"] and "tag" not in cxx["why"]
    assert cxx["too_new_symbols"]["GLIBC"]  # the symbols that need the newer glibc, by name
    assert cxx["elf_files"] == 1 + len(SPM_LIBS) and "libstdc++.so.6" in cxx["external_needed"]
    if SPM_LIBS:
        assert any(lib.startswith("libgomp-") for lib in check_wheels.readelf(SPM_SO).version_needs)
        assert not any(lib.startswith("libgomp-") for lib in cxx["external_needed"])
        assert not any(v.startswith(("GOMP_", "OMP_")) for v in cxx["other_version_needs"])
    assert results["demo_pure"]["result"] == "pure Python" and results["demo_pure"]["elf_files"] == 0
    newtag = results["demo-newtag"]
    assert newtag["result"] == "TOO NEW" and newtag["why"].startswith("tag manylinux_2_28")
    assert results["demo-other-py"]["result"] == "NOT IN CACHE"  # a cp312 wheel is not for 3.11
    assert results["demo-gone"]["result"] == "NO aarch64 WHEEL"
    table = done.stdout.splitlines()
    assert table[0].split() == ["package", "version", "wheel", "tag", "GLIBC", "GLIBCXX", "CXXABI", "result"]
    assert table[1].split()[:5] == ["board", "JetPack", "4.6", "2.17", "3.4.25"]
    assert "4 of 6 pins have no wheel that loads on the board" in done.stdout
    # the same board with glibc 2.27: the C++ module loads; what loads gives exit status 0
    done = _check(
        "demo-c==1.0", "demo-cxx==2.0", "demo-pure==3.0", "--cache", str(cache), "--offline", "--arch", arch
    )
    assert done.returncode == 0, done.stdout
    assert "all 3 pins have a wheel that loads on the board" in done.stdout
    md = _check("demo-c==1.0", "--cache", str(cache), "--offline", "--arch", arch, "--markdown").stdout
    assert f"| demo-c | 1.0 | manylinux_2_17 | {cffi_glibc} | - | - | **OK** |" in md.splitlines()


@needs_readelf
@pytest.mark.slow
def test_every_wheel_of_the_device_environment_loads_on_jetpack_46(tmp_path) -> None:
    """check_wheels.py for real on environment.yml: every shared object of every wheel the board
    installs (tflite-runtime built from TensorFlow's wheel included) needs at most GLIBC_2.27,
    GLIBCXX_3.4.25, CXXABI_1.3.11. Uses the wheel cache (~/.cache/elma/jetson-wheels, filled by
    the emulation's build, tests/test_device_emulation.py) and downloads only what it lacks."""
    report = tmp_path / "wheels.json"
    done = _check("--json", str(report))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads(report.read_text())["results"]
    assert [(r["package"], r["version"]) for r in results] == list(_env_yml()[1].items())
    native = [r for r in results if r["elf_files"]]
    assert {r["result"] for r in results} == {"OK", "pure Python"} and len(native) >= 20
    for r in native:
        for family, limit in check_wheels.JETPACK_46.items():
            need = r["needs"][family]
            assert need is None or check_wheels.version_tuple(need) <= check_wheels.version_tuple(limit), r
        assert r["too_new_symbols"] == {}
    interpreter = next(r for r in results if r["package"] == "tflite-runtime")
    assert interpreter["needs"] == {"GLIBC": "2.27", "GLIBCXX": "3.4.22", "CXXABI": "1.3.11"}
    assert interpreter["elf_files"] == 2 and interpreter["tag"] == "manylinux_2_27"
    assert f"all {len(results)} pins have a wheel that loads on the board" in done.stdout


def test_check_wheels_reads_the_pins_of_environment_yml() -> None:
    _, pins = _env_yml()
    assert dict(check_wheels.read_pins(SETUP / "environment.yml")) == pins
    assert check_wheels.JETPACK_46 == {"GLIBC": "2.27", "GLIBCXX": "3.4.25", "CXXABI": "1.3.11"}
    readme = (SETUP / "README.md").read_text()
    assert "check_wheels.py" in readme and "GLIBC_2.34" in readme
