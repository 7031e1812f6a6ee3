"""The papermill pipeline, on tiny throwaway notebooks executed for real (a kernel per run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from elma_utils import pipeline
from elma_utils.pipeline import PipelineError, run_pipeline, select_notebooks

PARAMETERS_CELL = 'import os\nprofile = os.environ.get("ELMA_PROFILE", "cpu")\nscale = 1'


def _write_notebook(path: Path, *code_cells: str, parameters: str = PARAMETERS_CELL) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), params]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in code_cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def _metrics_cell(name: str, body: str) -> str:
    return f"from elma_utils.reporting import save_metrics\nsave_metrics({name!r}, {body})"


@pytest.fixture()
def project(tmp_path: Path) -> tuple[Path, Path]:
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    # Written out of order on purpose: the pipeline orders by number.
    _write_notebook(
        nbs / "02_beta.ipynb",
        "value = 2.5 * scale",
        _metrics_cell("02_beta", '{"profile": profile, "score": value, "nested": {"steps": 10 * scale}}'),
    )
    _write_notebook(
        nbs / "01_alpha.ipynb",
        'print("alpha says", profile)',
        _metrics_cell("01_alpha", '{"profile_length": len(profile), "ratio": 1 / 3}'),
    )
    (nbs / "README.md").write_text("not a notebook\n")
    (nbs / "scratch.ipynb").write_text("{}")  # no number: never run
    return nbs, tmp_path / "reports"


def _statuses(results: list[dict]) -> list[tuple[str, str]]:
    return [(r["name"], r["status"]) for r in results]


def test_select_by_number_stem_or_short_name(project: tuple[Path, Path]) -> None:
    nbs, _ = project
    found = pipeline.find_notebooks(nbs)
    assert [p.name for p in found] == ["01_alpha.ipynb", "02_beta.ipynb"]
    assert [p.stem for p in select_notebooks(found, ["02"])] == ["02_beta"]
    assert [p.stem for p in select_notebooks(found, ["beta", "01_alpha"])] == ["01_alpha", "02_beta"]
    assert [p.stem for p in select_notebooks(found, ["2", "02_beta.ipynb"])] == ["02_beta"]
    assert select_notebooks(found, None) == found
    with pytest.raises(ValueError, match="no notebook matches 'gamma'.*01_alpha, 02_beta"):
        select_notebooks(found, ["gamma"])


def test_missing_kernel_is_a_clear_error() -> None:
    with pytest.raises(
        PipelineError, match="no Jupyter kernel named 'no-such-kernel-xyz'.*ipykernel install"
    ):
        pipeline.check_kernel("no-such-kernel-xyz")
    assert (pipeline.check_kernel() / "kernel.json").is_file()


def test_unknown_profile_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        run_pipeline(profile="huge", notebooks_dir=tmp_path, reports_dir=tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no NN_"):
        run_pipeline(profile="smoke", notebooks_dir=tmp_path, reports_dir=tmp_path / "r")


@pytest.mark.slow
def test_pipeline_runs_skips_reruns_and_fails_clearly(
    project: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    nbs, reports = project
    kw = {"profile": "smoke", "notebooks_dir": nbs, "reports_dir": reports, "extra_parameters": {"scale": 4}}

    # 1. both run, in order, with the profile and the extra parameter injected
    first = run_pipeline(**kw)
    assert _statuses(first) == [("01_alpha", "ran"), ("02_beta", "ran")]
    printed = capsys.readouterr().out
    assert "alpha says smoke" in printed  # cell output is streamed while it runs
    assert printed.index("[1/2] 01_alpha: running") < printed.index("[2/2] 02_beta: running")
    beta = json.loads((reports / "metrics" / "02_beta.json").read_text())
    produced_by = beta.pop("produced_by")
    assert beta == {"nested": {"steps": 40}, "profile": "smoke", "score": 10.0}
    # the metrics file says what made it: the commit and the command that reruns it
    assert produced_by["command"] == "elma pipeline --profile smoke --only 02_beta (notebooks/02_beta.ipynb)"
    assert len(produced_by["commit"]) == 40 and isinstance(produced_by["dirty"], bool)
    alpha = json.loads((reports / "metrics" / "01_alpha.json").read_text())
    assert alpha["profile_length"] == len("smoke")
    for r in first:
        out = Path(r["output"])
        assert out.is_file() and out.parent.parent == reports / "runs"
        assert out.parent.name.endswith("-smoke")
        executed = nbformat.read(str(out), as_version=4)
        tags = [c.metadata.get("tags", []) for c in executed.cells]
        assert ["injected-parameters"] in tags  # papermill put the parameters after the tagged cell
    state = json.loads((reports / "runs" / "state-smoke.json").read_text())
    assert set(state["notebooks"]) == {"01_alpha", "02_beta"}
    assert state["notebooks"]["02_beta"]["key"]["notebook"] == pipeline.notebook_digest(nbs / "02_beta.ipynb")

    report = (reports / "REPORT.md").read_text()
    assert "profile: `smoke`" in report
    assert report.index("## 01_alpha") < report.index("## 02_beta")
    assert "| score | 10 |" in report and "| nested.steps | 40 |" in report
    assert "| ratio | 0.3333 |" in report

    # 2. nothing changed (same notebooks, package, profile, parameters, data): both skipped
    second = run_pipeline(**kw)
    assert _statuses(second) == [("01_alpha", "skipped"), ("02_beta", "skipped")]
    assert second[1]["output"] == first[1]["output"]

    # 3. force reruns what is selected, only that
    forced = run_pipeline(**kw, only=["01"], force=True)
    assert _statuses(forced) == [("01_alpha", "ran")]
    assert forced[0]["output"] != first[0]["output"]

    # 4. editing a notebook reruns it, only it
    _write_notebook(
        nbs / "02_beta.ipynb",
        "value = 2.5 * scale + 1",
        _metrics_cell("02_beta", '{"profile": profile, "score": value}'),
    )
    edited = run_pipeline(**kw)
    assert _statuses(edited) == [("01_alpha", "skipped"), ("02_beta", "ran")]
    assert json.loads((reports / "metrics" / "02_beta.json").read_text())["score"] == 11.0

    # 5. a failing notebook stops the run, names itself, the cell and the executed copy
    _write_notebook(nbs / "03_gamma.ipynb", "x = 1", "raise RuntimeError(f'gamma broke on {profile}')")
    _write_notebook(nbs / "04_never.ipynb", _metrics_cell("04_never", "{'ran': True}"))
    with pytest.raises(PipelineError) as info:
        run_pipeline(**kw)
    message = str(info.value)
    assert "notebook 03_gamma failed in cell 4 (In [" in message  # markdown, parameters, x = 1, raise
    assert "RuntimeError: gamma broke on smoke" in message
    assert info.value.notebook == "03_gamma"
    assert info.value.output is not None and str(info.value.output) in message
    assert "gamma broke on smoke" in info.value.output.read_text()
    assert not (reports / "metrics" / "04_never.json").exists()
    state = json.loads((reports / "runs" / "state-smoke.json").read_text())
    assert "03_gamma" not in state["notebooks"]
    assert "## 02_beta" in (reports / "REPORT.md").read_text()  # the report is still written


def test_reports_go_to_the_profiles_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from elma_utils import config

    monkeypatch.delenv("ELMA_REPORTS_DIR", raising=False)
    assert pipeline.reports_root("cpu") == config.PROJECT_ROOT / "reports"
    assert pipeline.reports_root("smoke") == config.PROJECT_ROOT / "reports" / "profiles" / "smoke"
    assert pipeline.state_path("smoke", tmp_path) == tmp_path / "runs" / "state-smoke.json"
    monkeypatch.setenv("ELMA_REPORTS_DIR", str(tmp_path))
    assert pipeline.reports_root("smoke") == tmp_path


# ---------------------------------------------------------------- the "already done" key


@pytest.fixture()
def fake_runs(project: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """run_pipeline without kernels: _execute only records which notebook would have run, and the
    SQuAD files are small stand-ins in a data directory of their own."""
    ran: list[str] = []

    def execute(nb_path, output, parameters, root, profile, stream_output):
        ran.append(nb_path.stem)
        output.write_text("{}")
        return 0.0

    monkeypatch.setattr(pipeline, "_execute", execute)
    monkeypatch.setattr(pipeline, "check_kernel", lambda name=pipeline.KERNEL_NAME: Path("."))
    data = tmp_path / "squad"
    data.mkdir()
    for name in ("train-v1.1.json", "dev-v1.1.json", "dev-v2.0.json"):
        (data / name).write_text('{"version": "x", "data": []}')
    monkeypatch.setenv("ELMA_DATA_DIR", str(data))
    return ran


def test_a_finished_notebook_reruns_when_anything_it_depends_on_changes(
    project: tuple[Path, Path], fake_runs: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import dataclasses

    from elma_utils import config

    nbs, reports = project
    kw = {"profile": "smoke", "notebooks_dir": nbs, "reports_dir": reports}

    def run(**extra) -> list[str]:
        fake_runs.clear()
        run_pipeline(**kw, **extra)
        return list(fake_runs)

    assert run() == ["01_alpha", "02_beta"]
    assert run() == []  # unchanged: skipped
    state = json.loads((reports / "runs" / "state-smoke.json").read_text())["notebooks"]
    assert set(state["01_alpha"]["key"]) == set(pipeline.KEY_PARTS)

    # the notebook: a new cell reruns it; outputs and metadata alone (a JupyterLab save) do not
    nb = nbformat.read(str(nbs / "02_beta.ipynb"), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="2.5\n")]
    nb.cells[2].execution_count = 7
    nb.metadata["widgets"] = {"state": {}}
    nbformat.write(nb, str(nbs / "02_beta.ipynb"))
    assert run() == []
    nb.cells.append(nbformat.v4.new_markdown_cell("a student's note"))
    nbformat.write(nb, str(nbs / "02_beta.ipynb"))
    assert run() == ["02_beta"]

    # the package source
    monkeypatch.setattr(pipeline, "notebook_package_digest", lambda nb: "elma_utils changed")
    assert run() == ["01_alpha", "02_beta"]
    assert run() == []

    # the profile (same name, another knob)
    monkeypatch.setitem(config.PROFILES, "smoke", dataclasses.replace(config.PROFILES["smoke"], batch_size=8))
    assert run() == ["01_alpha", "02_beta"]
    assert run() == []

    # the injected parameters
    assert run(extra_parameters={"scale": 2}) == ["01_alpha", "02_beta"]
    assert run(extra_parameters={"scale": 2}) == []

    # the data: a SQuAD file's content
    dev = Path(os.environ["ELMA_DATA_DIR"]) / "dev-v1.1.json"
    dev.write_text('{"version": "1.1", "data": [] }')
    assert run(extra_parameters={"scale": 2}) == ["01_alpha", "02_beta"]
    # ... or a file the profile reads appearing or going away
    dev.unlink()
    assert run(extra_parameters={"scale": 2}) == ["01_alpha", "02_beta"]
    # force still reruns an unchanged notebook
    assert run(extra_parameters={"scale": 2}, force=True, only=["01"]) == ["01_alpha"]


def test_an_old_state_record_without_a_key_reruns(project: tuple[Path, Path], fake_runs: list[str]) -> None:
    nbs, reports = project
    old = {"version": 1, "profile": "smoke", "notebooks": {"01_alpha": {"sha256": "x", "finished_at": "t"}}}
    (reports / "runs").mkdir(parents=True)
    (reports / "runs" / "state-smoke.json").write_text(json.dumps(old))
    run_pipeline(profile="smoke", notebooks_dir=nbs, reports_dir=reports, only=["01"])
    assert fake_runs == ["01_alpha"]


def test_data_files_are_hashed_once_per_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from elma_utils import config

    data = tmp_path / "squad"
    data.mkdir()
    (data / "dev-v1.1.json").write_text("a" * 1000)
    cache = tmp_path / "cache.json"
    reads: list[str] = []
    real = pipeline.file_sha256
    monkeypatch.setattr(pipeline, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    smoke = config.PROFILES["smoke"]

    first = pipeline.data_digest(smoke, data, cache)
    assert reads == ["dev-v1.1.json"]  # the other two files are missing: counted, not read
    assert pipeline.data_digest(smoke, data, cache) == first and reads == ["dev-v1.1.json"]
    os.utime(data / "dev-v1.1.json", ns=(1, 1))  # same bytes, new mtime: read again, same digest
    assert pipeline.data_digest(smoke, data, cache) == first and len(reads) == 2
    (data / "dev-v2.0.json").write_text("{}")
    assert pipeline.data_digest(smoke, data, cache) != first
    cache.write_text("not json")  # a broken cache only costs reading again
    assert pipeline.data_digest(smoke, data, cache)


def test_package_digest_covers_every_python_file(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = pipeline.package_digest(pkg)
    (pkg / "notes.txt").write_text("not code")
    assert pipeline.package_digest(pkg) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert pipeline.package_digest(pkg) != first
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "sub" / "b.py").rename(pkg / "c.py")  # same bytes, other place: another package
    assert pipeline.package_digest(pkg) != first
    assert pipeline.package_digest() == pipeline.package_digest()  # the real one is stable


@pytest.mark.slow
def test_a_notebook_edited_in_jupyterlab_survives_the_pipeline_and_the_pairing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A student adds cells to a real notebook and saves it (with outputs, as JupyterLab does);
    running it through the pipeline and `jupytext --sync` (the only tools in the repository that
    touch notebooks/) keeps the note in the notebook and carries it to the .py twin."""
    import shutil
    import subprocess
    import sys

    from elma_utils import config

    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    shutil.copy(config.PROJECT_ROOT / "pyproject.toml", project / "pyproject.toml")
    name = "00_environment"
    for suffix in (".ipynb", ".py"):
        shutil.copy(config.PROJECT_ROOT / "notebooks" / f"{name}{suffix}", project / "notebooks")
    src = project / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(str(src), as_version=4)
    note = nbformat.v4.new_markdown_cell("My note: the TX2 in room 4 has no fan.")
    code = nbformat.v4.new_code_cell("student_value = 6 * 7\nstudent_value")
    code.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "42"}, execution_count=1)]
    nb.cells[2:2] = [note, code]
    nbformat.write(nb, str(src))
    saved = src.read_bytes()

    reports = tmp_path / "reports"
    monkeypatch.setenv("ELMA_REPORTS_DIR", str(reports))
    results = run_pipeline(profile="smoke", notebooks_dir=project / "notebooks", reports_dir=reports)
    assert src.read_bytes() == saved  # the pipeline only reads the notebook
    executed = nbformat.read(results[0]["output"], as_version=4)
    assert Path(results[0]["output"]).is_relative_to(reports / "runs")
    ran = next(c for c in executed.cells if "student_value" in c.source)
    assert ran.outputs[0]["data"]["text/plain"] == "42"
    assert (reports / "metrics" / f"{name}.json").is_file()

    jupytext = Path(sys.executable).with_name("jupytext")
    subprocess.run([str(jupytext), "--sync", str(src)], check=True, capture_output=True, cwd=project)
    assert "My note: the TX2 in room 4 has no fan." in src.read_text()
    twin = (project / "notebooks" / f"{name}.py").read_text()
    assert "# My note: the TX2 in room 4 has no fan." in twin and "student_value = 6 * 7" in twin
