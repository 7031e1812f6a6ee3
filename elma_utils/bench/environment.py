"""What this machine is and what is set up on it (notebook 00), without importing the heavy stack.

Benchmarks are only comparable when you know where they ran: a Jetson with tegrastats and
the LiteRT interpreter, or a shared x86 server with CPU time only. ``environment_report()``
collects that in one JSON-able dict: the machine, key package versions (read from package
metadata, nothing imported), which LiteRT interpreter the edge runtime would pick, whether
this is a Jetson (``/etc/nv_tegra_release``, tegrastats), the set-up (virtual environment,
the tools and Debian packages ELMA needs, the ``jetson_setup`` scripts in ``--dry-run``),
the energy sources and the edge bundles present. Every probe that cannot run says why
instead of failing, so the notebook runs on any machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from elma_utils.bench.energy import describe_energy_sources
from elma_utils.bench.tegrastats import find_tegrastats
from elma_utils.config import PROJECT_ROOT, artifacts_dir

KEY_PACKAGES = (
    "numpy", "ai-edge-litert", "tflite-runtime", "tensorflow", "keras", "keras-hub", "jax", "torch",
    "faster-whisper", "ctranslate2", "pocketsphinx", "SpeechRecognition", "librosa", "soundfile",
    "paramiko", "cryptography", "matplotlib", "papermill", "nbformat", "elma",
)  # fmt: skip
# the edge runtime's order (elma_utils.edge.runtime.interpreter_class)
INTERPRETERS = (
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow", "tensorflow"),
)
COMMANDS = ("sshd", "ssh", "espeak-ng", "sox", "shellcheck", "git", "tegrastats", "nvpmodel", "jetson_clocks")
APT_PACKAGES = ("openssh-server", "openssh-client", "espeak-ng", "sox", "shellcheck")
# --version style flags; `ssh -V` and `sshd -V` print to stderr
_VERSION_ARGS = {"ssh": ["-V"], "sshd": ["-V"], "espeak-ng": ["--version"], "sox": ["--version"],
                 "shellcheck": ["--version"], "git": ["--version"]}  # fmt: skip
SETUP_SCRIPTS = {  # script -> the arguments its dry run needs
    "00_system_packages.sh": [],
    "01_external_ssd.sh": ["--device", "/dev/sda1"],
    "02_python_env.sh": [],
    "03_performance_mode.sh": [],
    "90_tensorflow_from_source.sh": ["--source-build"],
}
_L4T = re.compile(r"^# (R\d+) \(release\), REVISION: ([\d.]+),")


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """Platform, CPU model, cores, memory, Python: what ``machine_description`` says, minus Keras."""
    cpu = platform.processor() or platform.machine()
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
    }


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (None: not installed); nothing is imported."""
    return {name: installed_version(name) for name in names}


def litert_interpreters() -> dict[str, Any]:
    """Which LiteRT interpreters are installed, and the one the edge runtime would use."""
    found: dict[str, str | None] = {}
    for label, module, package in INTERPRETERS:
        try:
            present = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is not there
            present = False
        found[label] = (installed_version(package) or "installed") if present else None
    uses = next((label for label, *_ in INTERPRETERS if found[label]), None)
    return {"installed": found, "edge_runtime_uses": uses}


def jetson_status(release_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Is this an aarch64 Jetson (the test ``jetson_setup/lib.sh`` uses), which L4T, which tools."""
    path = Path(release_file or os.environ.get("ELMA_JETSON_RELEASE_FILE") or "/etc/nv_tegra_release")
    text = model = None
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip()
    match = _L4T.match(text or "")
    with contextlib.suppress(OSError):
        model = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    arch = os.environ.get("ELMA_UNAME_M") or platform.machine()
    return {
        "release_file": str(path),
        "release": text.splitlines()[0] if text else None,
        "l4t": f"{match.group(1)}.{match.group(2)}" if match else None,
        "arch": arch,
        "is_jetson": bool(text) and arch == "aarch64",
        "device_tree_model": model,
        "tegrastats": find_tegrastats(),
        "nvpmodel": which("nvpmodel"),
    }


def which(name: str) -> str | None:
    """A command on PATH or in the sbin directories (sshd lives in /usr/sbin)."""
    extra = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name) or shutil.which(name, path=extra)


def command_status(names: tuple[str, ...] = COMMANDS, timeout_s: float = 10.0) -> dict[str, dict]:
    """Path and first version line of each command (None when absent)."""
    out: dict[str, dict] = {}
    for name in names:
        path = which(name)
        version = None
        if path and name in _VERSION_ARGS:
            try:
                done = subprocess.run(
                    [path, *_VERSION_ARGS[name]],
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    check=False,
                )
                lines = (done.stdout + done.stderr).strip().splitlines()
                version = next((ln.strip() for ln in lines if re.search(r"\d", ln)), None)
            except (OSError, subprocess.TimeoutExpired) as err:
                version = f"({type(err).__name__})"
        out[name] = {"path": path, "version": version}
    return out


def apt_packages(names: tuple[str, ...] = APT_PACKAGES) -> dict[str, Any]:
    """Installed Debian package versions (dpkg-query); ``available`` False where there is no dpkg."""
    dpkg = which("dpkg-query")
    if dpkg is None:
        return {"available": False, "packages": {n: None for n in names}}
    packages: dict[str, str | None] = {}
    for name in names:
        done = subprocess.run(
            [dpkg, "-W", "-f=${db:Status-Abbrev} ${Version}", name],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        status, _, version = done.stdout.strip().partition(" ")
        packages[name] = version.strip() if done.returncode == 0 and status.startswith("ii") else None
    return {"available": True, "packages": packages}


def venv_status() -> dict[str, Any]:
    """This interpreter, whether it is a virtual environment, and the project's .venv."""
    project_venv = PROJECT_ROOT / ".venv"
    return {
        "executable": sys.executable,
        "prefix": sys.prefix,
        "in_virtualenv": sys.prefix != sys.base_prefix,
        "project_venv": str(project_venv) if project_venv.is_dir() else None,
        "uses_project_venv": Path(sys.prefix).resolve() == project_venv.resolve(),
        "elma_installed": installed_version("elma"),
    }


def _dry_run(script: Path, args: list[str], log_dir: str, timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, "ELMA_LOG_DIR": log_dir}
    try:
        done = subprocess.run(
            ["bash", str(script), *args, "--dry-run"],
            capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"rc": None, "error": f"{type(err).__name__}: {err}", "commands": [], "warnings": []}
    lines = (done.stdout + done.stderr).splitlines()
    return {
        "rc": done.returncode,
        "commands": [ln[len("[dry-run] ") :] for ln in lines if ln.startswith("[dry-run] ")],
        "warnings": [ln.split("WARNING: ", 1)[1] for ln in lines if "WARNING: " in ln],
        "last_line": lines[-1] if lines else "",
    }


def jetson_setup_dry_runs(
    setup_dir: str | os.PathLike | None = None, timeout_s: float = 60.0
) -> dict[str, dict[str, Any]]:
    """Every changing ``jetson_setup`` script with ``--dry-run``: the commands it would run here.

    A dry run changes nothing (the scripts guarantee it and ``tests/test_jetson_setup.py``
    checks it); logs go to a temporary directory. ``01_external_ssd.sh`` is shown for
    ``/dev/sda1``, the usual name of a USB SSD on a TX2.
    """
    base = Path(setup_dir) if setup_dir is not None else PROJECT_ROOT / "jetson_setup"
    if which("bash") is None:
        return {name: {"rc": None, "error": "bash not found", "commands": [], "warnings": []}
                for name in SETUP_SCRIPTS}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="elma-dry-run-") as logs:
        return {
            name: _dry_run(base / name, args, logs, timeout_s)
            if (base / name).is_file()
            else {"rc": None, "error": f"{base / name} not found", "commands": [], "warnings": []}
            for name, args in SETUP_SCRIPTS.items()
        }


def whisper_model() -> dict[str, Any]:
    """The Whisper model the speech module would load, and whether it is on disk (offline use)."""
    try:
        from elma_utils.speech.recognizers import default_whisper_model

        name = default_whisper_model()
    except ImportError as err:
        return {"model": None, "on_disk": False, "error": str(err)}
    return {"model": name, "on_disk": Path(name).is_dir()}


def edge_bundles(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Edge bundles under the artifacts directory (any ``manifest.json`` of format elma-edge-bundle)."""
    base = Path(root) if root is not None else artifacts_dir()
    found = []
    for manifest in sorted(base.glob("*/*/manifest.json")) if base.is_dir() else []:
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if m.get("format") != "elma-edge-bundle":
            continue
        found.append({
            "path": str(manifest.parent),
            "model_version": m.get("model_version"),
            "precision": m.get("precision"),
            "layers": m.get("num_layers"),
            "seq_len": m.get("seq_len"),
            "dynamic_length": bool(m.get("dynamic_length", False)),
        })  # fmt: skip
    return found


def environment_report(dry_runs: bool = True) -> dict[str, Any]:
    """Everything above in one JSON-able dict (``dry_runs=False`` skips the set-up scripts)."""
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "packages": package_versions(),
        "interpreters": litert_interpreters(),
        "jetson": jetson_status(),
        "venv": venv_status(),
        "commands": command_status(),
        "apt": apt_packages(),
        "whisper": whisper_model(),
        "energy_sources": describe_energy_sources(),
        "edge_bundles": edge_bundles(),
    }
    if dry_runs:
        report["jetson_setup_dry_run"] = jetson_setup_dry_runs()
    report["ready"] = readiness(report)
    return report


def readiness(report: dict[str, Any]) -> dict[str, bool]:
    """Yes/no answers to "can this machine do X", from a report."""
    cmds = report["commands"]
    return {
        "edge_runtime": report["packages"].get("numpy") is not None
        and report["interpreters"]["edge_runtime_uses"] is not None,
        "keras_training": report["packages"].get("keras") is not None,
        "speech_whisper": report["packages"].get("faster-whisper") is not None
        and report["whisper"]["on_disk"],
        "spoken_test_data": cmds["espeak-ng"]["path"] is not None,
        "ssh_offload_tests": cmds["sshd"]["path"] is not None and cmds["ssh"]["path"] is not None,
        "shell_checks": cmds["shellcheck"]["path"] is not None,
        "energy_in_joules": report["energy_sources"]["auto_source"] != "cpu_time",
        "jetson": report["jetson"]["is_jetson"],
    }


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def format_environment(report: dict[str, Any]) -> str:
    """A short markdown summary of a report (the JSON has everything)."""
    m, j, e = report["machine"], report["jetson"], report["energy_sources"]
    lines = [
        f"**Machine**: {m['cpu']} · {m['cores']} cores · {m['memory_gib']} GiB · {m['platform']} · "
        f"Python {m['python']}",
        f"**Jetson**: {_yes(j['is_jetson'])}"
        + (f" (L4T {j['l4t']}, {j['device_tree_model'] or 'model unknown'})" if j["is_jetson"] else "")
        + f" · tegrastats: {j['tegrastats'] or 'not found'}",
        f"**Edge interpreter**: {report['interpreters']['edge_runtime_uses'] or 'none installed'} · "
        f"**energy source**: {e['auto_source']} ({e['rapl_note']})",
        f"**venv**: {report['venv']['prefix']} (virtualenv: {_yes(report['venv']['in_virtualenv'])}, "
        f"elma {report['venv']['elma_installed'] or 'not installed'})",
        "",
        "| ready for | |",
        "|---|---|",
        *[f"| {k} | {_yes(v)} |" for k, v in report["ready"].items()],
        "",
        "| tool | path | version |",
        "|---|---|---|",
        *[f"| {k} | {v['path'] or '—'} | {v['version'] or ''} |" for k, v in report["commands"].items()],
        "",
        "| package | version |",
        "|---|---|",
        *[f"| {k} | {v or '—'} |" for k, v in report["packages"].items()],
    ]
    dry = report.get("jetson_setup_dry_run")
    if dry:
        lines += ["", "| jetson_setup script (--dry-run) | exit | commands | warnings |", "|---|---|---|---|"]
        lines += [
            f"| {name} | {r['rc']} | {len(r['commands'])} | {'; '.join(r['warnings']) or r.get('error', '')} |"
            for name, r in dry.items()
        ]
    return "\n".join(lines)
