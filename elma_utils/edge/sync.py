"""`elma sync`: fetch the newest published edge bundle, check it, and switch to it atomically.

The server publishes (``offload.publish``)::

    <remote_root>/LATEST.json         {"version", "manifest_sha256", "manifest_bytes", "serial", …}
    <remote_root>/<version>/          a bundle (``export.bundle``) whose manifest names that version

The edge keeps::

    <local_root>/versions/<version>/  installed bundles, never modified after installation
    <local_root>/current  -> versions/<version>   the bundle to load (``current_bundle``)
    <local_root>/previous -> versions/<version>   the one before, for ``rollback``

Why this way: a device that loses power or network half-way through an update must still
boot the bundle it had. So a new version is downloaded into a temporary directory next to
``versions/``; every file is checked against the manifest (size, sha256) and the manifest
against LATEST.json (sha256), files the manifest does not list are refused, the bundle is
verified, loaded and asked a smoke question; only then is it renamed into ``versions/`` and
``current`` replaced by ``os.replace`` of a fresh symlink (atomic on POSIX). On any failure
the temporary directory is removed, ``current`` is untouched, and ``SyncError`` names the
file and what is wrong. Files are never changed in place, so an ``EdgeModel`` loaded from an
older version keeps answering; load from ``current_bundle()`` (the resolved directory), not
from the ``current`` link, so a lazily opened tokenizer comes from the same version.

The remote side is anything with three methods of paramiko's ``SFTPClient``: ``open(path,
"rb")``, ``stat(path)`` (``st_size``, ``st_mode``) and ``listdir(path)``. ``LocalTree`` is
such an object over a plain directory (tests, a USB stick). This module imports neither
Keras nor TensorFlow (the edge runtime loads bundles with LiteRT).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from elma_utils.atomic_files import fsync_dir, write_json_atomic
from elma_utils.file_lock import exclusive_lock

log = logging.getLogger(__name__)

LATEST_NAME = "LATEST.json"
LATEST_FORMAT = "elma-edge-latest"
MANIFEST_NAME = "manifest.json"
VERSIONS_DIR = "versions"
CURRENT_LINK = "current"
PREVIOUS_LINK = "previous"
ROLLED_BACK = "rolled_back.json"
LOCK_NAME = ".sync.lock"
INCOMING_PREFIX = ".incoming-"
MAX_LATEST_BYTES = 64 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_REMOTE_ENTRIES = 10_000
DEFAULT_MAX_BUNDLE_BYTES = 4 * 1024**3
CHUNK = 1 << 20
# edge-<serial>-<UTC time>-<content sha256 prefix>: sorts by serial, unique per content and time
VERSION_RE = re.compile(r"^edge-(\d{6,})-(\d{8}T\d{6}Z)-([0-9a-f]{8})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_SMOKE = (
    "Who wrote the report?",
    "The report on early exit was written by the ELMA team in 2024 and sent to every device.",
)


class SyncError(RuntimeError):
    """The update was refused or failed; ``file`` names the file at fault when there is one."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


class RemoteTree(Protocol):
    """The part of paramiko's ``SFTPClient`` that sync uses."""

    def open(self, path: str, mode: str = "r") -> IO[bytes]: ...

    def stat(self, path: str) -> Any: ...

    def listdir(self, path: str = ".") -> list[str]: ...


class LocalTree:
    """A plain directory with the ``RemoteTree`` methods, read-only, confined to ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def _path(self, path: str) -> Path:
        inside = posixpath.normpath("/" + str(path)).lstrip("/")
        real = (self.root / inside).resolve()
        if real != self.root and self.root not in real.parents:
            raise PermissionError(f"{path}: outside {self.root}")
        return real

    def open(self, path: str, mode: str = "rb") -> IO[bytes]:
        if mode not in ("r", "rb"):
            raise PermissionError(f"{path}: LocalTree is read-only (mode {mode!r})")
        return open(self._path(path), "rb")  # noqa: SIM115 - the caller closes it

    def stat(self, path: str) -> os.stat_result:
        return os.stat(self._path(path))

    def listdir(self, path: str = ".") -> list[str]:
        return sorted(os.listdir(self._path(path)))


@dataclass(frozen=True)
class LatestPointer:
    """What LATEST.json says: the published version and its manifest's sha256 and size."""

    version: str
    manifest_sha256: str
    manifest_bytes: int
    serial: int | None = None
    published_at: str | None = None
    notes: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        obj = {
            "format": LATEST_FORMAT,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "manifest_bytes": self.manifest_bytes,
            "serial": self.serial,
            "published_at": self.published_at,
            **({"notes": self.notes} if self.notes else {}),
        }
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


@dataclass
class SyncResult:
    """What ``sync_bundle`` did. ``status``: "updated", "up_to_date" or "skipped"."""

    status: str
    version: str | None  # the current version after the call
    previous: str | None = None  # the version ``rollback`` would go back to
    latest: str | None = None  # the version the server names
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    smoke_answer: str | None = None
    removed: list[str] = field(default_factory=list)  # older versions garbage-collected
    message: str = ""

    @property
    def updated(self) -> bool:
        return self.status == "updated"


# ---------------------------------------------------------------- versions and LATEST.json


def version_serial(version: str | None) -> int | None:
    """The publication serial in a version name ``edge-<serial>-<time>-<sha>``; None for other names."""
    m = VERSION_RE.match(version or "")
    return int(m.group(1)) if m else None


def check_version_name(version: Any, what: str = "version") -> str:
    """A version must be a plain directory name (it becomes ``versions/<version>``)."""
    if not isinstance(version, str) or not _SAFE_NAME.match(version) or version.startswith("."):
        raise SyncError(f"{what} {version!r} is not a plain name ([A-Za-z0-9._-], ≤128)", LATEST_NAME)
    return version


def parse_latest(data: bytes) -> LatestPointer:
    """Read LATEST.json; raises ``SyncError`` naming LATEST.json when it is not a valid pointer."""
    if len(data) > MAX_LATEST_BYTES:
        raise SyncError(
            f"{LATEST_NAME}: {len(data)} bytes, more than the {MAX_LATEST_BYTES} allowed", LATEST_NAME
        )
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SyncError(f"{LATEST_NAME} is not valid JSON: {err}", LATEST_NAME) from err
    if not isinstance(obj, dict) or obj.get("format") != LATEST_FORMAT:
        raise SyncError(f"{LATEST_NAME}: not an ELMA pointer (format must be {LATEST_FORMAT!r})", LATEST_NAME)
    version = check_version_name(obj.get("version"))
    sha = obj.get("manifest_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise SyncError(f"{LATEST_NAME}: manifest_sha256 must be 64 lower-case hex digits", LATEST_NAME)
    size = obj.get("manifest_bytes")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_MANIFEST_BYTES:
        raise SyncError(
            f"{LATEST_NAME}: manifest_bytes must be an integer in 1..{MAX_MANIFEST_BYTES}", LATEST_NAME
        )
    serial = obj.get("serial")
    if serial is not None and (isinstance(serial, bool) or not isinstance(serial, int) or serial < 0):
        raise SyncError(f"{LATEST_NAME}: serial must be a non-negative integer", LATEST_NAME)
    notes = obj.get("notes") if isinstance(obj.get("notes"), dict) else {}
    return LatestPointer(version, sha, size, serial, obj.get("published_at"), notes)


# ---------------------------------------------------------------- the local layout


def current_version(local_root: str | os.PathLike) -> str | None:
    """The version ``current`` points at, or None before the first installation."""
    return _link_version(Path(local_root), CURRENT_LINK)


def previous_version(local_root: str | os.PathLike) -> str | None:
    return _link_version(Path(local_root), PREVIOUS_LINK)


def current_bundle(local_root: str | os.PathLike) -> Path | None:
    """The resolved directory of the current bundle (load this, not the link), or None."""
    version = current_version(local_root)
    return (Path(local_root) / VERSIONS_DIR / version).resolve() if version else None


def installed_versions(local_root: str | os.PathLike) -> list[str]:
    """Installed versions, oldest first (by serial, then installation time)."""
    root = Path(local_root) / VERSIONS_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    dirs.sort(
        key=lambda p: (
            version_serial(p.name) if version_serial(p.name) is not None else -1,
            p.stat().st_mtime,
        )
    )
    return [p.name for p in dirs]


def rolled_back_versions(local_root: str | os.PathLike) -> list[str]:
    """Versions the device rolled back from; ``sync_bundle`` does not reinstall them unless forced."""
    path = Path(local_root) / ROLLED_BACK
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SyncError(f"{path}: cannot read it: {err}", ROLLED_BACK) from err
    return [v for v in data if isinstance(v, str)] if isinstance(data, list) else []


def _link_version(root: Path, name: str) -> str | None:
    link = root / name
    if not link.is_symlink():
        if link.exists():
            raise SyncError(f"{link} exists but is not a symlink; move it away", name)
        return None
    target = Path(os.readlink(link))
    if target.is_absolute() or target.parent != Path(VERSIONS_DIR):
        raise SyncError(f"{link} -> {target}: expected {VERSIONS_DIR}/<version>", name)
    return target.name


def _set_link(root: Path, name: str, version: str) -> None:
    """Point ``root/name`` at ``versions/<version>``: a new symlink, then os.replace (atomic)."""
    tmp = root / f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(f"{VERSIONS_DIR}/{version}", tmp)
    try:
        os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(root)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One sync or rollback at a time per ``local_root`` (an flock, released if the process dies)."""
    with exclusive_lock(root / LOCK_NAME):
        yield


# ---------------------------------------------------------------- fetching


def _remote_error(what: str, err: BaseException) -> SyncError:
    return SyncError(f"{what} failed: {type(err).__name__}: {err}")


def _read_small(tree: RemoteTree, path: str, limit: int, name: str) -> bytes:
    try:
        with tree.open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError as err:
        raise SyncError(f"{name}: not found on the server ({path})", name) from err
    except Exception as err:  # noqa: BLE001 - any transport error becomes a SyncError
        raise SyncError(f"{name}: reading {path} failed: {type(err).__name__}: {err}", name) from err
    if len(data) > limit:
        raise SyncError(f"{name}: more than {limit} bytes on the server", name)
    return data


def _remote_files(tree: RemoteTree, top: str) -> dict[str, int]:
    """Every regular file below ``top`` (relative POSIX path -> size), through listdir + stat."""
    out: dict[str, int] = {}
    todo = [""]
    while todo:
        rel_dir = todo.pop()
        for name in tree.listdir(posixpath.join(top, rel_dir) if rel_dir else top):
            rel = posixpath.join(rel_dir, name) if rel_dir else name
            st = tree.stat(posixpath.join(top, rel))
            if stat.S_ISDIR(st.st_mode):
                todo.append(rel)
            else:
                out[rel] = int(st.st_size)
            if len(out) + len(todo) > MAX_REMOTE_ENTRIES:
                raise SyncError(f"{top}: more than {MAX_REMOTE_ENTRIES} entries; not a bundle")
    return out


def _check_rel(rel: Any) -> str:
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
        raise SyncError(f"{MANIFEST_NAME}: file entry {rel!r} is not a plain relative path", MANIFEST_NAME)
    if rel == MANIFEST_NAME:
        raise SyncError(f"{MANIFEST_NAME}: lists itself", MANIFEST_NAME)
    return rel


def _parse_manifest(data: bytes, pointer: LatestPointer) -> dict[str, dict]:
    """Check the downloaded manifest against LATEST.json; returns its file table."""
    sha = hashlib.sha256(data).hexdigest()
    if len(data) != pointer.manifest_bytes or sha != pointer.manifest_sha256:
        raise SyncError(
            f"{MANIFEST_NAME}: {len(data)} bytes with sha256 {sha[:12]}…, but {LATEST_NAME} says "
            f"{pointer.manifest_bytes} bytes with sha256 {pointer.manifest_sha256[:12]}… "
            "(altered or replaced)",
            MANIFEST_NAME,
        )
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SyncError(f"{MANIFEST_NAME} is not valid JSON: {err}", MANIFEST_NAME) from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise SyncError(f"{MANIFEST_NAME}: no 'files' table", MANIFEST_NAME)
    if manifest.get("model_version") != pointer.version:
        raise SyncError(
            f"{MANIFEST_NAME}: model_version {manifest.get('model_version')!r} is not the published "
            f"version {pointer.version!r}",
            MANIFEST_NAME,
        )
    files = {}
    for rel, entry in manifest["files"].items():
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str):
            raise SyncError(f"{MANIFEST_NAME}: entry for {rel!r} needs integer 'bytes' and a 'sha256'", rel)
        files[_check_rel(rel)] = {"bytes": size, "sha256": digest}
    return files


def _download(
    tree: RemoteTree,
    remote: str,
    local: Path,
    rel: str,
    size: int,
    digest: str,
    on_bytes: Callable[[int], None],
) -> None:
    """Copy one file, hashing as it comes; refuses it as soon as it is longer than the manifest says."""
    local.parent.mkdir(parents=True, exist_ok=True)
    h, got = hashlib.sha256(), 0
    try:
        with tree.open(remote, "rb") as src, open(local, "wb") as out:
            if hasattr(src, "prefetch") and size > 0:
                src.prefetch(size)  # paramiko: pipelined reads; the size is known, so no extra stat
            while True:
                block = src.read(min(CHUNK, size - got + 1))
                if not block:
                    break
                got += len(block)
                if got > size:
                    raise SyncError(
                        f"{rel}: longer on the server than the {size} bytes in {MANIFEST_NAME}", rel
                    )
                h.update(block)
                out.write(block)
                on_bytes(len(block))
            out.flush()
            os.fsync(out.fileno())
    except SyncError:
        raise
    except FileNotFoundError as err:
        raise SyncError(f"{rel}: missing on the server", rel) from err
    except Exception as err:  # noqa: BLE001 - network or server errors mid-transfer
        raise SyncError(
            f"{rel}: transfer failed after {got} of {size} bytes: {type(err).__name__}: {err}", rel
        ) from err
    if got != size:
        raise SyncError(f"{rel}: {got} bytes received but {size} in {MANIFEST_NAME} (truncated)", rel)
    if h.hexdigest() != digest:
        raise SyncError(f"{rel}: sha256 does not match {MANIFEST_NAME} (file altered or corrupt)", rel)


def _fetch(
    tree: RemoteTree,
    remote_root: str,
    pointer: LatestPointer,
    into: Path,
    max_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Download the bundle LATEST.json names into ``into``; returns (files, bytes)."""
    remote_dir = posixpath.join(remote_root, pointer.version)
    manifest_data = _read_small(
        tree, posixpath.join(remote_dir, MANIFEST_NAME), MAX_MANIFEST_BYTES, MANIFEST_NAME
    )
    files = _parse_manifest(manifest_data, pointer)
    try:
        listed = _remote_files(tree, remote_dir)
    except SyncError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _remote_error(f"listing {remote_dir} on the server", err) from err
    for rel, entry in sorted(files.items()):
        if rel not in listed:
            raise SyncError(f"{rel}: listed in {MANIFEST_NAME} but missing on the server", rel)
        if listed[rel] != entry["bytes"]:
            raise SyncError(
                f"{rel}: {listed[rel]} bytes on the server but {entry['bytes']} in {MANIFEST_NAME} "
                "(truncated or replaced)",
                rel,
            )
    extra = sorted(set(listed) - set(files) - {MANIFEST_NAME})
    if extra:
        raise SyncError(
            f"{extra[0]}: on the server but not listed in {MANIFEST_NAME} (refusing extra files)", extra[0]
        )
    total = sum(e["bytes"] for e in files.values())
    if total > max_bytes:
        raise SyncError(f"the bundle is {total} bytes, more than the {max_bytes} allowed")
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for rel, entry in sorted(files.items()):
        _download(
            tree, posixpath.join(remote_dir, rel), into / rel, rel, entry["bytes"], entry["sha256"], on_bytes
        )
    (into / MANIFEST_NAME).write_bytes(manifest_data)
    return len(files) + 1, total + len(manifest_data)


def _check_installable(bundle: Path, smoke: tuple[str, str] | None) -> str | None:
    """Verify, load and (optionally) ask the smoke question; returns the smoke answer."""
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.export.bundle import BundleError, verify_bundle

    try:
        verify_bundle(bundle)
    except BundleError as err:
        raise SyncError(f"the downloaded bundle does not verify: {err}") from err
    try:
        model = EdgeModel.load(bundle)
    except Exception as err:  # noqa: BLE001 - an interpreter that cannot open a part, a bad spec …
        raise SyncError(f"the downloaded bundle does not load: {type(err).__name__}: {err}") from err
    if smoke is None:
        return None
    try:
        answer = model.answer(*smoke)
    except Exception as err:  # noqa: BLE001
        raise SyncError(
            f"the downloaded bundle fails the smoke question: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(answer.text, str) or not 1 <= answer.exit_layer <= model.num_layers:
        raise SyncError(f"the downloaded bundle's smoke answer is malformed: {answer!r}")
    return answer.text


def _installed_ok(bundle: Path, pointer: LatestPointer) -> bool:
    """An already-installed copy of the version, intact and with the published manifest."""
    from elma_utils.export.bundle import BundleError, sha256_file, verify_bundle

    try:
        verify_bundle(bundle)
        return sha256_file(bundle / MANIFEST_NAME) == pointer.manifest_sha256
    except (BundleError, OSError):
        return False


def _garbage_collect(root: Path, keep: int) -> list[str]:
    """Remove the oldest versions beyond ``keep``; never ``current`` or ``previous``."""
    protected = {current_version(root), previous_version(root)}
    versions = installed_versions(root)
    removable = [v for v in versions if v not in protected]
    excess = len(versions) - keep
    removed = removable[: max(0, excess)]
    for v in removed:
        shutil.rmtree(root / VERSIONS_DIR / v)
    return removed


def _is_newer(version: str, installed: str | None) -> bool:
    """By publication serial; a hand-installed version without one is older than any published."""
    new, old = version_serial(version), version_serial(installed)
    return installed is None or old is None or (new is not None and new > old)


def _clean_incoming(root: Path) -> None:
    for stale in root.glob(f"{INCOMING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def sync_bundle(
    sftp: RemoteTree,
    remote_root: str,
    local_root: str | os.PathLike,
    *,
    keep: int = 2,
    smoke: tuple[str, str] | None = DEFAULT_SMOKE,
    force: bool = False,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    timeout: float | None = 60.0,
    progress: Callable[[int, int], None] | None = None,
) -> SyncResult:
    """Install the version ``remote_root/LATEST.json`` names when it is newer; see the module note.

    ``keep``: installed versions kept (≥ 2: the current one and one to roll back to).
    ``smoke``: (question, context) the new bundle must answer before it is switched to; None
    skips it. ``force``: install the named version even when it is not newer or was rolled
    back from. ``timeout``: seconds a stalled SFTP read may block (paramiko channels only).
    ``progress(done_bytes, total_bytes)`` is called as data arrives. Raises ``SyncError``.
    """
    if keep < 2:
        raise ValueError("keep must be ≥ 2: the current version and one to roll back to")
    root = Path(local_root)
    t0 = time.perf_counter()
    if timeout is not None and hasattr(sftp, "get_channel"):
        sftp.get_channel().settimeout(timeout)
    with _locked(root):
        _clean_incoming(root)
        pointer = parse_latest(
            _read_small(sftp, posixpath.join(remote_root, LATEST_NAME), MAX_LATEST_BYTES, LATEST_NAME)
        )
        installed = current_version(root)
        result = SyncResult("up_to_date", installed, previous_version(root), pointer.version)
        if pointer.version == installed and not force:
            result.message = f"{installed} is the published version"
            return result
        if pointer.version in rolled_back_versions(root) and not force:
            result.status = "skipped"
            result.message = (
                f"{pointer.version} was rolled back on this device; sync with force=True to reinstall it"
            )
            return result
        if not force and not _is_newer(pointer.version, installed):
            result.message = f"the server's {pointer.version} is not newer than the installed {installed}"
            return result
        target = root / VERSIONS_DIR / pointer.version
        (root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        if target.exists() and not _installed_ok(target, pointer):
            shutil.rmtree(target)  # a damaged or different copy of this version: fetch it again
        if not target.exists():
            incoming = Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=root))
            try:
                result.files, result.bytes = _fetch(sftp, remote_root, pointer, incoming, max_bytes, progress)
                result.smoke_answer = _check_installable(incoming, smoke)
                fsync_dir(incoming)
                os.rename(incoming, target)
                fsync_dir(target.parent)
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
        else:
            result.smoke_answer = _check_installable(target, smoke)
        if installed is not None and installed != pointer.version:
            _set_link(root, PREVIOUS_LINK, installed)
        _set_link(root, CURRENT_LINK, pointer.version)
        if force and pointer.version in rolled_back_versions(root):
            write_json_atomic(
                root / ROLLED_BACK, [v for v in rolled_back_versions(root) if v != pointer.version]
            )
        result.removed = _garbage_collect(root, keep)
        result.status, result.version, result.previous = "updated", pointer.version, previous_version(root)
        result.seconds = time.perf_counter() - t0
        result.message = f"installed {pointer.version} ({result.bytes} bytes in {result.seconds:.2f} s)"
        return result


def rollback(local_root: str | os.PathLike) -> str:
    """Switch ``current`` back to ``previous``; returns the version now current.

    The version rolled back from is remembered (``rolled_back.json``) so the next sync does
    not reinstall it, and kept on disk until garbage-collected. There is no ``previous``
    afterwards: rolling back twice needs another installation in between.
    """
    root = Path(local_root)
    with _locked(root):
        current, previous = current_version(root), previous_version(root)
        if previous is None:
            raise SyncError(f"{root}: no previous version to roll back to", PREVIOUS_LINK)
        if not (root / VERSIONS_DIR / previous).is_dir():
            raise SyncError(f"{root}: the previous version {previous} is no longer installed", PREVIOUS_LINK)
        _set_link(root, CURRENT_LINK, previous)
        (root / PREVIOUS_LINK).unlink()
        fsync_dir(root)
        if current is not None:
            write_json_atomic(root / ROLLED_BACK, sorted(set(rolled_back_versions(root)) | {current}))
        return previous


def sync_with_client(client, remote_root: str, local_root: str | os.PathLike, **kwargs: Any) -> SyncResult:
    """``sync_bundle`` over an ``SSHTunnelClient``'s SFTP session (same connection as offloading)."""
    sftp = client.sftp()
    try:
        return sync_bundle(sftp, remote_root, local_root, **kwargs)
    finally:
        _close_quietly(sftp)


def _close_quietly(sftp: Any) -> None:
    """Close an SFTP session whose connection may already be gone.

    After a dropped connection paramiko's ``close`` can raise too; letting that escape from
    a ``finally`` would hide the SyncError that says what really went wrong.
    """
    try:
        sftp.close()
    except Exception as err:  # noqa: BLE001 - the session is being discarded either way
        log.debug("closing the SFTP session failed: %s: %s", type(err).__name__, err)
