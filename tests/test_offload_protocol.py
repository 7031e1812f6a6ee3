"""The offload wire protocol: round trips, every error code, framing, and fuzzing of decode."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from offload_helpers import make_answer, make_ask

from elma_utils.early_exit.policies import EarlyExitAnswer
from elma_utils.edge.protocol import (
    ERROR_CODES,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    AnswerReply,
    AskRequest,
    EdgeResult,
    ErrorReply,
    Hello,
    LineReader,
    Ping,
    Pong,
    ProtocolError,
    context_ref,
    decode,
    encode,
    error_reply_for,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ASK = make_ask(
    7, question="Où est la tour Eiffel ? 🗼", context="La tour Eiffel est à Paris.\nElle est haute."
)
MESSAGES = [
    ASK,
    make_ask(8, by_ref=context_ref("some context")),
    AskRequest("r9", "edge-2", "Who?", EdgeResult("", "edge-v2"), context="ctx", deadline_ms=1500),
    make_answer(ASK, "Paris"),
    AnswerReply("r7", "", -3.5, True, "server-v1", 0.0),
    ErrorReply("r7", "overloaded", "try again in 2 s"),
    ErrorReply(None, "malformed", "not JSON"),
    Ping("p-1"),
    Pong("p-1"),
    Hello("h1", "jetson-tx2", model_version="edge 1.0 (int8)", max_message_bytes=4096),
]


def _raw(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _error(line: bytes, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(line, **kw)
    return info.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: f"{m.TYPE}-{m.id}")
def test_round_trip(msg):
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert list(obj)[:3] == ["v", "type", "id"] and obj["v"] == 1 and obj["type"] == msg.TYPE
    assert decode(line) == msg
    assert decode(line.rstrip(b"\n")) == msg  # the newline is optional for decode
    assert type(decode(line)) is type(msg)


def test_numbers_normalise_so_round_trips_are_exact():
    edge = EdgeResult("x", "m", entropies=[1, 0.5])  # ints and a list in, floats and a tuple kept
    assert edge.entropies == (1.0, 0.5) and isinstance(edge.entropies[0], float)
    reply = AnswerReply("a", "x", 3, False, "m", 7)
    assert decode(encode(reply)) == reply and reply.score == 3.0 and isinstance(reply.server_ms, float)


def test_context_ref_is_sha256_of_utf8_and_ask_ref_agrees():
    text = "Zürich – 🗼"
    assert context_ref(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert make_ask(1, context=text).ref == context_ref(text)
    assert make_ask(2, by_ref=context_ref(text)).ref == context_ref(text)


def test_edge_result_from_early_exit_answer():
    solved = EarlyExitAnswer("Paris", 0, 5, 2, True, 0.1, -3.0, [0.9, 0.1])
    edge = EdgeResult.from_answer(solved, "edge-v1")
    assert edge == EdgeResult("Paris", "edge-v1", 0, 5, 2, (0.9, 0.1))
    unsolved = EarlyExitAnswer("", -1, -1, 6, False, 0.8, 2.0, [0.9] * 6)  # NO_SPAN
    edge = EdgeResult.from_answer(unsolved, "edge-v1")
    assert (edge.start, edge.end, edge.exit_layer, len(edge.entropies)) == (None, None, 6, 6)


# ---------------------------------------------------------------- every error code


@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"", "empty message"),
        (b"   \n", "empty message"),
        (b'{"v":1,"type":"ping","id":"a"}\n{"v":1}\n', "one line"),
        (b'{"v":1,"type":"ping","id":"caf\xe9"}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a UTF-8 BOM
        (b'{"v":1,', "not valid JSON"),
        (b"[1, 2]", "got an array"),
        (b'"ping"', "got a string"),
        (b"null", "got null"),
        (b'{"v":1,"type":"answer","id":"a","score":NaN}', "NaN is not allowed"),
        (b'{"v":1,"type":"answer","id":"a","score":-Infinity}', "-Infinity is not allowed"),
        (b'{"v":1,"type":"ping","id":"a","id":"b"}', "duplicate key 'id'"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"v":1,"n":' + b"9" * 5000 + b"}", "not acceptable JSON"),
    ],
)
def test_malformed(line, fragment):
    exc = _error(line)
    assert exc.code == "malformed" and fragment in exc.message and exc.request_id is None


def test_too_large_on_decode_and_encode():
    msg = make_ask(1, context="x" * 5000)
    line = encode(msg)
    assert decode(line, max_bytes=len(line)) == msg  # the limit includes the newline
    exc = _error(line, max_bytes=len(line) - 1)
    assert exc.code == "too_large" and str(len(line)) in exc.message
    with pytest.raises(ProtocolError) as info:
        encode(msg, max_bytes=len(line) - 1)
    assert info.value.code == "too_large" and info.value.request_id == "r1"
    with pytest.raises(ProtocolError, match="too_large"):
        encode(make_ask(2, context="é" * (MAX_MESSAGE_BYTES // 2)))  # 2 bytes per char in UTF-8


def test_unsupported_version_keeps_the_request_id():
    obj = json.loads(encode(Ping("p9")))
    exc = _error(_raw({**obj, "v": 2}))
    assert (exc.code, exc.request_id) == ("unsupported_version", "p9")
    assert _error(_raw({**obj, "v": 0})).code == "unsupported_version"


ASK_OBJ = json.loads(encode(make_ask(3)))


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"v": None}, "missing field 'v'"),
        ({"v": "1"}, "'v' must be an integer"),
        ({"v": True}, "'v' must be an integer"),
        ({"type": None}, "missing field 'type'"),
        ({"type": "shout"}, "unknown message type 'shout'"),
        ({"question": None}, "missing field 'question'"),
        ({"question": 42}, "'question' must be a string, got int"),
        ({"question": " \t"}, "'question' must not be empty"),
        ({"question": "q" * 2001}, "the limit is 2000"),
        ({"question": "bad \ud800 half"}, "lone surrogate"),
        ({"id": "x" * 65}, "1-64 characters"),
        ({"id": "has space"}, "1-64 characters"),
        ({"device_id": ""}, "'device_id' must be 1-64"),
        ({"edge": "Paris"}, "'edge' must be an object"),
        ({"edge": {"text": "Paris"}}, "missing field 'edge.model_version'"),
        ({"context_ref": "ab" * 32}, "exactly one of"),
        ({"context": None}, "exactly one of"),
        ({"context": None, "context_ref": "AB" * 32}, "64 lower-case hex"),
        ({"deadline_ms": 0}, "'deadline_ms' must be in [1,"),
        ({"deadline_ms": 1.5}, "'deadline_ms' must be an integer"),
        ({"edge": {**ASK_OBJ["edge"], "entropies": [0.1, "high"]}}, "'edge.entropies[1]' must be a number"),
        ({"edge": {**ASK_OBJ["edge"], "entropies": [-0.5]}}, "must be ≥ 0.0"),
        ({"edge": {**ASK_OBJ["edge"], "entropies": 0.5}}, "must be a list"),
        ({"edge": {**ASK_OBJ["edge"], "start": 3, "end": None}}, "both be set or both be null"),
        ({"edge": {**ASK_OBJ["edge"], "start": 4, "end": 2}}, "is before"),
        ({"edge": {**ASK_OBJ["edge"], "start": 0, "end": 10_000}}, "past the end of the context"),
        ({"edge": {**ASK_OBJ["edge"], "exit_layer": 0}}, "'edge.exit_layer' must be in [1,"),
        ({"edge": {**ASK_OBJ["edge"], "exit_layer": False}}, "'edge.exit_layer' must be an integer"),
    ],
)
def test_bad_request(change, fragment):
    obj = {k: v for k, v in {**ASK_OBJ, **change}.items() if v is not None or k in ("context", "context_ref")}
    exc = _error(_raw(obj))
    assert exc.code == "bad_request" and fragment in exc.message
    valid_id = isinstance(obj.get("id"), str) and len(obj["id"]) <= 64 and " " not in obj["id"]
    assert exc.request_id == (obj["id"] if valid_id else None)


def test_numbers_overflowing_to_infinity_are_refused():
    line = _raw({**ASK_OBJ, "edge": {**ASK_OBJ["edge"], "entropies": [0.5, 12345.0]}})
    exc = _error(line.replace(b"12345.0", b"1e400"))  # valid JSON that Python reads as inf
    assert exc.code == "bad_request" and "'edge.entropies[1]' must be a finite number" in exc.message


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"type": "answer", "id": "a", "text": "x", "score": 1, "no_answer": "no", "model_version": "m",
          "server_ms": 1}, "'no_answer' must be true or false"),
        ({"type": "answer", "id": "a", "text": "x", "score": 1, "no_answer": True, "model_version": "m",
          "server_ms": 1}, "no_answer reply must have an empty text"),
        ({"type": "answer", "id": "a", "text": "", "score": 1, "no_answer": False, "model_version": "m",
          "server_ms": -1}, "'server_ms' must be ≥ 0"),
        ({"type": "error", "id": None, "code": "teapot", "message": "m"}, "'code' must be one of"),
        ({"type": "hello", "id": "h", "peer": "p", "max_message_bytes": 10}, "'max_message_bytes' must be in"),
        ({"type": "pong"}, "missing field 'id' in a message of type 'pong'"),
    ],
)  # fmt: skip
def test_bad_request_other_messages(obj, fragment):
    exc = _error(_raw({"v": 1, **obj}))
    assert exc.code == "bad_request" and fragment in exc.message


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert decode(_raw({**json.loads(encode(Ping("p"))), "future": {"x": [1]}})) == Ping("p")


def test_messages_built_in_code_are_checked_too():
    with pytest.raises(ProtocolError, match="bad_request: field 'question' must not be empty"):
        make_ask(1, question="")
    with pytest.raises(ValueError):  # ProtocolError is a ValueError
        AnswerReply("a", "x", float("nan"), False, "m", 1.0)
    with pytest.raises(TypeError):
        encode({"v": 1, "type": "ping", "id": "x"})


def test_error_replies_for_every_code_and_for_other_exceptions():
    for code in sorted(ERROR_CODES):
        reply = error_reply_for(ProtocolError(code, f"because {code}", "r5"))
        assert reply == ErrorReply("r5", code, f"because {code}")
        assert decode(encode(reply)) == reply
    internal = error_reply_for(KeyError("/srv/secret/path"), request_id="r6")
    assert (internal.id, internal.code) == ("r6", "internal")
    assert "KeyError" in internal.message and "secret" not in internal.message
    long = error_reply_for(ProtocolError("bad_request", "x" * 5000))
    assert long.id is None and len(long.message) == 2000
    with pytest.raises(ValueError, match="unknown protocol error code"):
        ProtocolError("teapot", "no")


def test_decode_errors_become_replies_naming_the_request():
    exc = _error(_raw({"v": 1, "type": "ask", "id": "r42"}))
    reply = error_reply_for(exc)
    assert (reply.id, reply.code) == ("r42", "bad_request") and "device_id" in reply.message


# ---------------------------------------------------------------- framing


def test_line_reader_splits_and_reassembles():
    reader = LineReader()
    assert reader.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert reader.buffered == 4
    assert reader.feed(b":2}\n\n") == [b'{"b":2}', b""]
    assert reader.finish() == []


def test_line_reader_drops_an_oversized_line_once_and_resynchronises():
    reader = LineReader(max_bytes=8)  # 7 bytes of content + newline
    out = reader.feed(b"1234567\n12345678")
    assert out[0] == b"1234567" and isinstance(out[1], ProtocolError) and out[1].code == "too_large"
    assert len(out) == 2 and reader.buffered == 0
    for _ in range(1000):  # a 100 kB line arriving in pieces: no more reports, nothing kept
        assert reader.feed(b"x" * 100) == []
        assert reader.buffered == 0
    assert reader.feed(b"tail\nok\nnext") == [b"ok"]
    assert reader.buffered == 4
    [cut] = reader.finish()
    assert cut.code == "malformed" and "4 bytes" in cut.message


def test_line_reader_never_buffers_more_than_a_message():
    reader = LineReader(max_bytes=64)
    for _ in range(100):
        reader.feed(b"y" * 50)
        assert reader.buffered <= 63
    with pytest.raises(ValueError):
        LineReader(max_bytes=1)


def test_line_reader_finish_after_dropping_reports_nothing_more():
    reader = LineReader(max_bytes=4)
    assert [e.code for e in reader.feed(b"toolong")] == ["too_large"]
    assert reader.finish() == []


# ---------------------------------------------------------------- fuzzing

_any_char = st.characters(exclude_categories=())  # lone surrogates included
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(_any_char, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
_FIELDS = {cls.TYPE: json.loads(encode(msg)) for msg in MESSAGES for cls in [type(msg)]}


def _decode_or_error(line: bytes):
    """decode() may succeed or raise ProtocolError; anything else fails the test."""
    try:
        msg = decode(line)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES and exc.message
        return exc
    assert type(msg) in MESSAGE_TYPES.values()
    assert decode(encode(msg, max_bytes=1 << 30)) == msg  # what decodes re-encodes to the same message
    return msg


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    _decode_or_error(data)


@FUZZ
@given(st.dictionaries(st.text(max_size=12), _json, max_size=8), st.sampled_from([None, *MESSAGE_TYPES]))
def test_fuzz_arbitrary_json_objects(obj, kind):
    if kind is not None:
        obj = {**obj, "v": 1, "type": kind}
    _decode_or_error(json.dumps(obj, allow_nan=True).encode())  # ASCII: surrogates as \\ud800 escapes


@FUZZ
@given(st.sampled_from(sorted(_FIELDS)), st.data())
def test_fuzz_one_field_of_a_valid_message(kind, data):
    obj = json.loads(json.dumps(_FIELDS[kind]))
    target = obj["edge"] if kind == "ask" and data.draw(st.booleans()) else obj
    key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        del target[key]
    else:
        target[key] = data.draw(_json)
    text = json.dumps(obj, allow_nan=True, ensure_ascii=data.draw(st.booleans()))
    _decode_or_error(text.encode("utf-8", "surrogatepass"))  # raw surrogates make invalid UTF-8


@FUZZ
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12), st.data())
def test_fuzz_line_reader_reassembles_any_chunking(lines, data):
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    max_bytes = data.draw(st.integers(2, 50))
    reader = LineReader(max_bytes=max_bytes)
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(reader.feed(stream[a:b]))
        assert reader.buffered < max_bytes
    out.extend(reader.finish())
    expected = [line if len(line) < max_bytes else "too_large" for line in lines]
    assert [x.code if isinstance(x, ProtocolError) else x for x in out] == expected


@FUZZ
@given(st.lists(st.sampled_from(MESSAGES), max_size=8), st.data())
def test_fuzz_messages_through_the_reader(msgs, data):
    stream = b"".join(encode(m) for m in msgs)
    reader = LineReader()
    got = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, 200))
        got.extend(decode(line) for line in reader.feed(stream[pos : pos + step]))
        pos += step
    assert got == msgs and reader.finish() == []
