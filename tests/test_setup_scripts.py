"""The set-up, pipeline and test scripts: syntax, shellcheck, what they call, idempotence."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from elma_utils.config import PROJECT_ROOT

SCRIPTS = [
    "scripts/setup.sh",
    "scripts/run_pipeline.sh",
    "scripts/test.sh",
    "scripts/allocator.sh",
    ".ci/run",
]
VENV = PROJECT_ROOT / ".venv"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, **kw)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_bash_with_valid_syntax(script: str) -> None:
    path = PROJECT_ROOT / script
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK), f"{script} is not executable"
    result = _run(["bash", "-n", str(path)])
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install shellcheck; scripts/setup.sh does)",
)
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_passes_shellcheck(script: str) -> None:
    result = _run(["shellcheck", "--shell=bash", str(PROJECT_ROOT / script)])
    assert result.returncode == 0, result.stdout + result.stderr


def _fake_repo(tmp_path: Path, scripts: dict[str, str]) -> Path:
    """A repository copy holding the real script(s) under test and stubs for the rest."""
    repo = tmp_path / "repo"
    for rel, body in scripts.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if body == "real":
            shutil.copy2(PROJECT_ROOT / rel, target)
        else:
            target.write_text(body)
            target.chmod(0o755)
    return repo


def test_ci_run_execs_test_sh_from_the_repository_root(tmp_path: Path) -> None:
    text = (PROJECT_ROOT / ".ci/run").read_text()
    assert "set -euo pipefail" in text
    assert re.search(r"^exec bash (\./)?scripts/test\.sh\b", text, re.M)
    repo = _fake_repo(
        tmp_path,
        {".ci/run": "real", "scripts/test.sh": 'echo "test.sh ran in $PWD"\nexit 3\n'},
    )
    result = _run(["bash", str(repo / ".ci/run")], cwd=tmp_path)  # called from elsewhere
    assert result.stdout.strip() == f"test.sh ran in {repo}"
    assert result.returncode == 3  # its exit status is passed on


def _fake_venv(tmp_path: Path, tools: dict[str, str]) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, body in tools.items():
        tool = venv / "bin" / name
        tool.write_text("#!/bin/sh\n" + body + "\n")
        tool.chmod(0o755)
    return venv


def test_run_pipeline_sets_up_then_runs_the_profile(tmp_path: Path) -> None:
    repo = _fake_repo(
        tmp_path,
        {
            "scripts/run_pipeline.sh": "real",
            "scripts/allocator.sh": "real",
            "scripts/setup.sh": "echo setup-ran\n",
        },
    )
    venv = _fake_venv(tmp_path, {"elma": 'echo "elma $*"'})
    env = {**os.environ, "ELMA_VENV": str(venv)}
    script = str(repo / "scripts/run_pipeline.sh")
    for args, expected in [
        ([], "elma pipeline --profile cpu"),
        (["smoke"], "elma pipeline --profile smoke"),
        (["full", "--only", "02,03"], "elma pipeline --profile full --only 02,03"),
        (["--force"], "elma pipeline --profile cpu --force"),
    ]:
        result = _run(["bash", script, *args], env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["setup-ran", expected]
    failing = _fake_repo(
        tmp_path / "f",
        {"scripts/run_pipeline.sh": "real", "scripts/allocator.sh": "real", "scripts/setup.sh": "exit 7\n"},
    )
    result = _run(["bash", str(failing / "scripts/run_pipeline.sh")], env=env)
    assert result.returncode == 7 and "elma" not in result.stdout


def test_the_pipeline_preloads_tcmalloc_when_installed_and_not_when_told(tmp_path: Path) -> None:
    repo = _fake_repo(
        tmp_path,
        {"scripts/run_pipeline.sh": "real", "scripts/allocator.sh": "real", "scripts/setup.sh": "true\n"},
    )
    venv = _fake_venv(tmp_path, {"elma": 'echo "preload=$LD_PRELOAD"'})
    fake_lib = tmp_path / "lib" / "libtcmalloc_minimal.so.4"
    fake_lib.parent.mkdir()
    fake_lib.write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ldconfig = bin_dir / "ldconfig"  # what `ldconfig -p` lists on a machine with libtcmalloc-minimal4
    ldconfig.write_text(f"#!/bin/sh\necho '\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {fake_lib}'\n")
    ldconfig.chmod(0o755)
    script = str(repo / "scripts/run_pipeline.sh")
    env = {**os.environ, "ELMA_VENV": str(venv), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("LD_PRELOAD", None)
    env.pop("ELMA_MALLOC", None)

    result = _run(["bash", script], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"preload={fake_lib}"
    assert "tcmalloc preloaded" in result.stderr
    result = _run(["bash", script], env={**env, "LD_PRELOAD": str(fake_lib)})  # not twice
    assert result.stdout.strip() == f"preload={fake_lib}"
    result = _run(["bash", script], env={**env, "ELMA_MALLOC": "system"})
    assert result.stdout.strip() == "preload=" and "ELMA_MALLOC=system" in result.stderr
    ldconfig.write_text("#!/bin/sh\necho '1 libs found in cache'\n")  # not installed
    result = _run(["bash", script], env=env)
    assert result.returncode == 0 and result.stdout.strip() == "preload="
    assert "apt-get install libtcmalloc-minimal4" in result.stderr


TEST_FILE = """
import pytest

def test_one():
    assert True

def test_two():
    assert 1 + 1 == 2

@pytest.mark.skip(reason="shown as skipped")
def test_three():
    pass
"""


def _notebook_checking_profile(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('import os\nprofile = os.environ.get("ELMA_PROFILE", "cpu")')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell('assert profile in ("smoke", "smoke-albert"), profile')]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_test_sh_counts_everything_and_fails_on_no_tests(tmp_path: Path) -> None:
    repo = _fake_repo(
        tmp_path,
        {"scripts/test.sh": "real", "scripts/allocator.sh": "real", "scripts/setup.sh": "echo setup-ran\n"},
    )
    (repo / "tests").mkdir()
    (repo / "tests" / "test_sample.py").write_text(TEST_FILE)
    # the record checks run last (after the notebooks wrote what they check), not in the first run
    (repo / "tests" / "test_notebook_records.py").write_text("def test_records():\n    pass\n")
    (repo / "notebooks").mkdir()
    venv = _fake_venv(tmp_path, {"ruff": 'echo "ruff $*"', "python": f'exec "{sys.executable}" "$@"'})
    env = {**os.environ, "ELMA_VENV": str(venv)}
    env.pop("ELMA_PROFILE", None)
    script = str(repo / "scripts/test.sh")

    # notebooks/ is empty: pytest exits 5, which is a failure
    result = _run(["bash", script], env=env, cwd=tmp_path)
    lines = result.stdout.strip().splitlines()
    assert result.returncode != 0
    assert lines[0] == "setup-ran"
    assert "ruff check ." in lines and "ruff format --check ." in lines
    assert lines[-1] == "total: 5 passed, 2 failed, 1 skipped", result.stdout[-2000:]
    assert lines[-2] == "  notebook records (cpu, smoke, smoke-albert): 1 passed, 0 skipped"
    assert any("notebooks (nbval, smoke): FAILED, no tests collected" in line for line in lines)
    assert any("notebooks (nbval, smoke-albert): FAILED, no tests collected" in line for line in lines)

    # a notebook that only passes in the smoke profiles: everything passes, in both
    _notebook_checking_profile(repo / "notebooks" / "01_check.ipynb")
    result = _run(["bash", script], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total: 9 passed, 0 failed, 1 skipped"
    assert "  notebooks (nbval, smoke-albert): 2 passed, 0 skipped" in lines

    # a failing linter and a failing test each count, and the exit status says so
    (repo / "tests" / "test_bad.py").write_text("def test_bad():\n    assert False\n")
    broken_ruff = _fake_venv(tmp_path / "b", {"ruff": "exit 1", "python": f'exec "{sys.executable}" "$@"'})
    result = _run(["bash", script], env={**env, "ELMA_VENV": str(broken_ruff)}, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stdout.strip().splitlines()[-1] == "total: 7 passed, 3 failed, 1 skipped"

    # set-up failure: nothing else runs
    (repo / "scripts" / "setup.sh").write_text("exit 1\n")
    result = _run(["bash", script], env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stdout.strip().splitlines()[-1] == "total: 0 passed, 1 failed"


@pytest.mark.slow
@pytest.mark.skipif(
    not (VENV / "bin" / "python").is_file() or Path(sys.prefix).resolve() != VENV.resolve(),
    reason="needs the project's .venv (made by scripts/setup.sh) to be the running environment",
)
def test_setup_second_run_is_a_no_op() -> None:
    # ELMA_SKIP_APT=1: never install Debian packages from a test (with all of them present
    # setup.sh does not call apt-get anyway).
    env = {**os.environ, "ELMA_SKIP_APT": "1"}
    setup = str(PROJECT_ROOT / "scripts/setup.sh")
    first = _run(["bash", setup], env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    stamps = [VENV / ".elma-requirements.sha256", VENV / ".elma-package.sha256"]
    before = [p.stat().st_mtime_ns for p in stamps]

    second = _run(["bash", setup], env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [p.stat().st_mtime_ns for p in stamps] == before
    out = second.stdout
    assert "requirements.txt unchanged since the last install" in out
    assert "elma: installed (editable)" in out
    assert "kernel: python3 at" in out
    assert "pip check: no broken requirements" in out
    for change in ("requirements.txt: installing", "pip install -e", "registering", "creating"):
        assert change not in out


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = re.match(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_environment_yml_pins_match_requirements() -> None:
    env_text = (PROJECT_ROOT / "environment.yml").read_text()
    required = _pins((PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    listed = _pins(env_text.splitlines())
    assert "- python=3.11" in env_text
    assert "- -r requirements.txt" in env_text
    assert {"tensorflow", "keras", "keras-hub", "paramiko", "papermill", "nbval"} <= set(listed)
    wrong = {name: (v, required.get(name)) for name, v in listed.items() if required.get(name) != v}
    assert not wrong, f"environment.yml pins differ from requirements.txt: {wrong}"


def test_readme_gives_exactly_the_two_set_up_commands() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    commands = set(re.findall(r"^bash scripts/\S+", readme, re.M))
    assert commands == {"bash scripts/run_pipeline.sh", "bash scripts/test.sh"}
    assert "<!-- results:begin (generated by elma_utils.report.headline; do not edit) -->" in readme


def test_scripts_do_what_the_readme_says() -> None:
    setup = (PROJECT_ROOT / "scripts/setup.sh").read_text()
    for pkg in [
        "openssh-server",
        "openssh-client",
        "espeak-ng",
        "sox",
        "shellcheck",
        "libsndfile1",
        "ffmpeg",
        "binutils",  # readelf: the Jetson wheel check
        "iproute2",  # ip netns: the two-machine test puts the device in its own namespace
        "qemu-user-static",  # the emulated TX2 (aarch64) of tests/test_device_emulation.py
        "debootstrap",  # its arm64 Debian root
        "libtcmalloc-minimal4",  # scripts/allocator.sh preloads it: TensorFlow trains faster
    ]:
        assert pkg in setup
    assert "ipykernel install --sys-prefix --name python3" in setup
    test_sh = (PROJECT_ROOT / "scripts/test.sh").read_text()
    assert "ELMA_PROFILE=smoke" in test_sh and "--nbval-lax" in test_sh
    assert (
        textwrap.dedent("""\
        bash scripts/setup.sh
        # shellcheck source=/dev/null
        source scripts/allocator.sh
        elma_preload_tcmalloc
        exec "${ELMA_VENV:-$ROOT/.venv}/bin/elma" pipeline --profile "$profile" "$@"
        """)
        in (PROJECT_ROOT / "scripts/run_pipeline.sh").read_text()
    )
