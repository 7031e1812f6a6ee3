"""The pipeline's key hashes the modules a notebook can run, and only those."""

from __future__ import annotations

from pathlib import Path

import nbformat

from elma_utils import package_deps, pipeline


def _package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import helper\n")
    (pkg / "sub" / "helper.py").write_text("def f():\n    from ..deep import g\n    return g\n")
    (pkg / "deep.py").write_text("g = 1\n")
    (pkg / "speech.py").write_text("import numpy\n")
    (pkg / "server.py").write_text("x = 2\n")
    (pkg / "bench.py").write_text("CMD = ['python', '-m', 'pkg.server']\n")
    return pkg


def _names(files: list[Path], pkg: Path) -> list[str]:
    return [f.relative_to(pkg).as_posix() for f in files]


def test_closure_follows_relative_function_level_and_program_imports(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    assert _names(package_deps.closure(["from pkg.sub import helper"], pkg), pkg) == [
        "__init__.py",
        "deep.py",  # imported inside a function, two levels up
        "sub/__init__.py",
        "sub/helper.py",
    ]
    # a module started as a program (`python -m pkg.server`) counts as reached
    assert "server.py" in _names(package_deps.closure(["import pkg.bench"], pkg), pkg)
    # magics do not break parsing; other packages are not followed
    assert _names(
        package_deps.closure(["%matplotlib inline\nimport numpy\nimport pkg.speech"], pkg), pkg
    ) == [
        "__init__.py",
        "speech.py",
    ]


def test_notebook_digest_changes_only_with_modules_it_reaches(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# import pkg.speech"),
        nbformat.v4.new_code_cell("from pkg import sub"),
    ]
    path = tmp_path / "01_a.ipynb"
    nbformat.write(nb, str(path))
    first = pipeline.notebook_package_digest(path, pkg)
    (pkg / "speech.py").write_text("import numpy  # changed\n")  # named only in markdown: not reached
    assert pipeline.notebook_package_digest(path, pkg) == first
    (pkg / "deep.py").write_text("g = 3\n")
    assert pipeline.notebook_package_digest(path, pkg) != first


def test_the_real_notebooks_reach_what_they_use() -> None:
    """The fine-tuning notebook does not depend on the speech front end; the speech one does."""
    root = Path(pipeline.__file__).resolve().parent
    nbs = Path(pipeline.config.PROJECT_ROOT) / "notebooks"

    def reached(name: str) -> set[str]:
        nb = nbformat.read(str(nbs / name), as_version=4)
        files = package_deps.closure([c.source for c in nb.cells if c.cell_type == "code"], root)
        return {f.relative_to(root).as_posix() for f in files}

    finetune = reached("02_finetune_full_model.ipynb")
    assert {"model/finetune.py", "model/evaluation.py", "config.py", "__init__.py"} <= finetune
    assert not any(f.startswith("speech/") for f in finetune)
    speech = reached("06_speech_to_answer.ipynb")
    assert "speech/__init__.py" in speech and len(speech) > len(finetune)
