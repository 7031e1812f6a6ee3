"""Run ``notebooks/NN_*.ipynb`` in order, headless, with papermill.

Each notebook gets ``profile`` (and any extra parameters) injected after its cell tagged
``parameters``, and runs with ``ELMA_PROFILE`` and ``ELMA_REPORTS_DIR`` set to the profile and
its reports directory (``config.reports_dir_for``: reports/ for cpu, reports/profiles/<name>/
otherwise). Executed copies land in ``<reports>/runs/<timestamp>-<profile>/``; the notebooks
themselves are only read. A notebook that already finished is skipped unless ``force`` or its
"already done" key changed (:func:`run_key`): the notebook's cells, the package source it
can run (the modules of ``elma_utils`` its cells reach through imports, see ``package_deps``),
the profile, the injected parameters and the SQuAD files the profile reads (their sha256, cached by path, size and mtime in ``<reports>/runs/file-sha256.json``).
The record is ``<reports>/runs/state-<profile>.json``. The first failing notebook stops the run
with :class:`PipelineError`, which names the notebook, the cell and the executed copy that
holds the traceback. ``<reports>/REPORT.md`` is regenerated at the end (also after a failure).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from elma_utils import config, package_deps, reporting

KERNEL_NAME = "python3"
NOTEBOOK_RE = re.compile(r"^(\d{2})_(.+)\.ipynb$")
STATE_VERSION = 2  # 2: the run key (notebook, package, profile, parameters, data)
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PipelineError(RuntimeError):
    """A notebook failed (or could not be started); the message says which, where and why."""

    def __init__(self, message: str, notebook: str | None = None, output: Path | None = None):
        super().__init__(message)
        self.notebook = notebook
        self.output = output


# ---------------------------------------------------------------- finding and choosing notebooks


def find_notebooks(notebooks_dir: Path | None = None) -> list[Path]:
    """``NN_*.ipynb`` files of the notebooks directory, in number order."""
    directory = Path(notebooks_dir) if notebooks_dir is not None else config.PROJECT_ROOT / "notebooks"
    if not directory.is_dir():
        raise FileNotFoundError(f"notebooks directory {directory} does not exist")
    found = [p for p in directory.iterdir() if p.is_file() and NOTEBOOK_RE.match(p.name)]
    return sorted(found, key=lambda p: (int(NOTEBOOK_RE.match(p.name).group(1)), p.name))


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks named in ``only``: by number ("02"), stem ("02_finetune_full_model"),
    name without the number ("finetune_full_model") or file name; order stays the pipeline's."""
    if not only:
        return list(notebooks)
    wanted: set[Path] = set()
    for raw in only:
        token = str(raw).strip().removesuffix(".ipynb")
        if not token:
            continue
        hits = [p for p in notebooks if token in _names_of(p)]
        if not hits:
            known = ", ".join(p.stem for p in notebooks) or "none"
            raise ValueError(f"no notebook matches {raw!r}; notebooks: {known}")
        wanted.update(hits)
    return [p for p in notebooks if p in wanted]


def _names_of(path: Path) -> set[str]:
    m = NOTEBOOK_RE.match(path.name)
    number, rest = m.group(1), m.group(2)
    return {number, str(int(number)), path.stem, rest}


# ---------------------------------------------------------------- kernel


def check_kernel(name: str = KERNEL_NAME) -> Path:
    """The kernelspec directory for ``name``; PipelineError when it is missing or runs another Python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = (
        f"run `bash scripts/setup.sh`, or `{sys.executable} -m ipykernel install --sys-prefix --name {name}`"
    )
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise PipelineError(f"no Jupyter kernel named {name!r} is installed; {fix}") from None
    argv0 = spec.argv[0] if spec.argv else ""
    # "python"/"python3"/"python3.11" are replaced by jupyter_client with this interpreter.
    if os.path.isabs(argv0) and not Path(argv0).absolute().is_relative_to(Path(sys.prefix).absolute()):
        raise PipelineError(
            f"the Jupyter kernel {name!r} ({spec.resource_dir}) runs {argv0}, not this environment's "
            f"Python ({sys.executable}), so notebooks would not see elma_utils; {fix}"
        )
    return Path(spec.resource_dir)


# ---------------------------------------------------------------- state


def reports_root(profile: str, reports_dir: Path | None = None) -> Path:
    """``reports_dir`` if given, else the profile's reports directory (``config.reports_dir_for``:
    $ELMA_REPORTS_DIR, reports/ for the default profile, reports/profiles/<name>/ otherwise)."""
    return Path(reports_dir) if reports_dir is not None else config.reports_dir_for(profile)


def state_path(profile: str, reports_dir: Path | None = None) -> Path:
    return reports_root(profile, reports_dir) / reporting.RUNS_DIR / f"state-{profile}.json"


def load_state(profile: str, reports_dir: Path | None = None) -> dict[str, dict]:
    """{notebook stem: {"key", "finished_at", "seconds", "output"}} of finished notebooks."""
    path = state_path(profile, reports_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        notebooks = data["notebooks"]
        if not isinstance(notebooks, dict):
            raise TypeError("'notebooks' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # A broken record only costs re-running; say so instead of failing.
        print(f"pipeline: ignoring unreadable state file {path} ({exc}); every notebook will run")
        return {}
    return notebooks


def _save_state(profile: str, notebooks: dict[str, dict], reports_dir: Path | None) -> None:
    data = {"version": STATE_VERSION, "profile": profile, "notebooks": notebooks}
    reporting._atomic_write_text(
        state_path(profile, reports_dir), json.dumps(data, indent=2, sort_keys=True) + "\n"
    )


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- the "already done" key

KEY_PARTS = ("notebook", "package", "profile", "parameters", "data")
HASH_CACHE_FILE = "file-sha256.json"


def notebook_digest(path: Path) -> str:
    """sha256 of what a person wrote in the notebook: each cell's type, source and tags.

    Outputs, execution counts and other metadata do not count, so a notebook opened and saved
    in JupyterLab (which may add outputs or metadata) is not run again for that alone."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [[c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))] for c in nb.cells]
    return _json_sha256(cells)


def package_digest(package_dir: Path | None = None, files: Sequence[Path] | None = None) -> str:
    """sha256 over the package's ``files`` (default: every ``**/*.py``), each file's relative path and bytes."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    chosen = root.rglob("*.py") if files is None else files
    for path in sorted(chosen, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def notebook_package_digest(nb_path: Path, package_dir: Path | None = None) -> str:
    """``package_digest`` of the modules the notebook's code cells can run (``package_deps.closure``).

    A notebook that never imports the speech front end is not run again when only that changes."""
    import nbformat

    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    nb = nbformat.read(str(nb_path), as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    return package_digest(root, package_deps.closure(sources, root))


def data_files(profile: config.Profile, data_dir: Path | str | None = None) -> list[tuple[str, Path | None]]:
    """The SQuAD files the profile reads: (file name, path or None when it is not there)."""
    from elma_utils.squad.data import squad_filename, squad_path

    files: list[tuple[str, Path | None]] = []
    for version, split in [(profile.train_version, "train"), ("1.1", "dev"), ("2.0", "dev")]:
        try:
            path: Path | None = squad_path(version, split, data_dir=data_dir, download=False)
        except FileNotFoundError:
            path = None
        files.append((squad_filename(version, split), path))
    return files


def data_digest(
    profile: config.Profile, data_dir: Path | str | None = None, cache_path: Path | None = None
) -> str:
    """sha256 over the profile's SQuAD files' own sha256 (a missing file counts as missing)."""
    cache = _load_hash_cache(cache_path)
    entries = []
    for name, path in data_files(profile, data_dir):
        entries.append([name, cached_file_sha256(path, cache) if path is not None else None])
    if cache_path is not None and cache.get("changed"):
        cache.pop("changed")
        reporting._atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return _json_sha256(entries)


def cached_file_sha256(path: Path, cache: dict) -> str:
    """``file_sha256`` remembered by (absolute path, size, mtime): a 40 MB file is read once."""
    st = Path(path).stat()
    key = str(Path(path).resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    hit = cache.setdefault("files", {}).get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    digest = file_sha256(path)
    cache["files"][key] = {"stamp": stamp, "sha256": digest}
    cache["changed"] = True
    return digest


def run_key(
    nb_path: Path,
    profile: config.Profile,
    parameters: dict | None = None,
    *,
    package: str | None = None,
    cache_path: Path | None = None,
) -> dict[str, str]:
    """What a finished notebook's results depend on, one sha256 per part (see ``KEY_PARTS``).

    ``package`` overrides the digest of the package source the notebook can run."""
    params = dict(parameters or {})
    return {
        "notebook": notebook_digest(nb_path),
        "package": package or notebook_package_digest(nb_path),
        "profile": _json_sha256(profile.to_dict()),
        "parameters": _json_sha256(params),
        "data": data_digest(profile, params.get("data_dir"), cache_path),
    }


def changed_parts(done: dict | None, key: dict[str, str]) -> list[str]:
    """Which parts of the key differ from a finished run's record (all of them for an old record)."""
    recorded = (done or {}).get("key") or {}
    return [part for part in KEY_PARTS if recorded.get(part) != key.get(part)]


def _json_sha256(value: Any) -> str:
    text = json.dumps(reporting.to_jsonable(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _load_hash_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a broken cache only costs hashing again
    return cache if isinstance(cache, dict) and isinstance(cache.get("files", {}), dict) else {}


# ---------------------------------------------------------------- running


def run_pipeline(
    profile: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
    notebooks_dir: Path | None = None,
    reports_dir: Path | None = None,
    extra_parameters: dict | None = None,
    stream_output: bool = True,
) -> list[dict]:
    """Run the notebooks in order; returns one dict per notebook:
    ``{"name", "status": "ran" | "skipped", "seconds", "output"}``.

    ``stream_output`` echoes what the cells print (training progress ...) to this process's
    stdout/stderr while they run, besides keeping it in the executed copy."""
    prof = config.get_profile(profile)  # ValueError for unknown names
    profile_name = prof.name
    notebooks = select_notebooks(find_notebooks(notebooks_dir), only)
    if not notebooks:
        raise FileNotFoundError(
            f"no NN_*.ipynb notebooks in {notebooks_dir or config.PROJECT_ROOT / 'notebooks'}"
        )
    root = reports_root(profile_name, reports_dir)
    parameters = {"profile": profile_name, **(extra_parameters or {})}
    state = load_state(profile_name, root)
    hash_cache = root / reporting.RUNS_DIR / HASH_CACHE_FILE
    run_dir: Path | None = None
    results: list[dict] = []
    total = len(notebooks)
    try:
        for i, nb_path in enumerate(notebooks, 1):
            name = nb_path.stem
            key = run_key(nb_path, prof, parameters, cache_path=hash_cache)
            done = state.get(name)
            changed = changed_parts(done, key)
            if not force and done and not changed:
                print(f"[{i}/{total}] {name}: skipped (finished {done.get('finished_at')}, unchanged)")
                results.append(
                    {
                        "name": name,
                        "status": "skipped",
                        "seconds": 0.0,
                        "output": done.get("output"),
                    }
                )
                continue
            if run_dir is None:
                check_kernel()
                run_dir = _new_run_dir(root, profile_name)
            output = run_dir / nb_path.name
            why = "forced" if force else ("never finished" if not done else ", ".join(changed) + " changed")
            print(f"[{i}/{total}] {name}: running (profile {profile_name}; {why}) → {output}", flush=True)
            state.pop(name, None)
            _save_state(profile_name, state, root)
            seconds = _execute(nb_path, output, parameters, root, profile_name, stream_output)
            state[name] = {
                "key": key,
                "finished_at": _now_iso(),
                "seconds": round(seconds, 3),
                "output": str(output),
            }
            _save_state(profile_name, state, root)
            print(f"[{i}/{total}] {name}: finished in {seconds:.1f} s", flush=True)
            results.append({"name": name, "status": "ran", "seconds": seconds, "output": str(output)})
    except PipelineError:
        _report_quietly(root, profile_name)
        raise
    report = reporting.write_report(root, profile=profile_name)
    print(f"pipeline: report written to {report}")
    return results


def _execute(
    nb_path: Path, output: Path, parameters: dict, root: Path, profile: str, stream_output: bool
) -> float:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    name = nb_path.stem
    t0 = time.perf_counter()
    command = f"elma pipeline --profile {profile} --only {name} (notebooks/{nb_path.name})"
    with _environment(ELMA_PROFILE=profile, ELMA_REPORTS_DIR=str(root), ELMA_COMMAND=command):
        try:
            papermill.execute_notebook(
                str(nb_path),
                str(output),
                parameters=parameters,
                kernel_name=KERNEL_NAME,
                language="python",
                progress_bar=True,
                cwd=str(config.PROJECT_ROOT),
                stdout_file=sys.stdout if stream_output else None,
                stderr_file=sys.stderr if stream_output else None,
            )
        except PapermillExecutionError as exc:
            raise PipelineError(_failure_message(name, output, exc), notebook=name, output=output) from exc
        except Exception as exc:  # kernel died, timed out, could not start, bad notebook json ...
            where = f"; the partly executed copy is {output}" if output.is_file() else ""
            raise PipelineError(
                f"notebook {name} could not be run: {type(exc).__name__}: {exc}{where}",
                notebook=name,
                output=output if output.is_file() else None,
            ) from exc
    return time.perf_counter() - t0


def _failure_message(name: str, output: Path, exc: Any) -> str:
    cell_number = _original_cell_number(output, exc.cell_index)
    where = f"cell {cell_number}" if cell_number is not None else f"cell index {exc.cell_index}"
    first_line = next((ln for ln in str(exc.source).splitlines() if ln.strip()), "").strip()
    evalue = _ANSI_RE.sub("", str(exc.evalue)).strip()
    lines = [
        f"notebook {name} failed in {where} (In [{exc.exec_count}]): {exc.ename}: {evalue}",
        f"  cell starts: {first_line[:100]}",
        f"  the executed copy with the full traceback: {output}",
    ]
    return "\n".join(lines)


def _original_cell_number(output: Path, cell_index: int) -> int | None:
    """1-based number of the failing cell in the notebook as written (without the injected cells)."""
    try:
        import nbformat

        nb = nbformat.read(str(output), as_version=4)
    except Exception:
        return None
    # papermill puts an error banner cell first when it saves a failed run.
    cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    if not 0 <= cell_index < len(cells):
        return None
    injected = sum(
        1 for c in cells[:cell_index] if "injected-parameters" in c.get("metadata", {}).get("tags", [])
    )
    return cell_index - injected + 1


def _report_quietly(root: Path, profile: str) -> None:
    try:
        reporting.write_report(root, profile=profile)
    except Exception as exc:  # never hide the notebook failure behind a report failure
        print(f"pipeline: could not write the report: {exc}", file=sys.stderr)


def _new_run_dir(root: Path, profile: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / reporting.RUNS_DIR / f"{stamp}-{profile}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by the kernel) for the duration of a notebook."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
