"""notebooks/ are the source: every .ipynb has a py:percent twin, and the two say the same thing.

JupyterLab (with jupytext) saves both files of a pair; a text editor changes only the .py. Either
way `jupytext --sync notebooks/*.ipynb` brings the pair together again, and this test fails until
someone has done so, so a commit never holds two versions of one notebook.
"""

from __future__ import annotations

import json
import tomllib

import jupytext
import pytest
from jupytext.config import load_jupytext_config

from elma_utils.config import PROJECT_ROOT

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (c.cell_type, c.source.strip(), tuple(c.get("metadata", {}).get("tags", ())))
        for c in nb.cells
        if c.cell_type in ("markdown", "code")
    ]


def test_the_pairing_is_configured_in_pyproject():
    conf = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["jupytext"]
    assert conf["formats"] == "ipynb,py:percent"
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_and_its_py_twin_agree(ipynb):
    twin = ipynb.with_suffix(".py")
    assert twin.is_file(), f"{twin.name} is missing: run `jupytext --sync {ipynb.relative_to(PROJECT_ROOT)}`"
    from_ipynb = _cells(jupytext.read(ipynb))
    from_py = _cells(jupytext.read(twin))
    assert from_ipynb == from_py, (
        f"{ipynb.name} and {twin.name} differ: run `jupytext --sync notebooks/*.ipynb`"
    )
    # the committed .py is exactly what jupytext writes for the notebook (no hand-formatted drift)
    config = load_jupytext_config(str(ipynb.parent))  # pyproject.toml's [tool.jupytext]
    assert jupytext.writes(jupytext.read(ipynb), fmt="py:percent", config=config) == twin.read_text()


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(ipynb):
    nb = json.loads(ipynb.read_text())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), (
        f"{ipynb.name} has outputs: executed copies belong in reports/runs/, clear them here"
    )
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])


def test_no_script_generates_the_notebooks():
    scripts = [p for p in (PROJECT_ROOT / "scripts").glob("*.py") if "new_notebook" in p.read_text()]
    assert not scripts, f"notebooks are edited, not generated: {scripts}"


def test_an_edit_in_one_file_of_a_pair_is_caught(tmp_path):
    """The check above can fail: a cell added to the .py only makes the pair differ."""
    src = NOTEBOOKS[0]
    py = tmp_path / src.with_suffix(".py").name
    py.write_text(src.with_suffix(".py").read_text() + "\n# %%\nprint('a student note')\n")
    assert _cells(jupytext.read(src)) != _cells(jupytext.read(py))
