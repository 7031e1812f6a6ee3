"""Check what a user gave before any model loads: cheap, TensorFlow-free, one line per problem.

    question = check_question(args.question)                       # stripped text
    check_audio_file("question.wav")                               # header only (soundfile.info)
    manifest = check_bundle_dir("edge/current")                    # verify_bundle: sizes, sha256
    key = check_private_key("edge_ed25519")                        # unencrypted OpenSSH ed25519
    pin = check_known_hosts("known_hosts", "server.lan", 2222)     # parses, pins host:port

Each check raises :class:`InputError` (a ``ValueError``) whose message is ONE line that
names the input, the problem and the fix, so ``elma ask`` (and ``elma device``) can print
it as it is and exit 2 within a fraction of a second, instead of after TensorFlow, Whisper
or the edge model have loaded, or at the first offload. ``label`` is how the input is named
in the message: the command-line option by default (``--known-hosts``), a config key for
``elma device``. Nothing here imports TensorFlow, Keras or a speech model; soundfile and
paramiko only read headers and key files.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elma_utils.edge.protocol import MAX_QUESTION_CHARS, is_identifier
from elma_utils.edge.ssh_keys import (
    KEY_TYPE,
    KeyFileError,
    keyscan_command,
    known_hosts_name,
    load_private_key,
)

# audio files far longer than one question are refused from their header (as load_audio does)
MAX_AUDIO_FILE_SECONDS = 4 * 30.0 + 60
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SQLITE_HEADER = b"SQLite format 3\x00"
_KNOWN_HOSTS_EXAMPLE = "{name} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA..."


class InputError(ValueError):
    """An input that cannot work; the message is one line naming it, the problem and the fix."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _where(label: str, path: Path) -> str:
    return f"{label} {path}" if label else str(path)


def _read_head(path: Path, where: str, n: int = 64) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(n)
    except OSError as err:
        raise InputError(f"{where} cannot be read ({err.strerror or err}); check its permissions") from err


def _regular_file(path: str | os.PathLike, label: str, missing_fix: str, what: str = "file") -> Path:
    path = Path(path)
    where = _where(label, path)
    if not path.exists():
        raise InputError(f"{where}: no such {what}; {missing_fix}")
    if not path.is_file():
        raise InputError(f"{where} is not a regular file; give the path of the {what}")
    return path


def _blob_type(blob: bytes) -> str | None:
    """The key type written at the start of an SSH public-key blob."""
    if len(blob) < 4:
        return None
    (n,) = struct.unpack(">I", blob[:4])
    try:
        return blob[4 : 4 + n].decode("ascii") if 0 < n <= 64 and len(blob) >= 4 + n else None
    except UnicodeDecodeError:
        return None


def _is_public_key(key_type: str, data: str) -> bool:
    """Whether ``key_type data`` is a public key (``ssh-ed25519 AAAA...``: a .pub line)."""
    try:
        return _blob_type(base64.b64decode(data, validate=True)) == key_type
    except ValueError:
        return False


# ---------------------------------------------------------------- the question


def check_question(text: object, *, label: str = "--question", max_chars: int = MAX_QUESTION_CHARS) -> str:
    """The question, stripped: valid Unicode text with a word in it, at most `max_chars` long
    (the offload protocol's limit, so a question the edge cannot settle can be sent on)."""
    if not isinstance(text, str):
        raise InputError(f"{label} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # argv bytes that were not UTF-8 (surrogateescape)
        raise InputError(
            f"{label} is not valid UTF-8 text (undecodable byte at character {err.start}); "
            "set a UTF-8 locale (e.g. LANG=C.UTF-8) or retype the question"
        ) from None
    question = text.strip()
    if not question:
        raise InputError(f'{label} is empty; type the question, e.g. {label} "Who founded the city?"')
    if len(question) > max_chars:
        raise InputError(
            f"{label} is {len(question):,} characters long; the limit is {max_chars:,}: ask one short question"
        )
    for i, ch in enumerate(question):
        if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r":
            raise InputError(
                f"{label} holds the control character U+{ord(ch):04X} at character {i}; type the question as plain text"
            )
    if not any(ch.isalnum() for ch in question):
        raise InputError(
            f'{label} {question!r} holds no words; type the question, e.g. "Who founded the city?"'
        )
    return question


# ---------------------------------------------------------------- audio


@dataclass(frozen=True)
class AudioFileInfo:
    """What the header of an audio file says (nothing is decoded)."""

    format: str
    samplerate: int
    channels: int
    seconds: float


def check_audio_file(path: str | os.PathLike, *, label: str = "--audio") -> AudioFileInfo:
    """An existing, readable, non-empty file whose header soundfile (libsndfile) understands,
    with samples in it and not far longer than one question; nothing is decoded."""
    import soundfile as sf

    path = _regular_file(path, label, "check the path", "audio file")
    where = _where(label, path)
    if not _read_head(path, where, 1):
        raise InputError(f"{where} is empty (0 bytes); record the question again")
    convert = (
        f"use a WAV, FLAC, OGG or MP3 recording, e.g. `ffmpeg -i {path.name} -ac 1 -ar 16000 question.wav`"
    )
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError, TypeError) as err:
        reason = _one_line(err).rstrip(".") or type(err).__name__
        raise InputError(f"{where} is not a readable audio file ({reason}); {convert}") from err
    if info.samplerate <= 0 or info.frames <= 0:
        raise InputError(f"{where} holds no audio samples ({info.format}); record the question again")
    if info.duration > MAX_AUDIO_FILE_SECONDS:
        raise InputError(
            f"{where} is {info.duration:.0f} s long; ask one short question per recording "
            "(at most 30 s of speech), or cut the file"
        )
    return AudioFileInfo(str(info.format), int(info.samplerate), int(info.channels), float(info.duration))


def check_lm(spec: str | None, *, label: str = "--lm") -> str | None:
    """A question-LM choice for Whisper: "auto", "none", a saved LM (.json.gz) or a SQuAD file."""
    if spec is None or spec.strip().lower() in ("auto", "none"):
        return spec
    path = _regular_file(
        spec, label, "give 'auto', 'none', a saved LM (.json.gz) or a SQuAD json file", "file"
    )
    where = _where(label, path)
    head = _read_head(path, where, 2)
    if not head:
        raise InputError(f"{where} is empty; give 'auto', 'none', a saved LM (.json.gz) or a SQuAD json file")
    if path.name.endswith(".gz") and head != b"\x1f\x8b":
        raise InputError(
            f"{where} is not gzip-compressed: not a saved question LM; use --lm none or rebuild it"
        )
    return spec


# ---------------------------------------------------------------- models


def check_bundle_dir(path: str | os.PathLike, *, label: str = "--bundle") -> dict[str, Any]:
    """An edge bundle: its manifest, every listed file (size and sha256) and thresholds.json,
    checked with :func:`~elma_utils.export.bundle.verify_bundle`, which opens no model part.
    Returns the manifest (so the caller need not hash the files a second time)."""
    from elma_utils.edge.sync import CURRENT_LINK, VERSIONS_DIR
    from elma_utils.export.bundle import MANIFEST, BundleError, read_thresholds, verify_bundle

    path = Path(path)
    where = _where(label, path)
    if not path.exists():
        raise InputError(
            f"{where}: no such directory; give an edge bundle directory (fetch one with `elma sync`)"
        )
    if not path.is_dir():
        raise InputError(
            f"{where} is not a directory; give the edge bundle's directory (it holds {MANIFEST})"
        )
    if not (path / MANIFEST).is_file():
        if (path / "config.json").is_file():
            raise InputError(f"{where} is a full-model artifact, not an edge bundle; use --model {path}")
        if (path / VERSIONS_DIR).is_dir():
            raise InputError(
                f"{where} is an `elma sync` root, not a bundle; use {label} {path / CURRENT_LINK}"
            )
        raise InputError(f"{where} holds no {MANIFEST}: not an ELMA edge bundle (or an incomplete copy)")
    try:
        manifest = verify_bundle(path)
        read_thresholds(path)
    except BundleError as err:
        raise InputError(f"{where}: {_one_line(err)}") from err
    return manifest


def check_model_dir(path: str | os.PathLike, *, label: str = "--model") -> dict[str, Any]:
    """A full-model artifact (``artifacts/<name>``): config.json with a backbone and the window
    settings, an HDF5 weights file and the tokenizer assets. Returns config.json (nothing is
    built or loaded: that needs Keras)."""
    path = Path(path)
    where = _where(label, path)
    if not path.exists():
        raise InputError(f"{where}: no such directory; train a model with `elma train` (artifacts/<name>)")
    if not path.is_dir():
        raise InputError(
            f"{where} is not a directory; give the model artifact's directory (artifacts/<name>)"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        if (path / "manifest.json").is_file():
            raise InputError(f"{where} is an edge bundle, not a full-model artifact; use --bundle {path}")
        raise InputError(
            f"{where} is not an ELMA model artifact: config.json is missing (an unfinished `elma train`?)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"{where}: config.json cannot be read ({_one_line(err)}); train the model again"
        ) from err
    backbone = config.get("backbone") if isinstance(config, dict) else None
    if (
        not isinstance(backbone, dict)
        or not isinstance(backbone.get("kind"), str)
        or "kwargs" not in backbone
    ):
        raise InputError(f"{where}: config.json names no backbone (kind, kwargs); not an ELMA model artifact")
    windows = [
        k for k in ("max_seq_len", "doc_stride", "max_query_len") if not isinstance(config.get(k), int)
    ]
    if windows:
        raise InputError(f"{where}: config.json lacks the window setting(s) {', '.join(windows)}")
    weights = path / "model.weights.h5"
    if not weights.is_file():
        raise InputError(
            f"{where}: model.weights.h5 is missing; training did not finish (resume it with `elma train`)"
        )
    head = _read_head(weights, f"{where}: model.weights.h5", 8)
    if head != HDF5_SIGNATURE:
        raise InputError(f"{where}: model.weights.h5 is not an HDF5 file (empty, truncated or replaced)")
    tokenizer = path / "tokenizer" / "tokenizer.json"
    try:
        vocab = json.loads(tokenizer.read_text(encoding="utf-8"))["vocab"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{where}: tokenizer/tokenizer.json is missing or unreadable ({_one_line(err)})"
        ) from err
    if not (path / "tokenizer" / str(vocab)).is_file():
        raise InputError(f"{where}: the tokenizer's vocabulary tokenizer/{vocab} is missing")
    return config


# ---------------------------------------------------------------- offloading


def check_port(value: object, *, label: str) -> int:
    """A TCP port number, 1-65535."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InputError(f"{label} {value!r} is not a TCP port (1-65535)")
    return value


def check_host(host: object, *, label: str = "--ssh-host") -> str:
    """A host name or IP address (no user@, no :port, no spaces)."""
    if not isinstance(host, str) or not host.strip():
        raise InputError(f"{label} is empty; give the server's host name or IP address")
    host = host.strip()
    if any(ch.isspace() for ch in host):
        raise InputError(f"{label} {host!r} holds a space; give one host name or IP address")
    if "@" in host:
        raise InputError(f"{label} {host!r} holds a user name; give the user with --user and the host alone")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            raise InputError(
                f"{label} {host!r} holds a port; give the port with --ssh-port and the host alone"
            ) from None
        return host.strip("[]")
    return host


def check_user(user: object, *, label: str = "--user") -> str:
    if not isinstance(user, str) or not user or any(ch.isspace() or ch in "@:/" for ch in user):
        raise InputError(f"{label} {user!r} is not a user name")
    return user


def check_device_id(device_id: object, *, label: str = "--device-id") -> str:
    """What the protocol accepts as a device id (1-64 of A-Z a-z 0-9 . _ : -)."""
    if not is_identifier(device_id):
        raise InputError(
            f"{label} {device_id!r} is not a device id: use 1-64 characters of A-Z a-z 0-9 . _ : -"
        )
    return str(device_id)


def check_outbox_path(path: str | os.PathLike, *, label: str = "--outbox") -> Path:
    """A path for the outbox's SQLite file: new, or an existing SQLite database."""
    path = Path(path)
    where = _where(label, path)
    if path.is_dir():
        raise InputError(f"{where} is a directory; give a file path, e.g. {path / 'outbox.sqlite3'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{where}: {parent} is not a directory")
            break
    if path.exists():
        head = _read_head(path, where, len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:
            raise InputError(
                f"{where} exists and is not an SQLite database (the outbox); give a new file path"
            )
    return path


def check_private_key(path: str | os.PathLike, *, label: str = "--key"):
    """The device's key: an unencrypted OpenSSH ed25519 private key (returns the paramiko key)."""
    path = Path(path)
    make = f"ssh-keygen -t ed25519 -N '' -f {path}"
    path = _regular_file(path, label, f"make the device's key with `{make}` and register {path}.pub on the server "
                         "(`elma keys add`)", "private key file")  # fmt: skip
    where = _where(label, path)
    text = _read_head(path, where, 4096).decode("utf-8", "replace").strip()
    if not text:
        raise InputError(f"{where} is empty; make the device's key with `{make}`")
    words = text.split()
    if len(words) >= 2 and _is_public_key(words[0], words[1]):
        private = path.with_suffix("") if path.suffix == ".pub" else "the file without .pub"
        raise InputError(f"{where} is a public key; {label} wants the private key ({private})")
    if len(words) >= 3 and _is_public_key(words[1], words[2]):  # "host ssh-ed25519 AAAA..."
        raise InputError(
            f"{where} is a known_hosts or authorized_keys file; {label} wants the device's private key"
        )
    if "-----BEGIN OPENSSH PRIVATE KEY-----" not in text:
        kind = "a PEM private key" if "PRIVATE KEY-----" in text else "not an OpenSSH private key"
        fresh = path.with_name("elma_ed25519")
        raise InputError(
            f"{where} is {kind}; ELMA uses OpenSSH ed25519 keys: `ssh-keygen -t ed25519 -N '' -f {fresh}`"
        )
    try:
        return load_private_key(path)
    except KeyFileError as err:
        if "passphrase" in str(err):
            raise InputError(
                f"{where} is passphrase-protected; ELMA runs unattended: remove it with `ssh-keygen -p -N '' -f {path}`"
            ) from err
        raise InputError(f"{where}: {_one_line(err)}; ELMA needs an ed25519 key: `{make}`") from err


def check_known_hosts(path: str | os.PathLike, host: str, port: int, *, label: str = "--known-hosts"):
    """A known_hosts file that paramiko can read and that pins an ed25519 key for host:port
    (plain or hashed names). Returns the pinned key.

    A ``.pub`` file, an empty file, a private key, @cert-authority/@revoked lines or a line
    paramiko would choke on (it raises on a non-base64 key field) is refused with the line at
    fault, what a known_hosts line looks like and the ``ssh-keyscan`` command that pins the
    server's key.
    """
    import paramiko

    path = Path(path)
    name = known_hosts_name(host, port)
    example = _KNOWN_HOSTS_EXAMPLE.format(name=name)
    scan = keyscan_command(host, port, path)
    path = _regular_file(
        path, label, f"pin the server's host key with `{scan}` (check its fingerprint)", "file"
    )
    where = _where(label, path)
    looks = f"a known_hosts line is `{example}`"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not a text file; {looks}; pin the server's key with `{scan}`") from err
    except OSError as err:
        raise InputError(f"{where} cannot be read ({err.strerror or err}); check its permissions") from err
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise InputError(f"{where} holds no host keys; {looks}; pin the server's key with `{scan}`")
    for n, line in lines:
        at = f"{where} line {n}"
        fields = re.split(" |\t", line)  # as paramiko splits: one space or tab between fields
        fixed = path.with_name("known_hosts")  # where to pin instead, when this is another kind of file
        if line.startswith("-----BEGIN"):
            raise InputError(
                f"{where} is a private key, not a known_hosts file; {looks}; pin the server's key with "
                f"`{keyscan_command(host, port, fixed)}` and use {label} {fixed}"
            )
        if len(fields) >= 2 and _is_public_key(fields[0], fields[1]):
            raise InputError(
                f"{where} is a public key (.pub), not a known_hosts file: {looks} (the server's name first). "
                f'If it is the server\'s host key: `echo "{name} $(cat {path})" >> {fixed}`, else pin the '
                f"server's key with `{keyscan_command(host, port, fixed)}`; then use {label} {fixed}"
            )
        if fields[0].startswith("@"):
            raise InputError(
                f"{at}: {fields[0]} lines are not supported by ELMA's SSH client; remove the line, {looks}"
            )
        if len(fields) < 3 or "" in fields[:3]:
            raise InputError(
                f"{at} is not a known_hosts line (fields separated by one space); {looks}; pin with `{scan}`"
            )
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except ValueError:
            raise InputError(
                f"{at}: the key field is not base64; {looks}; pin the server's key with `{scan}`"
            ) from None
        if _blob_type(blob) != fields[1]:
            raise InputError(
                f"{at}: the key is not a {fields[1]} key (corrupt line); {looks}; pin with `{scan}`"
            )
    hosts = paramiko.HostKeys()
    try:
        hosts.load(str(path))
    except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as err:
        raise InputError(
            f"{where} cannot be read as known_hosts ({_one_line(err)}); pin with `{scan}`"
        ) from err
    pinned = hosts.lookup(name)
    if not pinned:
        raise InputError(
            f"{where} pins no host key for {name} (port {port}); pin the server's key with `{scan}` "
            "(check its fingerprint)"
        )
    if KEY_TYPE not in pinned:
        raise InputError(
            f"{where} pins only {', '.join(sorted(pinned))} for {name}; ELMA servers use ed25519: `{scan}`"
        )
    return pinned[KEY_TYPE]


def check_directory(path: str | os.PathLike, *, label: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise InputError(f"{_where(label, path)}: {what}")
    return path
