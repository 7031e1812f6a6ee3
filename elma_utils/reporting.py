"""Metrics, figures and the generated report (reports/REPORT.md).

Notebooks call :func:`save_metrics` and :func:`save_figure`; the pipeline calls
:func:`write_report` after each run. Layout under the reports directory
(``$ELMA_REPORTS_DIR`` or ``reports/``)::

    metrics/<notebook>.json   one json object per notebook (sorted keys)
    figures/<name>.png        figures; names start with the notebook's number ("02_loss.png")
    predictions/...           prediction files written by the notebooks
    runs/                     executed notebook copies and pipeline state (not committed)
    REPORT.md                 regenerated from all of the above
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from elma_utils import config
from elma_utils.atomic_files import write_bytes_atomic
from elma_utils.report import provenance

PRODUCED_BY = provenance.KEY  # the metrics files' provenance key
METRICS_DIR = "metrics"
FIGURES_DIR = "figures"
PREDICTIONS_DIR = "predictions"
RUNS_DIR = "runs"
REPORT_FILE = "REPORT.md"
FIGURE_DPI = 110
MAX_TEXT_IN_TABLE = 80  # longer strings stay in the json only

_FILE_MODE = 0o644  # mkstemp makes 0600 files; reports are meant to be read
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------- writing


def save_metrics(notebook: str, metrics: Mapping[str, Any], reports_dir: Path | None = None) -> Path:
    """Write ``metrics`` to ``<reports>/metrics/<notebook>.json`` atomically; returns the path.

    ``notebook`` is the notebook's stem, e.g. ``"02_finetune_full_model"`` (a trailing
    ``.ipynb`` is dropped). NumPy scalars and arrays, paths, tuples and sets are converted;
    NaN and infinities become ``null`` so that the file stays strict json. The file also
    records what produced it under ``produced_by``: the commit, whether the work tree differed
    from it, and the command (:func:`elma_utils.report.provenance.provenance`), unless
    ``metrics`` brings its own ``produced_by``.
    """
    name = _checked_name(notebook, "notebook", suffix=".ipynb")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics for {name} must be a dict, not {type(metrics).__name__}")
    path = _reports(reports_dir) / METRICS_DIR / f"{name}.json"
    metrics = {PRODUCED_BY: provenance.provenance(name), **metrics}
    portable = project_relative(to_jsonable(metrics))
    text = json.dumps(portable, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _atomic_write_text(path, text)
    return path


def project_relative(value: Any, root: Path | None = None) -> Any:
    """``value`` with every string path inside the project written relative to its root.

    Metrics files are committed: ``reports/predictions/x.json`` means the same on every
    clone, ``/home/someone/elma/reports/predictions/x.json`` only on the machine that ran it.
    """
    prefix = str(root or config.PROJECT_ROOT).rstrip("/") + "/"
    if isinstance(value, dict):
        return {k: project_relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [project_relative(v, root) for v in value]
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix) :]
    return value


def save_figure(fig: Any, name: str, reports_dir: Path | None = None) -> Path:
    """Save a matplotlib figure as ``<reports>/figures/<name>.png`` (dpi 110); returns the path.

    Start ``name`` with the notebook's number (``"02_training_loss"``) so that the report
    shows it in that notebook's section. The figure is left open (notebooks still show it).
    """
    name = _checked_name(name, "figure name", suffix=".png")
    path = _reports(reports_dir) / FIGURES_DIR / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=FIGURE_DPI, bbox_inches="tight", format="png")
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- reading


def load_metrics(path: Path) -> dict:
    """One metrics file; a file that is not a json object raises ValueError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"metrics file {path} is not valid json: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"metrics file {path} holds a {type(data).__name__}, not a json object")
    return data


def earlier_metrics(notebook: str, reports_dir: Path | None = None) -> dict:
    """The metrics an earlier notebook saved, which a later one builds on.

    Raises FileNotFoundError that names the notebook to run first, rather than letting the
    later notebook go on with made-up settings.
    """
    path = _reports(reports_dir) / "metrics" / f"{_checked_name(notebook, 'notebook', '.json')}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run notebooks/{notebook}.ipynb first, with the same profile "
            "(bash scripts/run_pipeline.sh PROFILE runs the notebooks in order)"
        )
    return load_metrics(path)


def load_all_metrics(reports_dir: Path | None = None) -> dict[str, dict]:
    """Every ``metrics/*.json``, keyed by notebook stem, in notebook order."""
    return {path.stem: load_metrics(path) for path in _metrics_files(_reports(reports_dir))}


# ---------------------------------------------------------------- the report


def write_report(reports_dir: Path | None = None, profile: str | None = None) -> Path:
    """Regenerate ``<reports>/REPORT.md`` (:mod:`elma_utils.report.document`) from every metrics
    file, figure and prediction file. For the project's own reports/ (the committed ``cpu``
    results) the README's results block is regenerated from the same metrics."""
    from elma_utils.report import document

    root = _reports(reports_dir)
    out = root / REPORT_FILE
    _atomic_write_text(out, document.build_report(root, profile))
    if root.resolve() == (config.PROJECT_ROOT / "reports").resolve():
        update_readme(root)
    return out


def update_readme(reports_dir: Path | None = None, readme: Path | None = None) -> bool:
    """Rewrite the results block of README.md from ``<reports>/metrics``; True when it changed.

    A README without the block's markers is left alone."""
    from elma_utils.report import headline

    readme = Path(readme) if readme is not None else config.PROJECT_ROOT / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    try:
        new = headline.replace_readme_block(text, headline.readme_block(load_all_metrics(reports_dir)))
    except ValueError:
        return False
    if new == text:
        return False
    _atomic_write_text(readme, new)
    return True


def _prediction_lines(root: Path) -> list[str]:
    pred_dir = root / PREDICTIONS_DIR
    files = sorted(p for p in pred_dir.rglob("*") if p.is_file()) if pred_dir.is_dir() else []
    if not files:
        return ["_None._"]
    return [f"- [`{_rel(p, root)}`]({_rel(p, root)}) ({_size_text(p.stat().st_size)})" for p in files]


# ---------------------------------------------------------------- helpers (public: tests and notebooks)


def to_jsonable(value: Any) -> Any:
    """A json-serialisable copy: numpy scalars/arrays, paths, tuples, sets, non-finite floats handled."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(value, key=repr)]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    # NumPy (and anything array- or scalar-like) without importing numpy here.
    dtype = getattr(value, "dtype", None)
    if getattr(value, "ndim", None) == 0 and getattr(dtype, "kind", "") == "f" and dtype.itemsize < 8:
        return to_jsonable(float(str(value)))  # float32: 81.234566, not 81.23456573486328
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        return to_jsonable(value.item())
    raise TypeError(f"cannot store a {type(value).__name__} in a metrics file: {value!r:.80}")


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def format_value(value: Any) -> str | None:
    """Table text for a scalar (floats to 2-4 significant digits); None for lists and long text."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT_IN_TABLE else None
    return None


def format_number(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    if abs(x) >= 1e-4:
        return f"{x:.4g}"
    return f"{x:.2e}"


def _reports(reports_dir: Path | None) -> Path:
    return Path(reports_dir) if reports_dir is not None else config.reports_dir()


def _checked_name(name: str, what: str, suffix: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, not {type(name).__name__}")
    name = name.removesuffix(suffix)
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(
            f"bad {what} {name!r}: use letters, digits, '_', '-' or '.', e.g. '02_finetune_full_model'"
        )
    return name


def _order_key(path: Path) -> tuple[int, str]:
    m = re.match(r"^(\d+)", path.stem)
    return (int(m.group(1)) if m else 10**9, path.stem)


def _metrics_files(root: Path) -> list[Path]:
    directory = root / METRICS_DIR
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("*.json") if not p.name.startswith(".")), key=_order_key)


def _all_figures(root: Path) -> list[Path]:
    directory = root / FIGURES_DIR
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("*.png") if not p.name.startswith(".")), key=_order_key)


def _figures_for(root: Path, notebook: str) -> list[Path]:
    m = re.match(r"^(\d+)_", notebook)
    if not m:
        return []
    return [p for p in _all_figures(root) if p.name.startswith(f"{m.group(1)}_")]


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _size_text(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _ram_text() -> str:
    total = None
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:  # psutil missing or unsupported platform: fall back to /proc
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return f"{total / 2**30:.1f} GiB" if total else "unknown"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"))
