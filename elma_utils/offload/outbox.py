"""The edge device's outbox: offloads that could not be sent yet, kept until the server has them.

When the server is unreachable or too slow, the edge answers the user with its own answer
and ``put``s the ``AskRequest`` here (the request carries that local answer in its
``edge`` field), exactly as it would have been sent. ``drain(send_fn)`` later sends what is
pending, oldest first, and stops at the first failure so the order is kept and nothing is
skipped; an item leaves the pending list only once ``send_fn`` has returned for it.

Durability as in the server's store (WAL, ``synchronous=FULL``, one transaction per
change): an item that ``put`` returned survives ``kill -9`` and power loss. An item may be
sent twice (the process dies between the send and ``mark_sent``); the server recognises
the repeated (device_id, request id) and does not store it twice.

Threads: one connection under a lock, as in the store; ``drain`` runs one at a time and
holds no database lock while ``send_fn`` runs, so the device can keep ``put``ting meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from elma_utils.offload.protocol import (
    MAX_MESSAGE_BYTES,
    AnswerReply,
    AskRequest,
    ErrorReply,
    decode,
    encode,
)
from elma_utils.offload.store import DurableSqlite

OUTBOX_APPLICATION_ID = 0x454C4D4F  # "ELMO" in PRAGMA application_id: the file is an edge outbox
OUTBOX_SCHEMA_VERSION = 1
STATUSES = ("pending", "sent", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    payload BLOB NOT NULL,            -- the request's protocol line, as it goes on the wire
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_attempt_at REAL,
    sent_at REAL,
    reply BLOB                        -- the server's answer line, when send_fn returned one
);
CREATE INDEX IF NOT EXISTS outbox_by_status ON outbox (status, id);
"""

SendFn = Callable[[AskRequest], AnswerReply | ErrorReply | None]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    request: AskRequest
    created_at: float
    attempts: int
    last_error: str | None
    last_attempt_at: float | None


@dataclass(frozen=True)
class DrainResult:
    sent: int  # items sent (and marked) by this drain
    remaining: int  # items still pending afterwards
    failed_id: int | None = None  # the item whose send failed, which stopped the drain
    error: str | None = None


class Outbox:
    """Offloads waiting to be sent, in an SQLite file.

    ``max_attempts``: after that many failed sends an item is set aside as "dead" (listed by
    ``dead()``, no longer pending) so one request the server always refuses cannot block
    the rest for ever; None keeps retrying for ever.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_attempts: int | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        timeout: float = 30.0,
    ):
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1 or None, got {max_attempts}")
        self.max_attempts = max_attempts
        self.max_message_bytes = max_message_bytes
        self.db = DurableSqlite(
            path,
            application_id=OUTBOX_APPLICATION_ID,
            schema=_SCHEMA,
            version=OUTBOX_SCHEMA_VERSION,
            timeout=timeout,
        )
        self.path = self.db.path
        self._drain_lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, request: AskRequest) -> int:
        """Keep ``request`` until it is sent; returns its item id (the existing one if already put).

        Raises ``ProtocolError("too_large")`` for a request that could never be sent.
        """
        if not isinstance(request, AskRequest):
            raise TypeError(f"put() takes an AskRequest, got {type(request).__name__}")
        payload = encode(request, self.max_message_bytes)
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO outbox (request_id, device_id, payload, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (request_id) DO NOTHING",
                (request.id, request.device_id, payload, time.time()),
            )
            return conn.execute("SELECT id FROM outbox WHERE request_id = ?", (request.id,)).fetchone()[0]

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` pending items, oldest first."""
        return self._items("pending", limit)

    def dead(self, limit: int = 100) -> list[OutboxItem]:
        """Items given up after ``max_attempts`` failed sends, oldest first."""
        return self._items("dead", limit)

    def _items(self, status: str, limit: int) -> list[OutboxItem]:
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT id, payload, created_at, attempts, last_error, last_attempt_at FROM outbox"
                " WHERE status = ? ORDER BY id LIMIT ?",
                (status, int(limit)),
            ).fetchall()
        items = []
        for item_id, payload, created, attempts, last_error, last_attempt in rows:
            request = decode(payload, max_bytes=len(payload) + 1)  # put() wrote it: only corruption fails
            assert isinstance(request, AskRequest)
            items.append(OutboxItem(item_id, request, created, attempts, last_error, last_attempt))
        return items

    def mark_sent(self, item_id: int, reply: AnswerReply | None = None) -> None:
        """The server has the item (``reply``, its answer, is kept when given)."""
        line = None if reply is None else encode(reply, 1 << 30)
        with self.db.write() as conn:
            cursor = conn.execute(
                "UPDATE outbox SET status = 'sent', sent_at = ?, reply = ?,"
                " attempts = attempts + 1, last_attempt_at = ? WHERE id = ?",
                (time.time(), line, time.time(), item_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no outbox item {item_id}")

    def mark_failed(self, item_id: int, error: str) -> int:
        """Count one failed send of a pending item; returns its attempts so far.

        Reaching ``max_attempts`` sets the item aside as dead.
        """
        with self.db.write() as conn:
            row = conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, last_attempt_at = ?"
                " WHERE id = ? RETURNING attempts",
                (str(error)[:2000], time.time(), item_id),
            ).fetchone()
            if row is None:
                raise KeyError(f"no outbox item {item_id}")
            if self.max_attempts is not None and row[0] >= self.max_attempts:
                conn.execute(
                    "UPDATE outbox SET status = 'dead' WHERE id = ? AND status = 'pending'", (item_id,)
                )
        return row[0]

    def revive(self, item_id: int) -> None:
        """Put a dead item back in the queue (in its old place), its attempts reset."""
        with self.db.write() as conn:
            cursor = conn.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0 WHERE id = ? AND status = 'dead'",
                (item_id,),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no dead outbox item {item_id}")

    def counts(self) -> dict[str, int]:
        """Items per status ("pending", "sent", "dead")."""
        with self.db.read() as conn:
            found = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
        return {status: found.get(status, 0) for status in STATUSES}

    def __len__(self) -> int:
        """Pending items."""
        return self.counts()["pending"]

    def purge_sent(self, older_than_s: float = 0.0) -> int:
        """Delete items sent more than ``older_than_s`` seconds ago; returns how many."""
        with self.db.write() as conn:
            cursor = conn.execute(
                "DELETE FROM outbox WHERE status = 'sent' AND sent_at <= ?", (time.time() - older_than_s,)
            )
        return cursor.rowcount

    def drain(self, send_fn: SendFn, limit: int | None = None) -> DrainResult:
        """Send pending items in order with ``send_fn`` until done, ``limit`` sent, or a failure.

        ``send_fn(request)`` returns the server's ``AnswerReply`` (kept), or None, once the
        server has the request; raising, or returning an ``ErrorReply`` or a reply to
        another id, is a failure: it is counted on the item (``attempts``, ``last_error``),
        the drain stops, and that item and all later ones stay pending. An exception that
        is not an ``Exception`` (KeyboardInterrupt) propagates, leaving the item pending.
        """
        with self._drain_lock:
            sent = 0
            while limit is None or sent < limit:
                batch = self.pending(100 if limit is None else min(100, limit - sent))
                if not batch:
                    break
                for item in batch:
                    error = self._send_one(send_fn, item)
                    if error is not None:
                        return DrainResult(sent, len(self), item.id, error)
                    sent += 1
            return DrainResult(sent, len(self))

    def _send_one(self, send_fn: SendFn, item: OutboxItem) -> str | None:
        """Send one item and mark it; returns the error text when it failed."""
        try:
            reply = send_fn(item.request)
        except Exception as exc:  # any failure of the transport or the server: keep the item
            error = f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(reply, ErrorReply):
                error = f"server error {reply.code}: {reply.message}"
            elif reply is not None and getattr(reply, "id", None) != item.request.id:
                error = (
                    f"send_fn returned a reply to {getattr(reply, 'id', None)!r}, not to {item.request.id!r}"
                )
            elif reply is not None and not isinstance(reply, AnswerReply):
                error = f"send_fn returned a {type(reply).__name__}, not an AnswerReply"
            else:
                self.mark_sent(item.id, reply)
                return None
        self.mark_failed(item.id, error)
        return error
