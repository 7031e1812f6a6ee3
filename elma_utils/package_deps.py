"""Which of the package's modules a piece of code can run: the transitive closure of its imports.

The pipeline's "already done" key hashes only these files, so a change to the speech
front end does not throw away a finished fine-tuning notebook that never imports it, while
any change to a module a notebook does reach (directly, through another module, or as a
``python -m elma_utils...`` program it starts) runs that notebook again. It over-approximates
on purpose: imports inside functions count, and so does any string constant that names a
module of the package.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

_MAGIC_RE = re.compile(r"^\s*[%!]")


def module_file(name: str, package_dir: Path) -> Path | None:
    """The file of dotted module ``name`` (``pkg.a.b``) inside ``package_dir`` (the ``pkg`` folder)."""
    parts = name.split(".")
    if parts[0] != package_dir.name:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, package_dir: Path) -> str:
    """Dotted name of a file inside ``package_dir`` (``pkg/a/__init__.py`` → ``pkg.a``)."""
    rel = path.relative_to(package_dir).with_suffix("")
    parts = [package_dir.name, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def named_modules(source: str, module: str, package: str, is_package: bool = False) -> set[str]:
    """Dotted names ``source`` may import from ``package`` (candidates; not all are modules).

    ``module`` is the dotted name of the code itself, for relative imports; notebook cells
    may hold IPython magics, which are dropped before parsing."""
    text = "\n".join("" if _MAGIC_RE.match(line) else line for line in source.splitlines())
    tree = ast.parse(text)
    names: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.strip()
            if re.fullmatch(rf"{re.escape(package)}(\.\w+)*", value):
                names.add(value)
    return {n for n in names if n == package or n.startswith(package + ".")}


def closure(sources: Iterable[str], package_dir: Path) -> list[Path]:
    """Every file of the package that ``sources`` reach through imports, parents included, sorted."""
    package_dir = Path(package_dir)
    package = package_dir.name
    seen: set[Path] = set()
    todo: list[str] = []
    for source in sources:
        todo.extend(named_modules(source, "__main__", package))
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:i]), package_dir)
            if path is None or path in seen:
                continue
            seen.add(path)
            name = module_name(path, package_dir)
            todo.extend(
                named_modules(path.read_text(encoding="utf-8"), name, package, path.name == "__init__.py")
            )
    return sorted(seen, key=lambda p: p.relative_to(package_dir).as_posix())
