"""`elma keys`: add, list and revoke devices in the server's ``authorized_keys``.

One file says which devices exist: each line is a device's ed25519 public key with the
device id as its comment, and — for an administrator's own sshd — the options that limit
the key to forwarding to the model service and reading the bundles. ELMA's endpoint, the
model service's signature check (``device_identity``) and sshd all read this same file, so
adding or revoking a device is one edit, written atomically (a reader never sees half a
file) and effective at once: the endpoint closes a revoked key's connections within
seconds, and the model service refuses its next ask on any route.
"""

from __future__ import annotations

import os
from pathlib import Path

from elma_utils.atomic_files import write_bytes_atomic
from elma_utils.edge.protocol import is_identifier
from elma_utils.edge.ssh_keys import (
    KeyFileError,
    fingerprint,
    parse_authorized_line,
    parse_public_key,
    public_key_line,
)


def _read_public_key(public_key: str | os.PathLike) -> str:
    """A ``.pub`` file's path, or the ``ssh-ed25519 AAAA…`` text itself."""
    text = str(public_key)
    if not text.startswith("ssh-"):
        path = Path(public_key)
        if not path.is_file():
            raise FileNotFoundError(
                f"public key {path} not found (the device makes it with `elma device init`)"
            )
        text = path.read_text()
    return text.strip()


def add_device(
    authorized_keys: str | os.PathLike, device_id: str, public_key: str | os.PathLike, options: str = ""
) -> str:
    """Register ``device_id`` with its public key (a ``.pub`` path or line); returns the line written.

    ``options`` go in front of the key (``sshd.device_key_options`` for an sshd). A device id
    or a key that is already registered is refused: revoke the old one first.
    """
    if not is_identifier(device_id):
        raise ValueError(f"device id {device_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    key = parse_public_key(_read_public_key(public_key))
    path = Path(authorized_keys)
    lines = path.read_text().splitlines() if path.is_file() else []
    for entry in _entries(lines):
        if entry.comment == device_id:
            raise ValueError(
                f"device {device_id!r} is already registered; `elma keys revoke {device_id}` first"
            )
        if entry.key.asbytes() == key.asbytes():
            raise ValueError(f"this key is already registered as device {entry.comment!r}")
    line = f"{options} {public_key_line(key, device_id)}".strip()
    _write(path, [*lines, line])
    return line


def revoke_device(authorized_keys: str | os.PathLike, device_id: str) -> int:
    """Remove every line of ``device_id``; returns how many were removed (0: it was not there)."""
    path = Path(authorized_keys)
    if not path.is_file():
        raise FileNotFoundError(f"authorized_keys {path} not found")
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _device_of(line) != device_id]
    if len(kept) != len(lines):
        _write(path, kept)
    return len(lines) - len(kept)


def list_devices(authorized_keys: str | os.PathLike) -> list[dict]:
    """Each registered device: id, key fingerprint and the key's options."""
    path = Path(authorized_keys)
    if not path.is_file():
        return []
    return [
        {"device_id": e.comment, "fingerprint": fingerprint(e.key), "options": ",".join(e.options)}
        for e in _entries(path.read_text().splitlines())
    ]


def _entries(lines: list[str]):
    for line in lines:
        try:
            entry = parse_authorized_line(line)
        except KeyFileError:
            continue
        if entry is not None:
            yield entry


def _device_of(line: str) -> str | None:
    try:
        entry = parse_authorized_line(line)
    except KeyFileError:
        return None
    return entry.comment if entry is not None else None


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = None if path.exists() else 0o600  # keep a mode the administrator chose (sshd may need 0644)
    write_bytes_atomic(path, "".join(line + "\n" for line in lines).encode(), mode=mode)
