"""Ed25519 keys for the offload link: make, load, pin and fingerprint them.

Both ends use OpenSSH's file formats (``ssh-keygen`` keys, ``authorized_keys``,
``known_hosts``) so that the same files work with OpenSSH's sshd and client, with paramiko,
and with ELMA's own endpoint, and so that an operator can inspect them with ``ssh-keygen -lf``.
Only ed25519 is accepted: one small, fast, unambiguous key type.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_TYPE = "ssh-ed25519"
DEFAULT_SSH_PORT = 22


class KeyFileError(ValueError):
    """A key file is missing, unreadable, encrypted or not ed25519."""


def generate_ed25519_key(path: str | os.PathLike, comment: str = "elma") -> paramiko.Ed25519Key:
    """Write a new unencrypted ed25519 key pair (``path`` 0600 and ``path.pub``), like ``ssh-keygen``.

    Refuses to overwrite an existing key: replacing a key silently would lock out its holder.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it first to make a new key")
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    key = load_private_key(path)
    Path(f"{path}.pub").write_text(public_key_line(key, comment) + "\n")
    return key


def load_private_key(path: str | os.PathLike) -> paramiko.Ed25519Key:
    """Load an unencrypted ed25519 private key in OpenSSH format, with a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(
            f"private key {path} not found (make one with: ssh-keygen -t ed25519 -N '' -f {path})"
        )
    try:
        return paramiko.Ed25519Key(filename=str(path))
    except paramiko.PasswordRequiredException as exc:
        raise KeyFileError(
            f"private key {path} is passphrase-protected; ELMA needs an unattended key"
        ) from exc
    except (paramiko.SSHException, ValueError) as exc:
        raise KeyFileError(f"{path} is not an OpenSSH ed25519 private key: {exc}") from exc


def public_key_line(key: paramiko.PKey, comment: str = "") -> str:
    """``ssh-ed25519 AAAA… comment``: the line for ``authorized_keys`` or a ``.pub`` file."""
    line = f"{key.get_name()} {key.get_base64()}"
    return f"{line} {comment}".rstrip()


def parse_public_key(text: str) -> paramiko.PKey:
    """Parse one ``ssh-ed25519 AAAA… [comment]`` line (authorized_keys options are not supported)."""
    parts = text.split()
    if len(parts) < 2 or parts[0] != KEY_TYPE:
        raise KeyFileError(f"not an {KEY_TYPE} public key line: {text[:60]!r}")
    try:
        return paramiko.Ed25519Key(data=base64.b64decode(parts[1], validate=True))
    except (ValueError, paramiko.SSHException) as exc:
        raise KeyFileError(f"malformed {KEY_TYPE} public key: {exc}") from exc


def load_public_key(path: str | os.PathLike) -> paramiko.PKey:
    """Load a ``.pub`` file."""
    return parse_public_key(Path(path).read_text())


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:…`` exactly as ``ssh-keygen -lf`` and ``ssh`` print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def write_authorized_keys(
    path: str | os.PathLike, keys: Iterable[paramiko.PKey], comment: str = "elma"
) -> Path:
    """Write an ``authorized_keys`` file holding exactly ``keys`` (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(public_key_line(k, comment) + "\n" for k in keys))
    path.chmod(0o600)
    return path


def load_authorized_keys(path: str | os.PathLike) -> list[paramiko.PKey]:
    """The ed25519 keys in an ``authorized_keys`` file; other key types and comments are skipped.

    Lines with OpenSSH options (``from=…``, ``command=…``) are skipped too, because ELMA's
    endpoint cannot honour them and accepting such a key without its restriction would widen it.
    """
    keys = []
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or not line.startswith(KEY_TYPE + " "):
            continue
        try:
            keys.append(parse_public_key(line))
        except KeyFileError:
            continue
    return keys


def known_hosts_name(host: str, port: int) -> str:
    """How ``known_hosts`` names a host: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if port == DEFAULT_SSH_PORT else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, key: paramiko.PKey) -> str:
    """One ``known_hosts`` line pinning ``key`` for ``host:port``."""
    return f"{known_hosts_name(host, port)} {public_key_line(key)}"


def add_known_host(path: str | os.PathLike, host: str, port: int, key: paramiko.PKey) -> Path:
    """Append a pin for ``host:port`` to ``known_hosts`` (the file is created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(known_hosts_line(host, port, key) + "\n")
    return path


def keyscan_command(host: str, port: int, known_hosts_path: str | os.PathLike) -> str:
    """The shell command that pins a server's ed25519 host key (check its fingerprint first)."""
    port_arg = "" if port == DEFAULT_SSH_PORT else f"-p {port} "
    return f"ssh-keyscan -t ed25519 {port_arg}{host} >> {known_hosts_path}"
