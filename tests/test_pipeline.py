"""The papermill pipeline, on tiny throwaway notebooks executed for real (a kernel per run)."""

from __future__ import annotations

import json
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
    kw = {"profile": "smoke", "notebooks_dir": nbs, "reports_dir": reports}

    # 1. both run, in order, with the profile and the extra parameter injected
    first = run_pipeline(**kw, extra_parameters={"scale": 4})
    assert _statuses(first) == [("01_alpha", "ran"), ("02_beta", "ran")]
    printed = capsys.readouterr().out
    assert "alpha says smoke" in printed  # cell output is streamed while it runs
    assert printed.index("[1/2] 01_alpha: running") < printed.index("[2/2] 02_beta: running")
    beta = json.loads((reports / "metrics" / "02_beta.json").read_text())
    assert beta == {"nested": {"steps": 40}, "profile": "smoke", "score": 10.0}
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
    assert state["notebooks"]["02_beta"]["sha256"] == pipeline.file_sha256(nbs / "02_beta.ipynb")

    report = (reports / "REPORT.md").read_text()
    assert "profile: `smoke`" in report
    assert report.index("## 01_alpha") < report.index("## 02_beta")
    assert "| score | 10 |" in report and "| nested.steps | 40 |" in report
    assert "| ratio | 0.3333 |" in report

    # 2. nothing changed: both skipped, nothing executed
    second = run_pipeline(**kw)
    assert _statuses(second) == [("01_alpha", "skipped"), ("02_beta", "skipped")]
    assert second[1]["output"] == first[1]["output"]

    # 3. force reruns what is selected, only that
    forced = run_pipeline(**kw, only=["01"], force=True)
    assert _statuses(forced) == [("01_alpha", "ran")]
    assert forced[0]["output"] != first[0]["output"]

    # 4. editing a notebook reruns it (the default parameters now apply: scale = 1)
    _write_notebook(
        nbs / "02_beta.ipynb",
        "value = 2.5 * scale + 1",
        _metrics_cell("02_beta", '{"profile": profile, "score": value}'),
    )
    edited = run_pipeline(**kw)
    assert _statuses(edited) == [("01_alpha", "skipped"), ("02_beta", "ran")]
    assert json.loads((reports / "metrics" / "02_beta.json").read_text())["score"] == 3.5

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
