"""The edge ↔ server wire protocol: versioned, length-bounded JSON lines.

One message is one UTF-8 JSON object on one line ending in ``"\\n"``, at most
``MAX_MESSAGE_BYTES`` bytes long (newline included). Every message carries ``v`` (the
protocol version), ``type`` and ``id`` (the request id, chosen by the client; a reply repeats
the id of its request). The transport (an SSH channel, a forwarded socket) only moves bytes:
``LineReader`` cuts them into lines without ever buffering more than one message,
``decode`` turns a line into a message and ``encode`` does the reverse.

Everything a peer can send is checked here, so the server and the client never see a
half-valid message: ``decode`` raises ``ProtocolError`` (and nothing else) for every bad
input, with an error code the other side can act on and, when it could be read, the
request id to answer to. ``error_reply_for`` turns any exception into the ``ErrorReply`` to
send back. Messages are frozen dataclasses that validate themselves on construction, so a
message built in code is held to the same rules as one read from the wire (an invalid one
raises ``ProtocolError``, which is a ``ValueError``).

Unknown top-level fields are ignored, so a later version can add optional fields without
breaking older peers; anything that changes the meaning of a message bumps ``v``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_MESSAGE_BYTES = 1 << 20  # one whole line, newline included
MAX_QUESTION_CHARS = 2_000
MAX_TEXT_CHARS = 100_000  # answer texts
MAX_MESSAGE_CHARS = 2_000  # error messages (longer ones are cut by error_reply_for)
MAX_VERSION_CHARS = 128  # model version strings
MAX_LAYERS = 256  # entries of an entropies list
MAX_OFFSET = 10**9  # character offsets and layer numbers
MAX_DEADLINE_MS = 3_600_000
MIN_MESSAGE_BYTES = 1_024  # the smallest limit a peer may announce in a Hello

ERROR_CODES = frozenset(
    {
        "malformed",  # not UTF-8, not JSON, not one JSON object on one line
        "too_large",  # the line is longer than the limit
        "unsupported_version",  # "v" is not a version this peer speaks
        "bad_request",  # a missing, mistyped or out-of-range field, an unknown message type
        "unknown_context",  # an ask's context_ref names a context the server does not hold
        "internal",  # the server failed answering a valid request
        "overloaded",  # the server cannot answer in time; retry later
        "forbidden",  # the request is not signed by the key registered for its device_id
        "conflict",  # a request id this device already used, with different content
    }
)
# Codes that blame the request itself: sending it again can never succeed, so an outbox
# sets such an item aside (with its reason) instead of retrying it. The others are transient.
CLIENT_FAULT_CODES = frozenset(
    {"malformed", "too_large", "unsupported_version", "bad_request", "forbidden", "conflict"}
)

_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")  # request and device ids
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SIG_RE = re.compile(r"[A-Za-z0-9+/]{1,256}={0,2}")


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``code`` is one of ``ERROR_CODES``.

    ``request_id`` is the id of the offending message when it could be read, so the reply
    can name it; ``None`` otherwise.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}; choose one of {sorted(ERROR_CODES)}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def is_identifier(value: object) -> bool:
    """Whether ``value`` is a valid request or device id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def context_ref(context: str) -> str:
    """The name both sides use for a context: sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(context.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- field checks


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_request", message)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(name: str, value: Any, max_chars: int, *, non_empty: bool = False) -> str:
    """A string that is valid Unicode (no lone surrogates, so it can be stored and re-sent)."""
    if not isinstance(value, str):
        raise _bad(f"field {name!r} must be a string, got {_type_name(value)}")
    if len(value) > max_chars:
        raise _bad(f"field {name!r} is {len(value)} characters long; the limit is {max_chars}")
    if non_empty and not value.strip():
        raise _bad(f"field {name!r} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"field {name!r} holds a lone surrogate at character {exc.start}") from None
    return value


def _ident(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = repr(value[:70]) if isinstance(value, str) else _type_name(value)
        raise _bad(f"field {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ : -, got {shown}")
    return value


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"field {name!r} must be an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise _bad(f"field {name!r} must be in [{lo}, {hi}], got {value}")
    return value


def _float(name: str, value: Any, lo: float = -math.inf) -> float:
    """A finite number (JSON integers accepted); NaN and infinities are refused."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(f"field {name!r} must be a number, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _bad(f"field {name!r} is too large a number") from None
    if not math.isfinite(number):
        raise _bad(f"field {name!r} must be a finite number, got {number}")
    if number < lo:
        raise _bad(f"field {name!r} must be ≥ {lo}, got {number}")
    return number


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"field {name!r} must be true or false, got {_type_name(value)}")
    return value


def _optional(check: Callable[..., Any], name: str, value: Any, *args: Any) -> Any:
    return None if value is None else check(name, value, *args)


def _span(prefix: str, start: Any, end: Any) -> tuple[int | None, int | None]:
    """Both null, or character offsets with 0 ≤ start ≤ end."""
    if start is None and end is None:
        return None, None
    if start is None or end is None:
        raise _bad(f"fields {prefix}start and {prefix}end must both be set or both be null")
    start = _int(f"{prefix}start", start, 0, MAX_OFFSET)
    end = _int(f"{prefix}end", end, 0, MAX_OFFSET)
    if end < start:
        raise _bad(f"{prefix}end ({end}) is before {prefix}start ({start})")
    return start, end


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


# ---------------------------------------------------------------- messages


class _AnswerLike(Protocol):
    """What EdgeResult.from_answer reads (``EarlyExitAnswer`` and ``EdgeAnswer`` fit)."""

    text: str
    char_start: int
    char_end: int
    exit_layer: int
    entropies: Sequence[float]


@dataclass(frozen=True)
class EdgeResult:
    """What the edge model answered before offloading (the answer the user already has).

    ``start``/``end`` are character offsets of ``text`` in the context, null when the edge
    had no span; ``exit_layer`` is the 1-based layer that answered (null: none did);
    ``entropies`` has one span entropy per computed layer. ``asked`` (optional, signed when
    set): how many questions the device has answered with ``model_version`` so far, this one
    included, settled ones too (``EdgeQA`` keeps the count in its outbox across restarts; the
    server keeps the largest it saw): the server needs it to price an offload threshold
    (``server.offload_threshold``); a device that does not send it is left out of that.
    """

    text: str
    model_version: str
    start: int | None = None
    end: int | None = None
    exit_layer: int | None = None
    entropies: tuple[float, ...] = ()
    asked: int | None = None

    def __post_init__(self) -> None:
        _text("edge.text", self.text, MAX_TEXT_CHARS)
        _text("edge.model_version", self.model_version, MAX_VERSION_CHARS, non_empty=True)
        start, end = _span("edge.", self.start, self.end)
        _set(self, "start", start)
        _set(self, "end", end)
        _optional(_int, "edge.exit_layer", self.exit_layer, 1, MAX_LAYERS)
        if not isinstance(self.entropies, list | tuple):
            raise _bad(f"field 'edge.entropies' must be a list of numbers, got {_type_name(self.entropies)}")
        if len(self.entropies) > MAX_LAYERS:
            raise _bad(f"field 'edge.entropies' has {len(self.entropies)} entries; the limit is {MAX_LAYERS}")
        entropies = tuple(_float(f"edge.entropies[{i}]", h, 0.0) for i, h in enumerate(self.entropies))
        _set(self, "entropies", entropies)
        _optional(_int, "edge.asked", self.asked, 1, MAX_OFFSET)

    @classmethod
    def from_answer(cls, answer: _AnswerLike, model_version: str, asked: int | None = None) -> EdgeResult:
        """From an ``EarlyExitAnswer``/``EdgeAnswer``; its ``NO_SPAN`` (-1, -1) becomes null."""
        has_span = answer.char_start >= 0 and answer.char_end >= answer.char_start
        return cls(
            text=answer.text,
            model_version=model_version,
            start=int(answer.char_start) if has_span else None,
            end=int(answer.char_end) if has_span else None,
            exit_layer=int(answer.exit_layer) if answer.exit_layer >= 1 else None,
            entropies=tuple(float(h) for h in answer.entropies),
            asked=asked,
        )


@dataclass(frozen=True)
class AskRequest:
    """Edge → server: answer this question the edge was not sure about.

    Exactly one of ``context`` (the text) and ``context_ref`` (``context_ref(text)`` of a
    context the server already holds) is set. ``deadline_ms``: how long the edge will wait
    for the answer, so the server can refuse work it cannot finish in time. ``sig``: the
    device key's signature of the request's content (``request_signing``), which binds
    ``device_id`` to the key registered for it; a server with a device registry refuses
    unsigned asks.
    """

    TYPE: ClassVar[str] = "ask"

    id: str
    device_id: str
    question: str
    edge: EdgeResult
    context: str | None = None
    context_ref: str | None = None
    deadline_ms: int | None = None
    sig: str | None = None

    def __post_init__(self) -> None:
        _ident("id", self.id)
        _ident("device_id", self.device_id)
        if self.sig is not None and (not isinstance(self.sig, str) or not _SIG_RE.fullmatch(self.sig)):
            raise _bad("field 'sig' must be base64 of at most 256 characters (see request_signing)")
        _text("question", self.question, MAX_QUESTION_CHARS, non_empty=True)
        if not isinstance(self.edge, EdgeResult):
            raise _bad(f"field 'edge' must be an object, got {_type_name(self.edge)}")
        if (self.context is None) == (self.context_ref is None):
            raise _bad("exactly one of the fields 'context' and 'context_ref' must be set")
        if self.context is not None:
            _text("context", self.context, MAX_MESSAGE_BYTES, non_empty=True)
            if self.edge.end is not None and self.edge.end > len(self.context):
                raise _bad(f"edge.end ({self.edge.end}) is past the end of the context ({len(self.context)})")
        if self.context_ref is not None and (
            not isinstance(self.context_ref, str) or not _SHA256_RE.fullmatch(self.context_ref)
        ):
            raise _bad("field 'context_ref' must be a sha256 as 64 lower-case hex digits")
        _optional(_int, "deadline_ms", self.deadline_ms, 1, MAX_DEADLINE_MS)

    @property
    def ref(self) -> str:
        """The context's sha256, whichever way the request carries it."""
        return self.context_ref if self.context_ref is not None else context_ref(self.context or "")


@dataclass(frozen=True)
class AnswerReply:
    """Server → edge: the full model's answer to an ``AskRequest`` with the same ``id``.

    ``start``/``end``: character offsets of ``text`` in the context (null when unknown).
    A ``no_answer`` reply (the model thinks the context does not answer the question) has
    an empty ``text`` and no span. ``server_ms``: time the server spent on the request.
    """

    TYPE: ClassVar[str] = "answer"

    id: str
    text: str
    score: float
    no_answer: bool
    model_version: str
    server_ms: float
    start: int | None = None
    end: int | None = None

    def __post_init__(self) -> None:
        _ident("id", self.id)
        _text("text", self.text, MAX_TEXT_CHARS)
        _set(self, "score", _float("score", self.score))
        _bool("no_answer", self.no_answer)
        _text("model_version", self.model_version, MAX_VERSION_CHARS, non_empty=True)
        _set(self, "server_ms", _float("server_ms", self.server_ms, 0.0))
        start, end = _span("", self.start, self.end)
        if self.no_answer and (self.text or start is not None):
            raise _bad("a no_answer reply must have an empty text and no span")
        _set(self, "start", start)
        _set(self, "end", end)


@dataclass(frozen=True)
class ErrorReply:
    """Server → edge (or either way): the request ``id`` failed; ``id`` is null when unreadable."""

    TYPE: ClassVar[str] = "error"

    id: str | None
    code: str
    message: str

    def __post_init__(self) -> None:
        _optional(_ident, "id", self.id)
        if not isinstance(self.code, str) or self.code not in ERROR_CODES:
            shown = repr(self.code[:40]) if isinstance(self.code, str) else _type_name(self.code)
            raise _bad(f"field 'code' must be one of {sorted(ERROR_CODES)}, got {shown}")
        _text("message", self.message, MAX_MESSAGE_CHARS)


@dataclass(frozen=True)
class Ping:
    """Either way: are you there? Answered by a ``Pong`` with the same ``id``."""

    TYPE: ClassVar[str] = "ping"

    id: str

    def __post_init__(self) -> None:
        _ident("id", self.id)


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[str] = "pong"

    id: str

    def __post_init__(self) -> None:
        _ident("id", self.id)


@dataclass(frozen=True)
class Hello:
    """Either way, optional, first on a connection: who I am and the longest line I accept.

    The server answers a client's Hello with its own (same ``id``); a sender keeps its
    messages within the limit the other side announced.
    """

    TYPE: ClassVar[str] = "hello"

    id: str
    peer: str  # device id of an edge, name of a server
    model_version: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        _ident("id", self.id)
        _ident("peer", self.peer)
        _optional(_text, "model_version", self.model_version, MAX_VERSION_CHARS)
        _int("max_message_bytes", self.max_message_bytes, MIN_MESSAGE_BYTES, 1 << 30)


Message = AskRequest | AnswerReply | ErrorReply | Ping | Pong | Hello
MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (AskRequest, AnswerReply, ErrorReply, Ping, Pong, Hello)
}
_NESTED: dict[tuple[type, str], type] = {(AskRequest, "edge"): EdgeResult}


# ---------------------------------------------------------------- encode / decode


def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """One message as its line (UTF-8 JSON + "\\n"); ``too_large`` if over ``max_bytes``."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    obj = {"v": PROTOCOL_VERSION, "type": msg.TYPE, **asdict(msg)}
    line = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"
    if len(line) > max_bytes:
        raise ProtocolError(
            "too_large", f"{msg.TYPE} message is {len(line)} bytes; the limit is {max_bytes}", msg.id
        )
    return line


def decode(line: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse one line (with or without its "\\n"); raises only ``ProtocolError``."""
    if not isinstance(line, bytes | bytearray | memoryview):
        raise ProtocolError("malformed", f"a message must be bytes, got {type(line).__name__}")
    data = bytes(line)
    content = data[:-1] if data.endswith(b"\n") else data
    if len(content) + 1 > max_bytes:
        raise ProtocolError("too_large", f"message is {len(content) + 1} bytes; the limit is {max_bytes}")
    obj = _parse_json(content)
    request_id = obj.get("id") if isinstance(obj.get("id"), str) and _ID_RE.fullmatch(obj["id"]) else None
    try:
        return _build_message(obj)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, exc.message, request_id) from None


def _parse_json(content: bytes) -> dict:
    if not content.strip():
        raise ProtocolError("malformed", "empty message")
    if b"\n" in content:
        raise ProtocolError("malformed", "a message must be one line; found a newline inside it")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            "malformed", f"not UTF-8 (bad byte at offset {exc.start}): {exc.reason}"
        ) from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ProtocolError("malformed", f"not valid JSON (column {exc.colno}): {exc.msg}") from None
    except ValueError as exc:  # NaN/Infinity, duplicate keys, integers with too many digits
        raise ProtocolError("malformed", f"not acceptable JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed", "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"a message must be a JSON object, got {_json_kind(obj)}")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup[:40]!r} in an object")
    return obj


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _build_message(obj: dict) -> Message:
    if "v" not in obj:
        raise _bad("missing field 'v' (the protocol version)")
    version = obj["v"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise _bad(f"field 'v' must be an integer, got {_type_name(version)}")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version} is not supported; this peer speaks {sorted(SUPPORTED_VERSIONS)}",
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _bad(
            "missing field 'type'"
            if kind is None
            else f"field 'type' must be a string, got {_type_name(kind)}"
        )
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise _bad(f"unknown message type {kind[:40]!r}; expected one of {sorted(MESSAGE_TYPES)}")
    return _build(cls, obj, "")


def _build(cls: type, obj: dict, prefix: str) -> Any:
    """``cls(**fields)`` from a JSON object; the dataclass checks the values."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in obj:
            value = obj[f.name]
            nested = _NESTED.get((cls, f.name))
            if nested is not None:
                if not isinstance(value, dict):
                    raise _bad(f"field {prefix + f.name!r} must be an object, got {_json_kind(value)}")
                value = _build(nested, value, f"{prefix}{f.name}.")
            kwargs[f.name] = value
        elif f.default is MISSING and f.default_factory is MISSING:
            where = "" if prefix else f" in a message of type {cls.TYPE!r}"
            raise _bad(f"missing field {prefix + f.name!r}{where}")
    return cls(**kwargs)


def error_reply_for(exc: BaseException, request_id: str | None = None) -> ErrorReply:
    """The ``ErrorReply`` to send for ``exc``: its code for a ``ProtocolError``, else "internal".

    ``request_id`` is used when the exception does not name one. Messages of other
    exceptions are not sent (they may hold server internals), only their type.
    """
    if isinstance(exc, ProtocolError):
        code, message = exc.code, exc.message
        request_id = exc.request_id or request_id
    else:
        code, message = "internal", f"the server failed answering the request ({type(exc).__name__})"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    if request_id is not None and not _ID_RE.fullmatch(request_id):
        request_id = None
    message = message.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    return ErrorReply(request_id, code, message)


# ---------------------------------------------------------------- framing


@dataclass
class LineReader:
    """Cuts a byte stream into lines, holding at most one message's worth of bytes.

    ``feed(chunk)`` returns, in stream order, each complete line (without its "\\n") and,
    for a line longer than ``max_bytes`` (newline included), one ``ProtocolError("too_large")``
    in its place as soon as the limit is passed: the rest of that line is dropped as it
    arrives, and reading starts afresh after its newline. ``finish()`` at the end of the
    stream reports a last line cut off without its newline.
    """

    max_bytes: int = MAX_MESSAGE_BYTES
    _buf: bytearray = field(default_factory=bytearray, init=False, repr=False)
    _skipping: bool = field(default=False, init=False)  # inside an oversized line

    def __post_init__(self) -> None:
        if self.max_bytes < 2:
            raise ValueError(f"max_bytes must be ≥ 2 (one byte and the newline), got {self.max_bytes}")

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held now (never more than max_bytes - 1)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes | ProtocolError]:
        data = bytes(chunk)
        out: list[bytes | ProtocolError] = []
        limit = self.max_bytes - 1  # content bytes of a line, newline not counted
        pos, n = 0, len(data)
        while pos < n:
            newline = data.find(b"\n", pos)
            end = n if newline == -1 else newline
            if not self._skipping:
                if len(self._buf) + end - pos > limit:
                    out.append(
                        ProtocolError(
                            "too_large",
                            f"a message longer than {self.max_bytes} bytes was dropped up to its newline",
                        )
                    )
                    self._buf.clear()
                    self._skipping = True
                else:
                    self._buf += data[pos:end]
            if newline == -1:
                break
            if self._skipping:
                self._skipping = False
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
            pos = newline + 1
        return out

    def finish(self) -> list[ProtocolError]:
        """End of stream: an error for a last line that never got its newline (none if dropped)."""
        n, skipping = len(self._buf), self._skipping
        self._buf.clear()
        self._skipping = False
        if n and not skipping:
            return [ProtocolError("malformed", f"the stream ended inside a message ({n} bytes, no newline)")]
        return []
