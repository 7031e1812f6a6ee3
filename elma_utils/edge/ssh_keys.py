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
from dataclasses import dataclass
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


# Options ELMA writes for device keys (``sshd.device_key_options``). ELMA's endpoint grants
# no more than they allow (forwarding to its one target, read-only SFTP below its root), so a
# key carrying only these may log in there too; any other option (``from=``,
# ``no-port-forwarding``, ``expiry-time=``...) would be silently widened, so such keys are skipped.
ENDPOINT_SAFE_OPTIONS = frozenset(
    {
        "restrict",
        "port-forwarding",
        "permitopen",
        "command",
        "no-pty",
        "no-agent-forwarding",
        "no-x11-forwarding",
        "no-user-rc",
    }
)


@dataclass(frozen=True)
class AuthorizedKey:
    """One ``authorized_keys`` line: its options, the key and the comment (ELMA: the device id)."""

    options: tuple[str, ...]
    key: paramiko.PKey
    comment: str

    def option_names(self) -> set[str]:
        return {opt.split("=", 1)[0].lower() for opt in self.options}

    def endpoint_may_honour(self) -> bool:
        """Whether ELMA's endpoint grants no more than this line's options allow."""
        if not self.option_names() <= ENDPOINT_SAFE_OPTIONS:
            return False
        commands = [o.split("=", 1)[1].strip('"') for o in self.options if o.lower().startswith("command=")]
        return all(c.split()[:1] == ["internal-sftp"] for c in commands)


def _split_unquoted(text: str, separators: str) -> tuple[list[str], str]:
    """Split ``text`` at unquoted ``separators`` up to the first unquoted space; rest after it."""
    parts, current, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in " \t":
            break
        elif not quoted and ch in separators:
            parts.append("".join(current))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    if quoted:
        raise KeyFileError(f"unbalanced quotes in authorized_keys options: {text[:60]!r}")
    parts.append("".join(current))
    return parts, text[i:].strip()


def parse_authorized_line(line: str) -> AuthorizedKey | None:
    """One ``authorized_keys`` line → ``AuthorizedKey``; None for blanks, comments, other key types.

    Raises ``KeyFileError`` for an ed25519 line that cannot be parsed.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    options: list[str] = []
    if not line.startswith(KEY_TYPE + " ") and " " + KEY_TYPE + " " in line:
        options, line = _split_unquoted(line, ",")
    if not line.startswith(KEY_TYPE + " "):
        return None
    parts = line.split(None, 2)
    key = parse_public_key(" ".join(parts[:2]))
    return AuthorizedKey(tuple(o for o in options if o), key, parts[2].strip() if len(parts) > 2 else "")


def read_authorized_keys(path: str | os.PathLike) -> list[AuthorizedKey]:
    """Every ed25519 line of an ``authorized_keys`` file, options and comments included.

    Unparseable lines are skipped (sshd skips them too), other key types as well.
    """
    entries = []
    for raw in Path(path).read_text().splitlines():
        try:
            entry = parse_authorized_line(raw)
        except KeyFileError:
            continue
        if entry is not None:
            entries.append(entry)
    return entries


def load_authorized_keys(path: str | os.PathLike) -> list[paramiko.PKey]:
    """The ed25519 keys that may log in to ELMA's endpoint; other key types and comments are skipped.

    Lines with OpenSSH options other than ELMA's own device restrictions (``from=…``,
    ``command=`` other than internal-sftp, ``no-port-forwarding``…) are skipped too, because
    the endpoint cannot honour them and accepting such a key without its restriction would widen it.
    """
    return [e.key for e in read_authorized_keys(path) if e.endpoint_may_honour()]


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
