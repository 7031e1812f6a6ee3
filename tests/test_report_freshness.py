"""report.freshness on a real git repository: a metrics file turns stale exactly when code its
command runs changes after the commit it names."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nbformat
import pytest

from elma_utils import config
from elma_utils.report import freshness


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def _commit(root: Path, message: str) -> str:
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return _git(root, "rev-parse", "HEAD").strip()


def _notebook(path: Path, code: str, note: str = "# Title") -> None:
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell(note), nbformat.v4.new_code_cell(code)]
    )
    nbformat.write(nb, str(path))


def _record(root: Path, name: str, commit: str | None, command: str, dirty: bool = False) -> Path:
    path = root / "reports" / "metrics" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"f1": 1.0, "produced_by": {"commit": commit, "dirty": dirty, "command": command}})
    )
    return path


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "bench").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "bench" / "__init__.py").write_text("")
    (pkg / "core.py").write_text("VALUE = 1\n")
    (pkg / "unrelated.py").write_text("OTHER = 1\n")
    (pkg / "cli.py").write_text("import pkg.unrelated\n")
    (pkg / "bench" / "speed.py").write_text("from pkg import core\n")
    (tmp_path / "notebooks").mkdir()
    _notebook(tmp_path / "notebooks" / "01_run.ipynb", "from pkg.bench import speed")
    _git(tmp_path, "init", "-q")
    return tmp_path


def _judge(repo: Path, path: Path) -> freshness.Freshness:
    return freshness.judge(path, repo, repo / "pkg")


def test_module_record_turns_stale_only_when_its_closure_changes(repo: Path) -> None:
    made = _commit(repo, "code")
    rec = _record(repo, "bench_speed.json", made, "python -m pkg.bench.speed --questions 20")
    assert _judge(repo, rec).current

    (repo / "pkg" / "unrelated.py").write_text("OTHER = 2\n")
    _commit(repo, "unrelated change")
    assert _judge(repo, rec).current, "a module the command never reaches must not make it stale"

    (repo / "pkg" / "core.py").write_text("VALUE = 2\n")
    _commit(repo, "core change")
    verdict = _judge(repo, rec)
    assert not verdict.current
    assert verdict.changed == ("pkg/core.py",)
    assert "pkg/core.py" in verdict.describe() and made[:7] in verdict.describe()


def test_notebook_record_counts_its_cells_not_its_outputs(repo: Path) -> None:
    made = _commit(repo, "code")
    command = "elma pipeline --profile cpu --only 01_run (notebooks/01_run.ipynb)"
    rec = _record(repo, "01_run.json", made, command)
    assert _judge(repo, rec).current

    nb_path = repo / "notebooks" / "01_run.ipynb"
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="ran\n")]
    nb.metadata["saved_by"] = "jupyterlab"
    nbformat.write(nb, str(nb_path))
    _commit(repo, "outputs only")
    assert _judge(repo, rec).current, "outputs and metadata are not what a person wrote"

    _notebook(nb_path, "from pkg.bench import speed", note="# A note a student added")
    _commit(repo, "a cell edited")
    assert _judge(repo, rec).changed == ("notebooks/01_run.ipynb",)

    (repo / "pkg" / "core.py").write_text("VALUE = 3\n")
    _commit(repo, "core change")
    assert _judge(repo, rec).changed == ("notebooks/01_run.ipynb", "pkg/core.py")


def test_elma_program_records_follow_the_cli_closure(repo: Path) -> None:
    made = _commit(repo, "code")
    rec = _record(repo, "bench_inference.json", made, ".venv/bin/elma bench --model artifacts/m")
    (repo / "pkg" / "core.py").write_text("VALUE = 4\n")
    _commit(repo, "core change")
    assert _judge(repo, rec).current
    (repo / "pkg" / "unrelated.py").write_text("OTHER = 4\n")
    _commit(repo, "cli dependency change")
    assert _judge(repo, rec).changed == ("pkg/unrelated.py",)


@pytest.mark.parametrize(
    ("commit", "command", "dirty", "why"),
    [
        (None, "python -m pkg.bench.speed", False, "names no commit"),
        ("HEAD", "python -m pkg.bench.speed", True, "work tree that differed"),
        ("0" * 40, "python -m pkg.bench.speed", False, "not in this clone's history"),
        ("HEAD", "python my_script.py", False, "names no notebook"),
    ],
)
def test_records_that_cannot_be_judged_say_why(repo: Path, commit, command, dirty, why) -> None:
    head = _commit(repo, "code")
    rec = _record(repo, "x.json", head if commit == "HEAD" else commit, command, dirty)
    verdict = _judge(repo, rec)
    assert not verdict.current
    assert verdict.unjudged and why in verdict.unjudged


def test_judge_all_reads_every_metrics_file(repo: Path) -> None:
    made = _commit(repo, "code")
    _record(repo, "b.json", made, "python -m pkg.bench.speed")
    _record(repo, "a.json", None, "python -m pkg.bench.speed")
    verdicts = freshness.judge_all(repo / "reports" / "metrics", repo, repo / "pkg")
    assert [(v.metrics, v.current) for v in verdicts] == [("a.json", False), ("b.json", True)]


def test_every_committed_metrics_file_names_code_the_tool_can_follow() -> None:
    """Each committed cpu metrics file names a notebook, a module of elma_utils or `elma`, so
    its freshness can be judged wherever the history is there (a shallow clone may lack it)."""
    root = config.PROJECT_ROOT
    files = sorted((root / "reports" / "metrics").glob("*.json"))
    assert len(files) >= 10
    for path in files:
        command = json.loads(path.read_text())["produced_by"]["command"]
        code = freshness.command_code(command, root, root / "elma_utils")
        assert code is not None, f"{path.name}: {command!r} names no code"
        assert code[1], f"{path.name}: no package module found for {command!r}"
