"""The edge bundle: one directory with everything the edge runtime needs, and a manifest.

Layout::

    manifest.json        format, versions, shapes, the layer schedule, sha256 + size of every file
    thresholds.json      the calibrated exit settings (E_T, rule, policy name, optional predictor)
    embeddings.tflite    LiteRT parts (see ``litert_parts``)
    layer_1.tflite …     (ALBERT: group_1.tflite … + exit_1.tflite …)
    skim.npz             optional: the skim head (adaptive width, ``early_exit.skim``); the
                         manifest's ``skim`` says {file, layer, block, tau, margin_blocks}
    tokenizer/           ``QATokenizer.save_assets`` (tokenizer.json + vocabulary)

``write_bundle`` builds the bundle in a temporary sibling directory and renames it into
place, so a reader never sees a half-written bundle. ``verify_bundle`` checks the manifest
and every file (presence, size, sha256, no unexpected model files) and raises
``BundleError`` naming the file at fault. This module imports no TensorFlow/Keras unless
``write_bundle`` is called.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = "elma-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
THRESHOLDS = "thresholds.json"
OFFLOAD_THRESHOLD_KEYS = ("E_offload", "E_offload_cost")  # learned for one set of weights
TOKENIZER_DIR = "tokenizer"
SKIM_FILE = "skim.npz"
POLICY_NAMES = ("entropy", "never", "patience", "entropy+patience")


class BundleError(ValueError):
    """A bundle that must not be loaded: missing, truncated, altered or unknown files."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_thresholds(thresholds: dict[str, Any]) -> dict[str, Any]:
    """Validate the exit settings stored as thresholds.json; returns a normalised copy.

    Keys: ``policy`` (one of ``POLICY_NAMES``; default "entropy" when ``E_T`` is given, else
    "never"), ``E_T`` (entropy threshold), ``rule`` (span entropy rule, default "max"),
    ``null_threshold`` / ``no_answer_margin`` (SQuAD 2.0), ``patience``, ``predictor``
    (optional entropy-predictor table, any JSON), ``E_offload`` (optional, ≥ E_T: a question
    no exit settled is still answered on the device when its last-layer entropy is ≤ it; the
    server learns it, ``server.offload_threshold``). Other keys are kept as notes.
    """
    if not isinstance(thresholds, dict):
        raise BundleError(f"{THRESHOLDS}: expected a JSON object, got {type(thresholds).__name__}")
    th = dict(thresholds)
    th.setdefault("policy", "entropy" if th.get("E_T") is not None else "never")
    th.setdefault("rule", "max")
    if th["policy"] not in POLICY_NAMES:
        raise BundleError(f"{THRESHOLDS}: unknown policy {th['policy']!r}; choose one of {POLICY_NAMES}")
    if "entropy" in th["policy"]:
        e_t = th.get("E_T")
        if isinstance(e_t, bool) or not isinstance(e_t, int | float) or not math.isfinite(e_t):
            raise BundleError(f"{THRESHOLDS}: policy {th['policy']!r} needs a finite number E_T, got {e_t!r}")
    if "patience" in th["policy"] and not (isinstance(th.get("patience"), int) and th["patience"] >= 1):
        raise BundleError(f"{THRESHOLDS}: policy {th['policy']!r} needs an integer patience ≥ 1")
    e_off = th.get("E_offload")
    if e_off is not None:
        for key in OFFLOAD_THRESHOLD_KEYS:
            v = th.get(key)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ):
                raise BundleError(f"{THRESHOLDS}: {key} must be a finite number, got {v!r}")
        if "entropy" not in th["policy"] or e_off < th["E_T"]:
            raise BundleError(
                f"{THRESHOLDS}: E_offload ({e_off!r}) needs an entropy policy with E_T ≤ E_offload "
                f"(E_T is {th.get('E_T')!r}); remove E_offload or raise it"
            )
    try:
        policy_from_thresholds(th)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{THRESHOLDS}: {err}") from err
    return th


def for_new_weights(thresholds: dict[str, Any]) -> dict[str, Any]:
    """The thresholds a retrained edge starts from: the learned offload threshold priced the
    old weights' entropies, so it goes (``server.offload_threshold`` learns it again)."""
    return {k: v for k, v in thresholds.items() if k not in OFFLOAD_THRESHOLD_KEYS}


def policy_from_thresholds(th: dict[str, Any]):
    """The exit policy described by a thresholds.json dict (pure NumPy policies)."""
    from elma_utils.early_exit.policies import NeverExit, policy_from_params

    name = th.get("policy", "entropy" if th.get("E_T") is not None else "never")
    if name == "never":
        return NeverExit()
    params: dict[str, Any] = {}
    if "entropy" in name:
        params["threshold"] = th["E_T"]
        for key in ("rule", "no_answer_margin", "null_threshold"):
            if th.get(key) is not None:
                params[key] = th[key]
    if "patience" in name:
        params["patience"] = th["patience"]
    return policy_from_params(params)


def _file_entries(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def write_bundle(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    seq_len: int,
    precision: str,
    thresholds: dict[str, Any],
    model_version: str,
    doc_stride: int = 128,
    max_query_len: int = 64,
    overwrite: bool = False,
    dynamic_length: bool = True,
    skim=None,
) -> Path:
    """Export ``model`` (a MultiExitQAModel) and everything the edge needs into ``out_dir``.

    The bundle is written to a temporary sibling directory, verified, then renamed into
    place; with ``overwrite`` an existing bundle is replaced (the old one removed only after
    the new one is in place). ``doc_stride`` / ``max_query_len`` are the window settings the
    edge uses to build features from text. ``dynamic_length``: parts accept any window length
    up to ``seq_len`` (the edge runs each window unpadded) instead of exactly ``seq_len``.
    ``skim``: a ``SkimHead`` to skim the passage after its layer (adaptive width); its
    weights go in as ``skim.npz`` and its keep rule into the manifest.
    """
    from elma_utils.export.litert_parts import export_parts, layer_schedule, part_specs

    out_dir = Path(out_dir)
    if not model_version or not isinstance(model_version, str):
        raise ValueError("model_version must be a non-empty string")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"bundle directory {out_dir} exists; pass overwrite=True to replace it")
    if max_query_len + 3 >= seq_len:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for the context after max_query_len={max_query_len}"
        )
    th = check_thresholds(thresholds)
    check_predictor_skim(th, None if skim is None else skim.settings())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        parts = export_parts(model, tmp, seq_len, precision, dynamic_length=dynamic_length)
        if skim is not None:
            skim.save(tmp / SKIM_FILE)
        tokenizer.save_assets(tmp / TOKENIZER_DIR)
        (tmp / THRESHOLDS).write_text(json.dumps(th, indent=2, sort_keys=True))
        backbone = model.backbone
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_version": model_version,
            "precision": precision,
            "seq_len": int(seq_len),
            "dynamic_length": bool(dynamic_length),
            "num_layers": int(model.num_exits),
            "hidden": int(backbone.hidden_dim),
            "backbone": type(backbone).__name__,
            "doc_stride": int(doc_stride),
            "max_query_len": int(max_query_len),
            "tokenizer": TOKENIZER_DIR,
            "embeddings": next(iter(parts)),
            "layers": layer_schedule(model),
            "parts": part_specs(model),
            "files": _file_entries(tmp),
        }
        if skim is not None:
            manifest["skim"] = {"file": SKIM_FILE, **skim.settings()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        verify_bundle(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def copy_listed(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Copy a bundle's manifest and the files it lists, nothing else (the edge refuses unlisted
    files) into ``dst``; returns the source's verified manifest."""
    src, dst = Path(src), Path(dst)
    manifest = verify_bundle(src)
    for rel in [*manifest["files"], MANIFEST]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    return manifest


def with_thresholds(
    bundle_dir: str | Path, out_dir: str | Path, thresholds: dict[str, Any], model_version: str,
    *, drop_skim: bool = False,
) -> Path:  # fmt: skip
    """A copy of a bundle with other thresholds (checked) and another model version, the same
    weights; the manifest lists the new thresholds.json. ``drop_skim``: without the skim head.
    Serves the full-compute reference and a learned offload threshold."""
    src, out = Path(bundle_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another directory")
    thresholds = check_thresholds(thresholds)  # before anything is written: no half-made copy
    manifest = copy_listed(src, out)
    spec = manifest.pop("skim", None) if drop_skim else None
    if spec:
        (out / spec["file"]).unlink()
    (out / THRESHOLDS).write_text(json.dumps(thresholds, indent=2, sort_keys=True))
    manifest["model_version"] = model_version
    manifest["files"] = _file_entries(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    verify_bundle(out)
    return out


def full_compute_copy(bundle_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of a bundle that runs every layer at full width: the same parts and tokenizer,
    no skim head, policy "never" (the entropy predictor, fitted on the adaptive runtime, is
    dropped). The reference of an adaptive bundle in the device benchmark."""
    src = Path(bundle_dir)
    th = read_thresholds(src)
    th = {k: v for k, v in for_new_weights(th).items() if k not in ("predictor", "E_T", "patience")}
    version = json.loads((src / MANIFEST).read_text())["model_version"]
    return with_thresholds(src, out_dir, {**th, "policy": "never"}, f"{version}-full", drop_skim=True)


def _safe_relative(root: Path, rel: str) -> Path:
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise BundleError(f"{MANIFEST}: file entry {rel!r} is not a plain relative path inside the bundle")
    return root / p


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check a bundle; returns its manifest or raises ``BundleError`` naming the file at fault."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"missing {MANIFEST} in {root}: not an ELMA edge bundle (or an incomplete copy)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{MANIFEST} in {root} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST} in {root}: expected a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{MANIFEST}: unknown format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST}: unsupported format_version {manifest.get('format_version')!r}; "
            f"this runtime reads version {FORMAT_VERSION}"
        )
    required = ("model_version", "precision", "seq_len", "num_layers", "hidden", "files", "layers", "parts")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{MANIFEST}: missing key(s) {missing}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{MANIFEST}: 'files' must be a non-empty object")
    for rel, entry in files.items():
        path = _safe_relative(root, rel)
        if not path.is_file():
            raise BundleError(f"missing file {rel} in bundle {root} (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(
                f"{rel}: {size} bytes on disk but {entry.get('bytes')} in {MANIFEST} (truncated or replaced)"
            )
        if sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{rel}: sha256 does not match {MANIFEST} (file altered or corrupt)")
    extra = sorted(
        p.relative_to(root).as_posix()
        for pattern in ("*.tflite", "*.npz")
        for p in root.rglob(pattern)
        if p.relative_to(root).as_posix() not in files
    )
    if extra:
        raise BundleError(f"unexpected model file(s) not in {MANIFEST}: {', '.join(extra)}")
    needed = [manifest.get("embeddings", "embeddings.tflite"), THRESHOLDS]
    for step in manifest["layers"]:
        needed += [step["layer"]] + ([step["head"]] if step.get("head") else [])
    for rel in needed:
        if rel not in files:
            raise BundleError(f"{MANIFEST}: {rel} is needed by the bundle but not listed in 'files'")
    if len(manifest["layers"]) != manifest["num_layers"]:
        raise BundleError(
            f"{MANIFEST}: num_layers={manifest['num_layers']} but {len(manifest['layers'])} layer entries"
        )
    if manifest.get("skim") is not None:
        _check_skim(manifest["skim"], files, int(manifest["num_layers"]))
    return manifest


def _check_skim(spec: Any, files: dict, num_layers: int) -> None:
    """The manifest's ``skim`` entry: a listed (hence sha256-checked) file and a sane keep rule."""
    if not isinstance(spec, dict):
        raise BundleError(f"{MANIFEST}: 'skim' must be an object, got {type(spec).__name__}")
    if spec.get("file") not in files:
        raise BundleError(f"{MANIFEST}: skim file {spec.get('file')!r} is not listed in 'files'")

    def integer(key: str, low: int, high: int | None = None) -> None:
        v = spec.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            span = f"{low}..{high}" if high is not None else f"≥ {low}"
            raise BundleError(f"{MANIFEST}: skim {key} must be an integer {span}, got {v!r}")

    integer("layer", 1, num_layers - 1)
    integer("block", 1)
    integer("margin_blocks", 0)
    tau = spec.get("tau")
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 <= tau <= 1.0:
        raise BundleError(f"{MANIFEST}: skim tau must be a number in 0..1, got {tau!r}")


def check_predictor_skim(thresholds: dict[str, Any], skim: dict[str, Any] | None) -> None:
    """Refuse an entropy-predictor table fitted on another runtime than the bundle's.

    ``skim``: the bundle's keep rule (``SkimHead.settings()``, the manifest's ``skim`` without
    ``file``) or None. The table's ``skim`` (``EntropyExitPredictor.from_layerwise``) must be
    the same: entropies after the skim layer and the exit layers depend on it."""
    table = thresholds.get("predictor")
    if not isinstance(table, dict):
        return
    fitted = table.get("skim")
    wanted = None if skim is None else {k: v for k, v in skim.items() if k != "file"}
    if fitted != wanted:
        raise BundleError(
            f"{THRESHOLDS}: the entropy predictor was fitted on a runtime with skim {fitted!r} but the "
            f"bundle skims with {wanted!r}: refit it with EntropyExitPredictor.from_layerwise(..., skim=head)"
        )


def read_thresholds(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / THRESHOLDS
    try:
        return check_thresholds(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{THRESHOLDS}: cannot read it: {err}") from err
