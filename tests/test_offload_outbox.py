"""The edge outbox: order, failures that keep items, items set aside, backoff, the v1 → v2
migration, kill -9 while putting and draining."""

from __future__ import annotations

import logging
import sqlite3
import threading

import pytest
from offload_helpers import make_answer, make_ask, run_until_killed

from elma_utils.edge.outbox import (
    DEFAULT_MAX_ATTEMPTS,
    OUTBOX_APPLICATION_ID,
    Outbox,
    describe_outbox,
)
from elma_utils.edge.protocol import (
    CLIENT_FAULT_CODES,
    ERROR_CODES,
    ErrorReply,
    ProtocolError,
    decode,
    encode,
)
from elma_utils.edge.ssh_client import OffloadUnavailable
from elma_utils.server.store import HardQuestionStore


class Clock:
    """Wall-clock seconds that move only when told, so a test sees backoffs without sleeping through them."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def outbox(tmp_path, clock):
    with Outbox(tmp_path / "outbox.db", clock=clock) as box:
        yield box


class Server:
    """A stand-in server for ``drain``: answers, or fails on the request ids in ``fail``."""

    def __init__(self, fail=(), error=None):
        self.fail, self.seen = set(fail), []
        self.error = ConnectionError("server unreachable") if error is None else error

    def __call__(self, request):
        self.seen.append(request.id)
        if request.id in self.fail:
            if isinstance(self.error, BaseException):
                raise self.error
            return self.error
        return make_answer(request)


def test_put_keeps_the_whole_request_in_order(outbox):
    requests = [make_ask(i, question=f"Qué {i}? ✓") for i in range(5)]
    ids = [outbox.put(r) for r in requests]
    assert ids == sorted(ids) and outbox.put(requests[2]) == ids[2]  # putting again changes nothing
    items = outbox.pending()
    assert [item.request for item in items] == requests and [item.id for item in items] == ids
    assert all(
        item.attempts == 0 and item.last_error is None and item.next_attempt_at is None for item in items
    )
    assert outbox.pending(limit=2) == items[:2]
    assert len(outbox) == 5 and outbox.counts() == {"pending": 5, "sent": 0, "dead": 0}


def test_put_refuses_what_could_never_be_sent(tmp_path):
    with Outbox(tmp_path / "o.db", max_message_bytes=2048) as box:
        with pytest.raises(ProtocolError, match="too_large"):
            box.put(make_ask(1, context="x" * 3000))
        assert len(box) == 0
        with pytest.raises(TypeError):
            box.put(encode(make_ask(1)))


def test_mark_sent_and_failed_bookkeeping(outbox):
    first, second = outbox.put(make_ask(1)), outbox.put(make_ask(2))
    assert outbox.mark_failed(first, "timeout after 5 s") == 1
    assert outbox.mark_failed(first, "connection refused") == 2
    item = outbox.pending()[0]
    assert (item.id, item.attempts, item.last_error) == (first, 2, "connection refused")
    assert item.last_attempt_at >= item.created_at
    reply = make_answer(make_ask(2))
    outbox.mark_sent(second, reply)
    assert [i.id for i in outbox.pending()] == [first]
    stored = outbox.db.conn.execute("SELECT reply FROM outbox WHERE id = ?", (second,)).fetchone()[0]
    assert decode(stored) == reply
    with pytest.raises(KeyError):
        outbox.mark_sent(999)
    with pytest.raises(KeyError):
        outbox.mark_failed(999, "x")


def test_drain_sends_in_order_and_stops_at_the_first_failure(outbox, clock):
    """A transient failure (the server is likely away) stops the drain; later items keep their order."""
    for i in range(6):
        outbox.put(make_ask(i))
    server = Server(fail={"r3"})
    result = outbox.drain(server)
    assert server.seen == ["r0", "r1", "r2", "r3"]  # nothing after the failure was tried
    assert (result.sent, result.remaining, result.set_aside) == (3, 3, 0)
    assert result.error == "ConnectionError: server unreachable"
    failed = outbox.pending()[0]
    assert (failed.request.id, failed.id, failed.attempts) == ("r3", result.failed_id, 1)
    assert failed.last_error == result.error
    assert [(i.request.id, i.attempts) for i in outbox.pending()] == [("r3", 1), ("r4", 0), ("r5", 0)]
    server.fail.clear()
    clock.now = failed.next_attempt_at  # its backoff is over
    result = outbox.drain(server)
    assert (result.sent, result.remaining, result.failed_id) == (3, 0, None)
    assert server.seen[4:] == ["r3", "r4", "r5"]
    assert outbox.counts() == {"pending": 0, "sent": 6, "dead": 0}


@pytest.mark.parametrize(
    "bad_reply, fragment",
    [
        (ErrorReply("r1", "overloaded", "busy"), "server error overloaded: busy"),
        (ErrorReply("r1", "internal", "store failed"), "server error internal: store failed"),
        (ErrorReply("r1", "unknown_context", "send the text"), "server error unknown_context"),
        (ProtocolError("overloaded", "busy", "r1"), "ProtocolError: overloaded: busy"),
        (OffloadUnavailable("no route"), "OffloadUnavailable: no route"),
        (TimeoutError("5 s"), "TimeoutError: 5 s"),
        (make_answer(make_ask(7)), "a reply to 'r7', not to 'r1'"),
    ],
)
def test_transient_failures_stop_the_drain_and_keep_the_item(outbox, bad_reply, fragment):
    """Transport errors, the server's transient codes and a reply to another id: retried later, not set aside."""
    for i in range(3):
        outbox.put(make_ask(i))
    server = Server(fail={"r1"}, error=bad_reply)
    result = outbox.drain(server)
    assert result.sent == 1 and fragment in result.error and result.set_aside == 0
    assert server.seen == ["r0", "r1"]
    assert [(i.request.id, i.attempts) for i in outbox.pending()] == [("r1", 1), ("r2", 0)]
    assert outbox.dead() == []


@pytest.mark.parametrize("code", sorted(CLIENT_FAULT_CODES))
@pytest.mark.parametrize("how", ["reply", "raise"])
def test_a_refusal_as_the_clients_fault_sets_the_item_aside_and_the_drain_goes_on(outbox, code, how, caplog):
    """Sending it again can never succeed: it must not block the items behind it, not even once."""
    for i in range(4):
        outbox.put(make_ask(i))
    refusal = (
        ErrorReply("r1", code, "no such thing")
        if how == "reply"
        else ProtocolError(code, "no such thing", "r1")
    )
    server = Server(fail={"r1"}, error=refusal)
    with caplog.at_level(logging.WARNING, logger="elma_utils.edge.outbox"):
        result = outbox.drain(server)
    assert server.seen == ["r0", "r1", "r2", "r3"]
    assert (result.sent, result.remaining, result.set_aside, result.failed_id) == (3, 0, 1, None)
    [dead] = outbox.dead()
    assert (dead.request.id, dead.attempts, dead.next_attempt_at) == ("r1", 1, None)
    assert dead.last_error.startswith(f"refused by the server as the client's fault ({code}): ")
    assert "no such thing" in dead.last_error
    assert outbox.counts() == {"pending": 0, "sent": 3, "dead": 1}
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "request r1 set aside" in record.getMessage() and dead.last_error in record.getMessage()
    assert outbox.drain(server).sent == 0 and server.seen[4:] == []  # never tried again by itself


def test_the_error_codes_split_into_client_faults_and_transient_ones():
    """The outbox retries exactly these; a new code must be placed on one side on purpose."""
    transient = ERROR_CODES - CLIENT_FAULT_CODES
    assert transient == {"overloaded", "internal", "unknown_context"}


def test_backoff_grows_per_item_is_capped_and_ends_in_setting_aside(tmp_path, clock, caplog):
    """Waits of base·2^k (k = earlier tries), at most the cap, plus ≤ 25 % jitter; a drain before then sends nothing."""
    with Outbox(
        tmp_path / "o.db", max_attempts=7, backoff_base_s=2.0, backoff_cap_s=20.0, clock=clock
    ) as box:
        box.put(make_ask(0))
        server = Server(fail={"r0"}, error=OffloadUnavailable("connection refused"))
        waits = []
        for attempt in range(1, 8):
            before = len(server.seen)
            with caplog.at_level(logging.WARNING, logger="elma_utils.edge.outbox"):
                result = box.drain(server)
            assert len(server.seen) == before + 1 and result.failed_id is not None
            if attempt == 7:
                break
            [item] = box.pending()
            assert item.attempts == attempt and item.last_attempt_at == clock.now
            waits.append(item.next_attempt_at - item.last_attempt_at)
            clock.now = item.next_attempt_at - 0.01  # not yet: the drain must not try it
            assert box.drain(server).sent == 0 and len(server.seen) == before + 1
            clock.now = item.next_attempt_at
        expected = [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
        assert all(e <= w <= 1.25 * e for w, e in zip(waits, expected, strict=True)), waits
        assert result.set_aside == 1 and box.pending() == []
        [dead] = box.dead()
        assert dead.attempts == 7
        assert (
            dead.last_error
            == "gave up after 7 failed attempts; the last: OffloadUnavailable: connection refused"
        )
        assert any("request r0 set aside: gave up after 7" in r.getMessage() for r in caplog.records)
        box.revive(dead.id)  # the operator's retry: at once, with a fresh budget
        [item] = box.pending()
        assert (item.attempts, item.next_attempt_at) == (0, None)
        server.fail.clear()
        assert box.drain(server).sent == 1


def test_an_item_waiting_out_its_backoff_does_not_hold_back_the_others(outbox, clock):
    """The server failed on r0 (say, "internal" on that question only): r1 and r2 still go, r0 after its wait."""
    for i in range(3):
        outbox.put(make_ask(i))
    server = Server(fail={"r0"}, error=ErrorReply("r0", "internal", "crashed on it"))
    assert outbox.drain(server).sent == 0
    server.fail.clear()
    clock.now += 0.5
    result = outbox.drain(server)
    assert (result.sent, result.remaining) == (2, 1) and server.seen == ["r0", "r1", "r2"]
    clock.now = outbox.pending()[0].next_attempt_at
    assert outbox.drain(server).sent == 1 and server.seen[3:] == ["r0"]


def test_outboxes_are_bounded_by_default(tmp_path, clock):
    """Made the way the CLI and the deployment make it, an outbox gives up after DEFAULT_MAX_ATTEMPTS."""
    with Outbox(tmp_path / "o.db", clock=clock) as box:
        assert box.max_attempts == DEFAULT_MAX_ATTEMPTS and 20 <= DEFAULT_MAX_ATTEMPTS <= 50
        box.put(make_ask(0))
        server = Server(fail={"r0"}, error=ErrorReply("r0", "overloaded", "busy"))
        drains = 0
        while box.pending():
            clock.now = box.pending()[0].next_attempt_at or clock.now
            box.drain(server)
            drains += 1
        assert drains == DEFAULT_MAX_ATTEMPTS and [d.attempts for d in box.dead()] == [DEFAULT_MAX_ATTEMPTS]
        assert clock.now - box.dead()[0].created_at >= 3600  # it kept trying for hours first


def test_an_interrupt_during_send_loses_nothing(outbox):
    outbox.put(make_ask(0))
    outbox.put(make_ask(1))
    with pytest.raises(KeyboardInterrupt):
        outbox.drain(Server(fail={"r1"}, error=KeyboardInterrupt()))
    assert [(i.request.id, i.attempts) for i in outbox.pending()] == [("r1", 0)]


def test_drain_limit(outbox):
    for i in range(5):
        outbox.put(make_ask(i))
    assert outbox.drain(Server(), limit=2).sent == 2
    assert [i.request.id for i in outbox.pending()] == ["r2", "r3", "r4"]


def test_dead_items_stop_blocking_and_can_be_revived(tmp_path):
    with Outbox(tmp_path / "o.db", max_attempts=2) as box:
        for i in range(3):
            box.put(make_ask(i))
        server = Server(fail={"r0"}, error=ErrorReply("r0", "bad_request", "nope"))
        assert box.drain(server).sent == 2  # r0 set aside at the first refusal, the others sent
        assert [i.request.id for i in box.dead()] == ["r0"]
        assert box.counts() == {"pending": 0, "sent": 2, "dead": 1}
        box.revive(box.dead()[0].id)
        assert [(i.request.id, i.attempts) for i in box.pending()] == [("r0", 0)]
        with pytest.raises(KeyError):
            box.revive(box.pending()[0].id)  # not dead
    with pytest.raises(ValueError):
        Outbox(tmp_path / "o2.db", max_attempts=0)


def test_describe_is_the_operators_view(tmp_path, clock):
    path = tmp_path / "o.db"
    with pytest.raises(FileNotFoundError):
        describe_outbox(path)
    with Outbox(path, clock=clock) as box:
        for i in range(3):
            box.put(make_ask(i, question=f"Question {i}?"))
        box.drain(Server(fail={"r1"}, error=ErrorReply("r1", "bad_request", "edge.end is past the end")))
        box.put(make_ask(3))
        box.drain(Server(fail={"r3"}, error=OffloadUnavailable("down")))
        next_at = box.pending()[0].next_attempt_at
    view = describe_outbox(path)  # opened anew, at real time: the backoff is long over
    assert view["counts"] == {"pending": 1, "sent": 2, "dead": 1}
    assert view["schema_version"] == 2 and view["max_attempts"] == DEFAULT_MAX_ATTEMPTS
    assert (view["next_attempt_at"], view["oldest_pending_at"]) == (next_at, clock.now)
    [dead] = view["dead"]
    assert (dead["request_id"], dead["question"], dead["attempts"]) == ("r1", "Question 1?", 1)
    assert dead["reason"] == "refused by the server as the client's fault (bad_request): " + (
        "server error bad_request: edge.end is past the end"
    )
    with Outbox(path, clock=clock) as box:
        assert box.describe()["waiting_for_backoff"] == 1


def test_purge_sent_and_reopen(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for i in range(4):
            box.put(make_ask(i))
        box.drain(Server(fail={"r2"}))
        assert box.purge_sent() == 2
    with Outbox(path) as box:  # state is in the file
        assert [(i.request.id, i.attempts) for i in box.pending()] == [("r2", 1), ("r3", 0)]
        assert box.counts() == {"pending": 2, "sent": 0, "dead": 0}
    with pytest.raises(ValueError, match="something else"):
        HardQuestionStore(path)  # an outbox is not a store


def test_concurrent_puts_and_drains_send_everything_once(outbox):
    sent: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def send(request):
        with lock:
            sent.append(request.id)
        return make_answer(request)

    def putter(t):
        for i in range(50):
            outbox.put(make_ask(t * 1000 + i))

    def drainer():
        while not done.is_set():
            outbox.drain(send)
        outbox.drain(send)

    putters = [threading.Thread(target=putter, args=(t,)) for t in range(4)]
    drainers = [threading.Thread(target=drainer) for _ in range(2)]
    for thread in putters + drainers:
        thread.start()
    for thread in putters:
        thread.join()
    done.set()
    for thread in drainers:
        thread.join()
    assert sorted(sent) == sorted(f"r{t * 1000 + i}" for t in range(4) for i in range(50))
    assert outbox.counts() == {"pending": 0, "sent": 200, "dead": 0}


# ---------------------------------------------------------------- schema version 1 → 2

_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_attempt_at REAL,
    sent_at REAL,
    reply BLOB
);
CREATE INDEX IF NOT EXISTS outbox_by_status ON outbox (status, id);
"""


def _write_v1_outbox(path) -> None:
    """An outbox file exactly as the version-1 code wrote it (WAL, its ids, its schema, its rows)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA application_id={OUTBOX_APPLICATION_ID}")
    db.execute("PRAGMA user_version=1")
    db.executescript(_V1_SCHEMA)
    rows = [
        (make_ask(0), "sent", 1, None),
        (make_ask(1), "dead", 5, "server error bad_request: nope"),
        (make_ask(2), "pending", 3, "ConnectionError: server unreachable"),
        (make_ask(3), "pending", 0, None),
    ]
    for request, status, attempts, error in rows:
        db.execute(
            "INSERT INTO outbox (request_id, device_id, payload, created_at, status, attempts, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (request.id, request.device_id, encode(request), 1000.0, status, attempts, error),
        )
    db.close()


def test_a_version_1_outbox_is_migrated_in_place(tmp_path, clock):
    """A device updated with items waiting keeps them: same rows, new column, version 2."""
    path = tmp_path / "v1.db"
    _write_v1_outbox(path)
    with Outbox(path, clock=clock) as box:
        conn = box.db.conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert "next_attempt_at" in [row[1] for row in conn.execute("PRAGMA table_info(outbox)")]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert box.counts() == {"pending": 2, "sent": 1, "dead": 1}
        pending = box.pending()
        assert [(i.request, i.attempts, i.next_attempt_at) for i in pending] == [
            (make_ask(2), 3, None),
            (make_ask(3), 0, None),
        ]
        assert box.dead()[0].last_error == "server error bad_request: nope"
        server = Server(fail={"r2"})
        box.drain(server)  # the new bookkeeping works on the old rows
        assert 8.0 <= box.pending()[0].next_attempt_at - clock.now <= 10.0  # 1 s · 2^3, jitter ≤ 25 %
    with Outbox(path) as box:  # opening again changes nothing
        assert box.db.conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert box.counts() == {"pending": 2, "sent": 1, "dead": 1}


def test_a_version_the_code_does_not_know_is_refused(tmp_path):
    path = tmp_path / "v9.db"
    _write_v1_outbox(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=9")
    db.close()
    with pytest.raises(ValueError, match="schema version 9, this code reads 2"):
        Outbox(path)


# ---------------------------------------------------------------- kill -9

_PUTTER = """
import sys
from offload_helpers import make_ask
from elma_utils.edge.outbox import Outbox
box = Outbox(sys.argv[1])
for i in range(100_000):
    print(box.put(make_ask(i, question=f"Killed question {i}?")), f"r{i}", flush=True)
"""

_DRAINER = """
import sys
from offload_helpers import make_answer
from elma_utils.edge.outbox import Outbox
box = Outbox(sys.argv[1])
def send(request):
    print(request.id, flush=True)  # the server has it from here on
    return make_answer(request)
box.drain(send)
"""


def test_acknowledged_puts_survive_kill_9(tmp_path):
    path = tmp_path / "outbox.db"
    acked = [line.split() for line in run_until_killed(_PUTTER, [str(path)], kill_after=40)]
    with Outbox(path) as box:
        assert box.db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        pending = {item.id: item for item in box.pending(limit=10**6)}
        for item_id, request_id in acked:
            item = pending[int(item_id)]
            assert item.request == make_ask(
                int(request_id[1:]), question=f"Killed question {request_id[1:]}?"
            )
        assert len(pending) in (len(acked), len(acked) + 1)


def test_kill_9_while_draining_loses_nothing(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for i in range(300):
            box.put(make_ask(i))
    delivered = set(run_until_killed(_DRAINER, [str(path)], kill_after=20))
    with Outbox(path) as box:
        assert box.db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = box.db.conn.execute("SELECT status, request_id FROM outbox ORDER BY id").fetchall()
    assert len(rows) == 300
    sent = {rid for status, rid in rows if status == "sent"}
    pending = [rid for status, rid in rows if status == "pending"]
    assert sent <= delivered  # marked sent only after send_fn returned
    assert len(delivered - sent) <= 1  # at most the one in flight, still pending (the server dedupes it)
    assert pending == [f"r{i}" for i in range(len(sent), 300)]  # in order, nothing skipped
