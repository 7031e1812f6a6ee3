"""Where a metrics file came from: the commit, whether the work tree differed, the command.

:func:`elma_utils.reporting.save_metrics` stores ``provenance()`` under ``produced_by`` in every
metrics file, so a number in REPORT.md or the README can be traced to the code that made it::

    "produced_by": {"commit": "5b30ad5…", "dirty": false,
                    "command": "elma pipeline --profile cpu --only 03_early_exit (notebooks/03_early_exit.ipynb)"}

``dirty`` is true when tracked or new (not ignored) files differ from the commit, outside
``reports/`` (which the run itself rewrites). The command is ``$ELMA_COMMAND`` when set (the
pipeline sets it for each notebook), the notebook when the code runs in a Jupyter kernel, else
this process's command line with paths inside the project written relative to it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from elma_utils import config

COMMAND_ENV = "ELMA_COMMAND"
KEY = "produced_by"


def provenance(notebook: str | None = None, root: Path | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None, "command": str}`` for this process."""
    root = Path(root) if root is not None else config.PROJECT_ROOT
    commit = _git(root, "rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git(root, "status", "--porcelain", "--", ".", ":(exclude)reports")
        dirty = None if status is None else bool(status.strip())
    return {"commit": commit, "dirty": dirty, "command": command_line(notebook, root)}


def command_line(notebook: str | None = None, root: Path | None = None) -> str:
    """What produced the numbers, as a person would type it again."""
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name == "ipykernel_launcher.py" or "ipykernel" in Path(argv[0]).parts:
        where = f"notebooks/{notebook}.ipynb" if notebook else "a notebook"
        profile = os.environ.get("ELMA_PROFILE", config.DEFAULT_PROFILE)
        return f"{where} in a Jupyter kernel (ELMA_PROFILE={profile})"
    root = Path(root) if root is not None else config.PROJECT_ROOT
    module = _module_name(Path(argv[0]))
    if module:  # python -m package.module (pytest, elma_utils.bench.harness, ...)
        return shlex.join(["python", "-m", module, *(_relative(a, root) for a in argv[1:])])
    return shlex.join(_relative(a, root) for a in argv)


def _module_name(path: Path) -> str | None:
    """``a.b.c`` for a file that is module ``c`` of package ``a.b`` (``a.b`` for its __main__.py)."""
    if path.suffix != ".py" or not (path.parent / "__init__.py").is_file():
        return None
    parts = [] if path.stem == "__main__" else [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file():
        parts.insert(0, directory.name)
        directory = directory.parent
    return ".".join(parts)


def _relative(arg: str, root: Path) -> str:
    prefix = str(root).rstrip("/") + "/"
    return arg[len(prefix) :] if arg.startswith(prefix) else arg


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if args[0] == "rev-parse" else out.stdout
