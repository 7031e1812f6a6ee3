"""`elma device` configuration: one TOML file per board, written by ``init``, checked before a run.

    cfg = load_config("device.toml")     # syntax, types, unknown keys, value ranges
    ready = check_config(cfg)            # files: key, known_hosts pin, context, bundle, input

Every problem is a :class:`DeviceConfigError` whose message is ONE line naming the file, the
key and the fix, raised before any model loads (``elma device run`` prints it and exits 2).
Relative paths in the file are relative to the file's own directory, so a board's directory
(config, key, known_hosts, bundles, outbox) can be moved as a whole.

``init_device`` writes a commented config and a NEW ed25519 key beside it (never overwriting
either) and returns what the administrator runs on the server (``elma keys add``) and how to
pin the server's host key (``ssh-keyscan``). Python 3.11 reads the file with ``tomllib``; it
is written by hand here, so no TOML writer is needed.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elma_utils.edge.input_checks import (
    InputError,
    check_bundle_dir,
    check_known_hosts,
    check_outbox_path,
    check_private_key,
)
from elma_utils.edge.protocol import is_identifier
from elma_utils.edge.ssh_keys import (
    fingerprint,
    generate_ed25519_key,
    keyscan_command,
    known_hosts_name,
    public_key_line,
)

log = logging.getLogger(__name__)

DEFAULT_SSH_PORT = 22
DEFAULT_SERVICE = "127.0.0.1:7433"  # `elma serve --ssh-port`: the address its endpoint advertises
INPUT_KINDS = ("stdin", "folder", "microphone")
ENGINES = ("whisper", "sphinx")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SERVER_MAX_CONTEXT_CHARS = 50_000  # `elma serve --max-context-chars` default: longer contexts are refused

_REQUIRED = object()
# section -> key -> (type, default); _REQUIRED: must be given; None: optional, unset
_SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "device": {"id": (str, _REQUIRED), "log_level": (str, "INFO")},
    "server": {
        "host": (str, _REQUIRED),
        "ssh_port": (int, DEFAULT_SSH_PORT),
        "user": (str, "elma"),
        "key": (str, _REQUIRED),
        "known_hosts": (str, _REQUIRED),
        "service": (str, DEFAULT_SERVICE),
        "deadline_ms": (int, 2000),
    },
    "model": {"root": (str, None), "bundle": (str, None), "num_threads": (int, 0)},
    "context": {"file": (str, _REQUIRED)},
    "input": {
        "kind": (str, "stdin"),
        "folder": (str, None),
        "poll_seconds": (float, 0.5),
        "settle_seconds": (float, 1.0),
        "microphone_index": (int, -1),
    },
    "speech": {"engine": (str, "whisper"), "model": (str, None), "lm": (str, "auto")},
    "outbox": {
        "path": (str, "outbox.sqlite3"),
        "drain_seconds": (float, 5.0),
        "retry_max_seconds": (float, 600.0),
    },
    "sync": {"interval_seconds": (float, 0.0), "remote_root": (str, ".")},
    "output": {"speak": (bool, False), "voice": (str, "en-us")},
}
_REQUIRED_SECTIONS = ("device", "server", "model", "context")


class DeviceConfigError(ValueError):
    """The config or a file it names cannot be used; the message is one line: what and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DeviceConfig:
    """A checked config file; paths are absolute (resolved against the file's directory)."""

    path: Path
    device_id: str
    log_level: str
    host: str
    ssh_port: int
    user: str
    key: Path
    known_hosts: Path
    service: tuple[str, int]
    deadline_ms: int
    model_root: Path | None
    bundle: Path | None
    num_threads: int | None
    context_file: Path
    input_kind: str
    input_folder: Path | None
    poll_seconds: float
    settle_seconds: float
    microphone_index: int | None
    engine: str
    speech_model: str | None
    lm: str
    outbox: Path
    drain_seconds: float
    retry_max_seconds: float
    sync_interval_seconds: float
    remote_root: str
    speak: bool
    voice: str

    @property
    def server_name(self) -> str:
        """``host`` or ``[host]:port`` as known_hosts names it."""
        return known_hosts_name(self.host, self.ssh_port)

    @property
    def needs_speech(self) -> bool:
        return self.input_kind in ("folder", "microphone")


@dataclass(frozen=True)
class ReadyConfig:
    """What ``check_config`` found: the context text and the bundle directory to load."""

    config: DeviceConfig
    context: str
    bundle: Path
    bundle_version: str
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------- addresses


def split_host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal → (host without brackets, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise DeviceConfigError(f"{what} {text!r}: write an IPv6 address with a port as [addr]:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:  # a bare IPv6 literal such as ::1 or fe80::1
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise DeviceConfigError(f"{what} {text!r} names no host")
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise DeviceConfigError(f"{what} {text!r}: the port must be a number in 1..65535")
        return host, int(port_text)
    return host, default_port


def _check_host(host: str, where: str) -> str:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise DeviceConfigError(f"{where}: {host!r} is not a host name or IP address")
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        except OSError as err:
            raise DeviceConfigError(f"{where}: {host!r} is not a valid IPv6 address") from err
    return host


# ---------------------------------------------------------------- loading


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = {str: "a string in quotes", int: "an integer", float: "a number", bool: "true or false"}
        raise DeviceConfigError(f"{where} must be {names[kind]}, not {type(value).__name__} {value!r}")
    return value


def _read_toml(path: Path) -> dict:
    if not path.exists():
        raise DeviceConfigError(
            f"config file {path} does not exist; make one with: elma device init --config {path}"
        )
    if not path.is_file():
        raise DeviceConfigError(f"{path} is not a file; give the device's TOML config file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DeviceConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise DeviceConfigError(f"{path}: not valid TOML: {err}") from err
    except OSError as err:
        raise DeviceConfigError(f"{path}: cannot read it: {err}") from err


def _values(path: Path, raw: dict) -> dict[str, dict[str, Any]]:
    """Every known key with its type checked and its default filled in; unknown keys refused."""
    unknown = sorted(set(raw) - set(_SCHEMA))
    if unknown:
        raise DeviceConfigError(
            f"{path}: unknown section [{unknown[0]}]; the sections are {', '.join(f'[{s}]' for s in _SCHEMA)}"
        )
    out: dict[str, dict[str, Any]] = {}
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise DeviceConfigError(f"{path}: {section} must be a section [{section}], not a value")
        if section in _REQUIRED_SECTIONS and section not in raw:
            raise DeviceConfigError(f"{path}: section [{section}] is missing (see `elma device init`)")
        extra = sorted(set(given) - set(keys))
        if extra:
            raise DeviceConfigError(
                f"{path}: unknown key {extra[0]!r} in [{section}]; known keys: {', '.join(keys)}"
            )
        values = {}
        for key, (kind, default) in keys.items():
            where = f"{path}: [{section}] {key}"
            if key in given:
                values[key] = _typed(given[key], kind, where)
            elif default is _REQUIRED:
                raise DeviceConfigError(f"{where} is missing")
            else:
                values[key] = default
        out[section] = values
    return out


def _path(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _model_spec(base: Path, value: str | None) -> str | None:
    """A Whisper model name ("tiny.en") as is; a path (with / or starting . or ~) resolved like the others."""
    if value is None or not value.strip():
        return None
    if "/" in value or value.startswith((".", "~")):
        return str(_path(base, value))
    return value


def load_config(path: str | os.PathLike) -> DeviceConfig:
    """Read and check ``path`` (syntax, types, unknown keys, value ranges); touches no other file."""
    path = Path(path).absolute()
    v = _values(path, _read_toml(path))
    base = path.parent

    def bad(section: str, key: str, why: str) -> DeviceConfigError:
        return DeviceConfigError(f"{path}: [{section}] {key} {why}")

    dev, srv, mdl, inp, sp, ob, sy, outp = (
        v["device"], v["server"], v["model"], v["input"], v["speech"], v["outbox"], v["sync"], v["output"],
    )  # fmt: skip
    if not is_identifier(dev["id"]):
        raise bad("device", "id", f"{dev['id']!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    level = dev["log_level"].upper()
    if level not in LOG_LEVELS:
        raise bad("device", "log_level", f"{dev['log_level']!r} must be one of {', '.join(LOG_LEVELS)}")
    host = _check_host(srv["host"], f"{path}: [server] host")
    if not 1 <= srv["ssh_port"] <= 65535:
        raise bad("server", "ssh_port", f"{srv['ssh_port']} must be in 1..65535")
    if not srv["user"].strip():
        raise bad("server", "user", "is empty")
    service_host, service_port = split_host_port(srv["service"], 0, f"{path}: [server] service")
    if service_port == 0:
        raise bad("server", "service", f"{srv['service']!r} needs a port, e.g. {DEFAULT_SERVICE}")
    if srv["deadline_ms"] <= 0:
        raise bad("server", "deadline_ms", "must be positive (milliseconds the device waits for the server)")
    if (mdl["root"] is None) == (mdl["bundle"] is None):
        raise DeviceConfigError(
            f"{path}: [model] give exactly one of root (bundles kept up to date by sync) or bundle (a fixed bundle directory)"
        )
    if mdl["num_threads"] < 0:
        raise bad("model", "num_threads", "must be 0 (LiteRT's choice) or more")
    kind = inp["kind"]
    if kind not in INPUT_KINDS:
        raise bad("input", "kind", f"{kind!r} must be one of {', '.join(INPUT_KINDS)}")
    if kind == "folder" and inp["folder"] is None:
        raise bad("input", "folder", 'is missing: kind = "folder" needs the folder audio questions arrive in')
    for key in ("poll_seconds", "settle_seconds"):
        if not inp[key] > 0:
            raise bad("input", key, "must be positive")
    if sp["engine"] not in ENGINES:
        raise bad("speech", "engine", f"{sp['engine']!r} must be one of {', '.join(ENGINES)}")
    if sp["model"] is not None and sp["engine"] != "whisper":
        raise bad("speech", "model", "applies to the whisper engine only (sphinx uses its bundled model)")
    for key in ("drain_seconds", "retry_max_seconds"):
        if not ob[key] > 0:
            raise bad("outbox", key, "must be positive")
    if sy["interval_seconds"] < 0:
        raise bad("sync", "interval_seconds", "must be 0 (off) or positive")
    if sy["interval_seconds"] > 0 and mdl["root"] is None:
        raise DeviceConfigError(
            f"{path}: [sync] interval_seconds > 0 needs [model] root (a fixed [model] bundle is never updated); set interval_seconds = 0 or use root"
        )
    return DeviceConfig(
        path=path,
        device_id=dev["id"],
        log_level=level,
        host=host,
        ssh_port=srv["ssh_port"],
        user=srv["user"],
        key=_path(base, srv["key"]),
        known_hosts=_path(base, srv["known_hosts"]),
        service=(service_host, service_port),
        deadline_ms=srv["deadline_ms"],
        model_root=_path(base, mdl["root"]),
        bundle=_path(base, mdl["bundle"]),
        num_threads=mdl["num_threads"] or None,
        context_file=_path(base, v["context"]["file"]),
        input_kind=kind,
        input_folder=_path(base, inp["folder"]),
        poll_seconds=inp["poll_seconds"],
        settle_seconds=inp["settle_seconds"],
        microphone_index=None if inp["microphone_index"] < 0 else inp["microphone_index"],
        engine=sp["engine"],
        speech_model=_model_spec(base, sp["model"]),
        lm=sp["lm"],
        outbox=_path(base, ob["path"]),
        drain_seconds=ob["drain_seconds"],
        retry_max_seconds=ob["retry_max_seconds"],
        sync_interval_seconds=sy["interval_seconds"],
        remote_root=sy["remote_root"],
        speak=outp["speak"],
        voice=outp["voice"],
    )


# ---------------------------------------------------------------- files the config names


def _check_bundle(cfg: DeviceConfig) -> tuple[Path, str]:
    """The bundle to load (``<root>/current`` resolved, or the fixed one), verified; and its version."""
    from elma_utils.edge.sync import SyncError, current_bundle

    if cfg.model_root is not None:
        try:
            bundle = current_bundle(cfg.model_root)
        except SyncError as err:
            raise DeviceConfigError(f"{cfg.path}: [model] root {cfg.model_root}: {err}") from err
        if bundle is None:
            sync = (
                f"elma sync --local-root {cfg.model_root} --host {cfg.host} --port {cfg.ssh_port} "
                f"--user {cfg.user} --key {cfg.key} --known-hosts {cfg.known_hosts} --remote-root {cfg.remote_root}"
            )
            raise DeviceConfigError(
                f"{cfg.path}: [model] root {cfg.model_root} holds no installed bundle yet; install one with: {sync}"
            )
        label = "[model] root's current version"
    else:
        bundle, label = cfg.bundle, "[model] bundle"
    manifest = check_bundle_dir(bundle, label=label)
    return bundle, str(manifest.get("model_version", bundle.name))


def _check_microphone(index: int | None) -> None:
    """Without PyAudio or an input device: the message ``capture_microphone`` gives."""
    from elma_utils.speech.audio import AudioError, capture_microphone

    try:
        import speech_recognition as sr

        sr.Microphone(device_index=index)
    except ImportError as err:
        raise DeviceConfigError(
            f'microphone input needs the SpeechRecognition package ({err}); use [input] kind = "folder" or "stdin"'
        ) from err
    except (AttributeError, OSError, AssertionError):
        try:  # fails the same way, with the project's message naming what is missing
            capture_microphone(timeout=0.1, device_index=index)
        except AudioError as err:
            raise DeviceConfigError(f'[input] kind = "microphone": {err}') from err
        raise DeviceConfigError('[input] kind = "microphone": no usable microphone') from None


def check_config(cfg: DeviceConfig) -> ReadyConfig:
    """Check every file the config names, cheaply and before anything loads; one-line errors."""
    from elma_utils.speech.spoken_qa import ContextError, resolve_context

    try:
        check_private_key(cfg.key, label="[server] key")
        check_known_hosts(cfg.known_hosts, cfg.host, cfg.ssh_port, label="[server] known_hosts")
        check_outbox_path(cfg.outbox, label="[outbox] path")
    except InputError as err:
        raise DeviceConfigError(f"{cfg.path}: {err}") from err
    try:
        context, _ = resolve_context(context_file=cfg.context_file)
    except ContextError as err:
        raise DeviceConfigError(f"{cfg.path}: [context] file: {err}") from err
    try:
        bundle, version = _check_bundle(cfg)
    except InputError as err:
        raise DeviceConfigError(f"{cfg.path}: {err}") from err
    warnings = []
    if len(context) > SERVER_MAX_CONTEXT_CHARS:
        warnings.append(
            f"the context has {len(context)} characters; a server with the default --max-context-chars "
            f"{SERVER_MAX_CONTEXT_CHARS} refuses offloads about it (the device still answers on the edge)"
        )
    if cfg.input_kind == "folder" and not cfg.input_folder.is_dir():
        raise DeviceConfigError(
            f"{cfg.path}: [input] folder {cfg.input_folder} does not exist; create it (mkdir -p {cfg.input_folder})"
        )
    if cfg.input_kind == "microphone":
        try:
            _check_microphone(cfg.microphone_index)
        except DeviceConfigError as err:
            raise DeviceConfigError(f"{cfg.path}: {err}") from err
    model = cfg.speech_model
    if cfg.needs_speech and model is not None and "/" in model and not Path(model).is_dir():
        raise DeviceConfigError(
            f"{cfg.path}: [speech] model {model} is not a directory (a CTranslate2 Whisper model)"
        )
    parent = cfg.outbox.parent
    if not parent.is_dir():
        raise DeviceConfigError(f"{cfg.path}: [outbox] path: directory {parent} does not exist; create it")
    if not os.access(parent, os.W_OK):
        raise DeviceConfigError(f"{cfg.path}: [outbox] path: directory {parent} is not writable")
    if cfg.speak and shutil.which("espeak-ng") is None:
        warnings.append(
            "[output] speak = true but espeak-ng is not installed: answers are printed, not spoken"
        )
    return ReadyConfig(cfg, context, bundle, version, tuple(warnings))


# ---------------------------------------------------------------- init


def _toml_str(value: str | os.PathLike) -> str:
    """A TOML basic string (quotes, backslashes and control characters escaped)."""
    out = []
    for ch in str(value):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (the board directory stays movable), else absolute."""
    path = path.absolute()
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class InitResult:
    config: Path
    key: Path
    public_key: Path
    public_key_line: str
    fingerprint: str
    register_command: str
    pin_command: str

    def instructions(self) -> str:
        return "\n".join(
            [
                f"wrote {self.config} and a new device key {self.key} ({self.fingerprint})",
                "1. On the server, register this device (copy the .pub file there first; its line is below):",
                f"   {self.register_command}",
                f"   {self.public_key_line}",
                "2. On this device, pin the server's host key (compare its fingerprint with the administrator's "
                "`ssh-keygen -lf <host key>.pub` first):",
                f"   {self.pin_command}",
                f"3. Run: elma device run --config {shlex.quote(str(self.config))}",
            ]
        )


def init_device(
    config: str | os.PathLike,
    *,
    device_id: str | None = None,
    server: str = "127.0.0.1:22",
    user: str = "elma",
    service: str = DEFAULT_SERVICE,
    deadline_ms: int = 2000,
    model_root: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = None,
    context_file: str | os.PathLike | None = None,
    input_kind: str = "stdin",
    folder: str | os.PathLike | None = None,
    engine: str = "whisper",
    sync_interval: float | None = None,
    remote_root: str = ".",
    speak: bool = False,
    authorized_keys: str = "authorized_keys",
) -> InitResult:
    """Write a commented config and a new ed25519 key beside it; refuses to overwrite either.

    ``authorized_keys``: the server's file, only used in the printed ``elma keys add`` command.
    Every value is checked as ``load_config`` would before anything is written.
    """
    config = Path(config).absolute()
    base = config.parent
    device_id = device_id or re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname())[:64] or "device"
    if not is_identifier(device_id):
        raise DeviceConfigError(f"--device-id {device_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    host, port = split_host_port(server, DEFAULT_SSH_PORT, "--server")
    host = _check_host(host, "--server")
    split_host_port(service, 0, "--service")
    if input_kind not in INPUT_KINDS:
        raise DeviceConfigError(f"--input {input_kind!r} must be one of {', '.join(INPUT_KINDS)}")
    if input_kind == "folder" and folder is None:
        folder = base / "inbox"
    if model_root is not None and bundle is not None:
        raise DeviceConfigError("give --model-root (synced bundles) or --bundle (a fixed bundle), not both")
    if model_root is None and bundle is None:
        model_root = base / "bundles"
    if sync_interval is None:
        sync_interval = 3600.0 if model_root is not None else 0.0
    if sync_interval > 0 and model_root is None:
        raise DeviceConfigError("--sync-interval > 0 needs --model-root (a fixed --bundle is never updated)")
    key = base / "device_ed25519"
    for existing in (config, key, Path(f"{key}.pub")):
        if existing.exists():
            raise DeviceConfigError(
                f"{existing} already exists; elma device init never overwrites (move it away first)"
            )
    context_file = Path(context_file) if context_file is not None else base / "context.txt"
    base.mkdir(parents=True, exist_ok=True)
    text = render_config(
        device_id=device_id,
        host=host,
        port=port,
        user=user,
        key=_relative(key, base),
        known_hosts=_relative(base / "known_hosts", base),
        service=service,
        deadline_ms=deadline_ms,
        model_root=_relative(Path(model_root), base) if model_root is not None else None,
        bundle=_relative(Path(bundle), base) if bundle is not None else None,
        context_file=_relative(context_file, base),
        input_kind=input_kind,
        folder=_relative(Path(folder), base) if folder is not None else None,
        engine=engine,
        sync_interval=sync_interval,
        remote_root=remote_root,
        speak=speak,
    )
    tomllib.loads(text)  # what we write must read back
    pkey = generate_ed25519_key(key, comment=device_id)
    if input_kind == "folder":
        Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    pub = Path(f"{key}.pub")
    register = (
        f"elma keys add --authorized-keys {shlex.quote(authorized_keys)} --device {device_id} "
        f"--public-key {shlex.quote(pub.name)}"
    )
    return InitResult(
        config=config,
        key=key,
        public_key=pub,
        public_key_line=public_key_line(pkey, device_id),
        fingerprint=fingerprint(pkey),
        register_command=register,
        pin_command=keyscan_command(host, port, shlex.quote(str(base / "known_hosts"))),
    )


def render_config(
    *,
    device_id: str,
    host: str,
    port: int,
    user: str,
    key: str,
    known_hosts: str,
    service: str,
    deadline_ms: int,
    model_root: str | None,
    bundle: str | None,
    context_file: str,
    input_kind: str,
    folder: str | None,
    engine: str,
    sync_interval: float,
    remote_root: str,
    speak: bool,
) -> str:
    """The commented TOML ``elma device init`` writes (optional keys left as comments)."""
    q = _toml_str
    model_lines = (
        [
            f"root = {q(model_root)}",
            '# bundle = "path/to/bundle"   # or a fixed bundle directory (then sync is off)',
        ]
        if model_root is not None
        else [
            '# root = "bundles"   # bundles kept up to date by sync: <root>/current',
            f"bundle = {q(bundle)}",
        ]
    )
    folder_line = f"folder = {q(folder)}" if folder is not None else '# folder = "inbox"'
    return "\n".join(
        [
            "# ELMA device configuration, read by `elma device run --config THIS_FILE`.",
            "# Relative paths are relative to this file's directory. Unknown keys are an error.",
            "",
            "[device]",
            f"id = {q(device_id)}            # the comment of this device's line in the server's authorized_keys",
            'log_level = "INFO"          # DEBUG, INFO, WARNING or ERROR (log lines go to stderr)',
            "",
            "[server]",
            f"host = {q(host)}            # name, IPv4 or IPv6 address (no brackets)",
            f"ssh_port = {port}               # ELMA's endpoint (elma serve --ssh-port) or the server's sshd",
            f"user = {q(user)}",
            f"key = {q(key)}       # this device's ed25519 key (made by elma device init)",
            f"known_hosts = {q(known_hosts)}  # must pin the server's host key (ssh-keyscan)",
            f"service = {q(service)}    # the model service's address on the server (elma serve --service-port)",
            f"deadline_ms = {deadline_ms}          # wait this long for the server, then answer on the device",
            "",
            "[model]",
            *model_lines,
            "num_threads = 0             # LiteRT threads; 0: its default",
            "",
            "[context]",
            f"file = {q(context_file)}       # UTF-8 text the questions are about (long texts are fine)",
            "",
            "[input]",
            f"kind = {q(input_kind)}             # stdin (typed, one per line), folder (audio files) or microphone",
            folder_line
            + "          # kind = folder: *.wav/.flac/.ogg/.mp3 files; write NAME.part, then rename",
            "poll_seconds = 0.5",
            "settle_seconds = 1.0        # a file is taken once its size has not changed for this long",
            "microphone_index = -1       # -1: the default input device",
            "",
            "[speech]",
            f"engine = {q(engine)}          # whisper (faster-whisper) or sphinx (pocketsphinx)",
            '# model = "/path/to/whisper-model"  # whisper: a CTranslate2 model directory; default: tiny.en',
            'lm = "auto"                 # whisper n-best rescoring: auto, none, or a saved question LM',
            "",
            "[outbox]",
            'path = "outbox.sqlite3"     # offloads kept while the server is away',
            "drain_seconds = 5.0         # how often queued questions are retried",
            "retry_max_seconds = 600.0   # longest backoff between tries of one question",
            "",
            "[sync]",
            f"interval_seconds = {sync_interval:g}      # fetch a newer bundle this often (0: off; needs [model] root)",
            f"remote_root = {q(remote_root)}          # the bundles directory on the server's SFTP",
            "",
            "[output]",
            f"speak = {'true' if speak else 'false'}               # also say each answer with espeak-ng",
            'voice = "en-us"',
            "",
        ]
    )
