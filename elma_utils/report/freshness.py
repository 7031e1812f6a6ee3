"""Which committed metrics files the code at HEAD would no longer produce as they are.

Every metrics file names the commit and the command that made it (``produced_by``, see
``provenance``). Its numbers are *current* when none of the code that command runs changed
between that commit and HEAD:

- a notebook (``elma pipeline … (notebooks/NN_name.ipynb)``): its cells (type, source, tags,
  as the pipeline's key counts them) and the package modules they reach
  (``package_deps.closure``, the same files the pipeline's "already done" key hashes);
- ``python -m elma_utils.X …``: the modules ``X`` reaches;
- ``elma …``: the modules the command line program (``elma_utils.cli``) reaches.

The closure over-approximates (an import inside a function counts), so "stale" means "may
differ", never "differs". A file made from a work tree that differed from its commit, or from a
commit this clone does not have, cannot be judged and is reported as such.

``python -m elma_utils.report.freshness [--check]`` lists every metrics file with its verdict and
the command to run again; ``--check`` exits 1 when any is not current.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from elma_utils import package_deps
from elma_utils.report.provenance import _git  # the one git runner of the report package

_NOTEBOOK_RE = re.compile(r"notebooks/[\w.-]+\.ipynb")
_MODULE_RE = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)")
_CLI_MODULE = "cli"


@dataclass(frozen=True)
class Freshness:
    """The verdict on one metrics file."""

    metrics: str
    commit: str | None
    command: str
    changed: tuple[str, ...] = ()
    unjudged: str | None = None  # why no verdict is possible

    @property
    def current(self) -> bool:
        return self.unjudged is None and not self.changed

    def describe(self) -> str:
        if self.unjudged:
            return f"cannot tell: {self.unjudged}"
        if not self.changed:
            return "current"
        shown = ", ".join(self.changed[:4]) + (
            f" and {len(self.changed) - 4} more" if len(self.changed) > 4 else ""
        )
        return f"STALE: {shown} changed since {self.commit[:7]}"


def command_code(command: str, root: Path, package_dir: Path) -> tuple[Path | None, list[Path]] | None:
    """(notebook or None, package files) that ``command`` runs; None when it names neither a
    notebook nor a module of the package nor the ``elma`` program."""
    package = package_dir.name
    notebook = _NOTEBOOK_RE.search(command)
    if notebook:
        path = root / notebook.group(0)
        sources = _code_cells(path.read_text(encoding="utf-8")) if path.is_file() else []
        return path, package_deps.closure(sources, package_dir)
    module = _MODULE_RE.search(command)
    if module and (module.group(1) == package or module.group(1).startswith(package + ".")):
        return None, package_deps.closure([f"import {module.group(1)}"], package_dir)
    words = command.split()
    if words and Path(words[0]).name == "elma":
        return None, package_deps.closure([f"import {package}.{_CLI_MODULE}"], package_dir)
    return None


def judge(metrics_file: Path, root: Path, package_dir: Path) -> Freshness:
    """Whether the code at ``root``'s HEAD would still produce ``metrics_file`` as it is."""
    record = json.loads(metrics_file.read_text(encoding="utf-8"))
    return judge_record(record, metrics_file.name, root, package_dir)


def judge_record(record: dict, name: str, root: Path, package_dir: Path) -> Freshness:
    """``judge`` of a record already read (a metrics file's or a part's, named ``name``)."""
    made = record.get("produced_by") or {}
    commit, command = made.get("commit"), made.get("command") or ""
    verdict = Freshness(name, commit, command)
    if not commit:
        return _unjudged(verdict, "it names no commit")
    if made.get("dirty"):
        return _unjudged(verdict, f"made from a work tree that differed from {commit[:7]}")
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}") is None:
        return _unjudged(verdict, f"commit {commit[:7]} is not in this clone's history")
    code = command_code(command, root, package_dir)
    if code is None:
        return _unjudged(
            verdict, "its command names no notebook, no module of the package, no `elma` program"
        )
    notebook, files = code
    paths = [p.relative_to(root).as_posix() for p in files]
    changed = (_git(root, "diff", "--name-only", commit, "HEAD", "--", *paths) or "").split()
    if notebook is not None:
        rel = notebook.relative_to(root).as_posix()
        if _notebook_cells_changed(root, commit, rel):
            changed.insert(0, rel)
    return Freshness(name, commit, command, tuple(changed))


def judge_all(metrics_dir: Path, root: Path, package_dir: Path) -> list[Freshness]:
    """``judge`` for every ``*.json`` in ``metrics_dir``, by file name."""
    return [judge(path, root, package_dir) for path in sorted(Path(metrics_dir).glob("*.json"))]


def _unjudged(verdict: Freshness, why: str) -> Freshness:
    return Freshness(verdict.metrics, verdict.commit, verdict.command, (), why)


def _code_cells(notebook_text: str) -> list[str]:
    import nbformat

    return [c.source for c in nbformat.reads(notebook_text, as_version=4).cells if c.cell_type == "code"]


def _notebook_cells_changed(root: Path, commit: str, rel: str) -> bool:
    """True when what a person wrote in the notebook differs (``pipeline.notebook_digest``)."""
    from elma_utils.pipeline import notebook_digest

    now = root / rel
    then = _git(root, "show", f"{commit}:{rel}")
    if then is None or not now.is_file():
        return True  # added or removed since
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / Path(rel).name
        old.write_text(then, encoding="utf-8")
        return notebook_digest(old) != notebook_digest(now)


def main(argv: Sequence[str] | None = None) -> int:
    from elma_utils import config

    p = argparse.ArgumentParser(
        prog="python -m elma_utils.report.freshness", description=__doc__.split("\n")[0]
    )
    p.add_argument("--metrics", type=Path, default=config.PROJECT_ROOT / "reports" / "metrics")
    p.add_argument("--check", action="store_true", help="exit 1 when any metrics file is not current")
    args = p.parse_args(argv)
    if not args.metrics.is_dir():
        print(f"{args.metrics} is not a folder: pass --metrics reports/metrics", file=sys.stderr)
        return 2
    verdicts = judge_all(args.metrics, config.PROJECT_ROOT, config.PROJECT_ROOT / "elma_utils")
    for v in verdicts:
        print(f"{v.metrics}: {v.describe()}")
        if not v.current and v.command:
            print(f"    made by: {v.command}")
    stale = [v for v in verdicts if not v.current]
    print(f"{len(verdicts) - len(stale)} of {len(verdicts)} metrics files are current at HEAD")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
