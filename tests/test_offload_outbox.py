"""The edge outbox: order, failures that keep items, dead items, kill -9 while putting and draining."""

from __future__ import annotations

import threading

import pytest
from offload_helpers import make_answer, make_ask, run_until_killed

from elma_utils.offload.outbox import Outbox
from elma_utils.offload.protocol import ErrorReply, ProtocolError, decode, encode
from elma_utils.offload.store import HardQuestionStore


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.db") as box:
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
    assert all(item.attempts == 0 and item.last_error is None for item in items)
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


def test_drain_sends_in_order_and_stops_at_the_first_failure(outbox):
    for i in range(6):
        outbox.put(make_ask(i))
    server = Server(fail={"r3"})
    result = outbox.drain(server)
    assert server.seen == ["r0", "r1", "r2", "r3"]  # nothing after the failure was tried
    assert (result.sent, result.remaining) == (3, 3)
    assert result.error == "ConnectionError: server unreachable"
    failed = outbox.pending()[0]
    assert (failed.request.id, failed.id, failed.attempts) == ("r3", result.failed_id, 1)
    assert failed.last_error == result.error
    assert [i.request.id for i in outbox.pending()] == ["r3", "r4", "r5"]
    server.fail.clear()
    result = outbox.drain(server)
    assert (result.sent, result.remaining, result.failed_id) == (3, 0, None)
    assert server.seen[4:] == ["r3", "r4", "r5"]
    assert outbox.counts() == {"pending": 0, "sent": 6, "dead": 0}


@pytest.mark.parametrize(
    "bad_reply, fragment",
    [
        (ErrorReply("r1", "overloaded", "busy"), "server error overloaded: busy"),
        (make_answer(make_ask(7)), "a reply to 'r7', not to 'r1'"),
    ],
)
def test_drain_counts_error_replies_as_failures(outbox, bad_reply, fragment):
    outbox.put(make_ask(0))
    outbox.put(make_ask(1))
    result = outbox.drain(Server(fail={"r1"}, error=bad_reply))
    assert result.sent == 1 and fragment in result.error
    assert [(i.request.id, i.attempts) for i in outbox.pending()] == [("r1", 1)]


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
        assert box.drain(server).sent == 0
        assert box.drain(server).sent == 0  # second failure: r0 is set aside
        assert [i.request.id for i in box.dead()] == ["r0"]
        assert box.drain(server).sent == 2
        assert box.counts() == {"pending": 0, "sent": 2, "dead": 1}
        box.revive(box.dead()[0].id)
        assert [(i.request.id, i.attempts) for i in box.pending()] == [("r0", 0)]
        with pytest.raises(KeyError):
            box.revive(box.pending()[0].id)  # not dead
    with pytest.raises(ValueError):
        Outbox(tmp_path / "o2.db", max_attempts=0)


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


# ---------------------------------------------------------------- kill -9

_PUTTER = """
import sys
from offload_helpers import make_ask
from elma_utils.offload.outbox import Outbox
box = Outbox(sys.argv[1])
for i in range(100_000):
    print(box.put(make_ask(i, question=f"Killed question {i}?")), f"r{i}", flush=True)
"""

_DRAINER = """
import sys
from offload_helpers import make_answer
from elma_utils.offload.outbox import Outbox
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
