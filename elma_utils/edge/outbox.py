"""The edge device's outbox: offloads that could not be sent yet, kept until the server has them.

When the server is unreachable or too slow, the edge answers the user with its own answer
and ``put``s the ``AskRequest`` here (the request carries that local answer in its
``edge`` field), exactly as it would have been sent. ``drain(send_fn)`` later sends what is
pending, oldest first; an item leaves the pending list only once ``send_fn`` has returned
for it. A failed send is one of two kinds:

- the server refused the request as the client's fault (an error code in
  ``CLIENT_FAULT_CODES``: malformed, too_large, bad_request, …). Sending it again can never
  succeed, so the item is *set aside* at once (status ``dead``, its reason in
  ``last_error``, a WARNING in the log, listed by ``dead()``) and the drain goes on with the
  next item: one bad question never blocks the queue.
- anything else is transient (the transport failed, or the server answered ``overloaded``,
  ``internal`` or ``unknown_context``): the drain stops there (the server is likely away)
  and the item waits ``min(backoff_cap_s, backoff_base_s * 2**attempts)`` seconds, plus up
  to 25% jitter, before a drain tries it again; after ``max_attempts`` failed sends it is
  set aside too. A drain sends the items that are due, in order, and passes over those
  still waiting out their backoff, so an item the server keeps failing on cannot hold the
  ones behind it either.

``revive`` puts a set-aside item back in the queue (the operator's retry); ``describe()``
and ``describe_outbox(path)`` give the operator's view.

Durability as in the server's store (WAL, ``synchronous=FULL``, one transaction per
change): an item that ``put`` returned survives ``kill -9`` and power loss. An item may be
sent twice (the process dies between the send and ``mark_sent``); the server recognises
the repeated (device_id, request id) and does not store it twice.

Schema versions: 2 added ``next_attempt_at`` (the backoff); a version-1 file is migrated in
place, in one transaction, when it is opened.

Threads: one connection under a lock, as in the store; ``drain`` runs one at a time and
holds no database lock while ``send_fn`` runs, so the device can keep ``put``ting meanwhile.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elma_utils.edge.protocol import (
    CLIENT_FAULT_CODES,
    MAX_MESSAGE_BYTES,
    AnswerReply,
    AskRequest,
    ErrorReply,
    decode,
    encode,
)
from elma_utils.server.store import DurableSqlite

log = logging.getLogger(__name__)

OUTBOX_APPLICATION_ID = 0x454C4D4F  # "ELMO" in PRAGMA application_id: the file is an edge outbox
OUTBOX_SCHEMA_VERSION = 2
STATUSES = ("pending", "sent", "dead")  # "dead": set aside, see dead()
DEFAULT_MAX_ATTEMPTS = 30  # transient failures before an item is set aside (about 3.5 h of backoff)
DEFAULT_BACKOFF_BASE_S = 1.0
DEFAULT_BACKOFF_CAP_S = 600.0
BACKOFF_JITTER = 0.25  # a wait is the backoff times 1 to 1 + BACKOFF_JITTER, so devices do not retry in step

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    payload BLOB NOT NULL,            -- the request's protocol line, as it goes on the wire
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,                  -- for a dead item, why it was set aside
    last_attempt_at REAL,
    sent_at REAL,
    reply BLOB,                       -- the server's answer line, when send_fn returned one
    next_attempt_at REAL              -- a pending item is not sent before this (backoff), NULL: at once
);
CREATE INDEX IF NOT EXISTS outbox_by_status ON outbox (status, id);
-- how many questions this device answered with each model version (EdgeQA's count, edge.asked),
-- kept so that a restart goes on counting (created on older outboxes too when opened)
CREATE TABLE IF NOT EXISTS asked_counts (
    model_version TEXT PRIMARY KEY,
    asked INTEGER NOT NULL
);
"""

# Statements that bring a file of schema version v to version v + 1.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE outbox ADD COLUMN next_attempt_at REAL",),
}

SendFn = Callable[[AskRequest], AnswerReply | ErrorReply | None]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    request: AskRequest
    created_at: float
    attempts: int
    last_error: str | None
    last_attempt_at: float | None
    next_attempt_at: float | None = None  # pending: not sent before this (None: at once)


@dataclass(frozen=True)
class DrainResult:
    sent: int  # items sent (and marked) by this drain
    remaining: int  # items still pending afterwards (those waiting out a backoff included)
    failed_id: int | None = None  # the item whose transient failure stopped the drain
    error: str | None = None
    set_aside: int = 0  # items set aside by this drain (refused as the client's fault, or out of attempts)


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """The wait, jitter left out, after a transient failure of an item already tried ``attempts`` times."""
    return min(cap_s, base_s * 2.0 ** min(attempts, 64))


class Outbox:
    """Offloads waiting to be sent, in an SQLite file.

    ``max_attempts``: transient failures after which an item is set aside (None: retry for
    ever; a refusal as the client's fault sets it aside at once either way).
    ``backoff_base_s``/``backoff_cap_s``: the exponential backoff between tries of one item.
    ``clock``: wall-clock seconds, ``time.time`` (a test may pass its own to skip waiting).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_attempts: int | None = DEFAULT_MAX_ATTEMPTS,
        backoff_base_s: float = DEFAULT_BACKOFF_BASE_S,
        backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1 or None, got {max_attempts}")
        if not 0.0 <= backoff_base_s <= backoff_cap_s:
            raise ValueError(
                f"need 0 ≤ backoff_base_s ≤ backoff_cap_s, got {backoff_base_s}, {backoff_cap_s}"
            )
        self.max_attempts = max_attempts
        self.backoff_base_s, self.backoff_cap_s = float(backoff_base_s), float(backoff_cap_s)
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self._rng = random.Random()
        migrate_outbox(path, timeout=timeout)
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

    def asked_count(self, model_version: str) -> int:
        """The questions answered with ``model_version`` so far, as last saved (0: none)."""
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT asked FROM asked_counts WHERE model_version = ?", (model_version,)
            ).fetchone()
        return int(row[0]) if row else 0

    def save_asked_count(self, model_version: str, asked: int) -> None:
        """Keep the count (never lowered: a late writer with an older count changes nothing)."""
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO asked_counts (model_version, asked) VALUES (?, ?) ON CONFLICT (model_version)"
                " DO UPDATE SET asked = max(asked, excluded.asked)",
                (model_version, int(asked)),
            )

    def put(self, request: AskRequest) -> int:
        """Keep ``request`` until it is sent; returns its item id (the existing one if already put).

        Raises ``ProtocolError("too_large")`` for a request that could never be sent, and
        ``sqlite3.OperationalError`` when the file cannot be written (disk full, read-only).
        """
        if not isinstance(request, AskRequest):
            raise TypeError(f"put() takes an AskRequest, got {type(request).__name__}")
        payload = encode(request, self.max_message_bytes)
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO outbox (request_id, device_id, payload, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (request_id) DO NOTHING",
                (request.id, request.device_id, payload, self.clock()),
            )
            return conn.execute("SELECT id FROM outbox WHERE request_id = ?", (request.id,)).fetchone()[0]

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` pending items, oldest first (those waiting out a backoff included)."""
        return self._items("status = 'pending'", (), limit)

    def due(self, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` pending items whose backoff is over, oldest first: what a drain sends."""
        where = "status = 'pending' AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
        return self._items(where, (self.clock(),), limit)

    def dead(self, limit: int = 100) -> list[OutboxItem]:
        """Items set aside, oldest first; ``last_error`` says why (refused by the server, or out of attempts)."""
        return self._items("status = 'dead'", (), limit)

    def _items(self, where: str, args: tuple, limit: int) -> list[OutboxItem]:
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT id, payload, created_at, attempts, last_error, last_attempt_at, next_attempt_at"
                f" FROM outbox WHERE {where} ORDER BY id LIMIT ?",
                (*args, int(limit)),
            ).fetchall()
        items = []
        for item_id, payload, created, attempts, last_error, last_attempt, next_attempt in rows:
            request = decode(payload, max_bytes=len(payload) + 1)  # put() wrote it: only corruption fails
            assert isinstance(request, AskRequest)
            items.append(
                OutboxItem(item_id, request, created, attempts, last_error, last_attempt, next_attempt)
            )
        return items

    def mark_sent(self, item_id: int, reply: AnswerReply | None = None) -> None:
        """The server has the item (``reply``, its answer, is kept when given)."""
        line = None if reply is None else encode(reply, 1 << 30)
        now = self.clock()
        with self.db.write() as conn:
            cursor = conn.execute(
                "UPDATE outbox SET status = 'sent', sent_at = ?, reply = ?, attempts = attempts + 1,"
                " last_attempt_at = ?, next_attempt_at = NULL WHERE id = ?",
                (now, line, now, item_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"no outbox item {item_id}")

    def mark_failed(self, item_id: int, error: str) -> int:
        """Count one transient failure of an item; returns its attempts so far.

        The item is not tried again before its backoff is over; reaching ``max_attempts``
        sets it aside.
        """
        now = self.clock()
        reason = None  # why the item was set aside, when it was
        with self.db.write() as conn:
            row = conn.execute("SELECT attempts, request_id FROM outbox WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise KeyError(f"no outbox item {item_id}")
            attempts, request_id = row[0] + 1, row[1]
            wait = backoff_s(row[0], self.backoff_base_s, self.backoff_cap_s)
            wait *= 1.0 + BACKOFF_JITTER * self._rng.random()
            conn.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, last_attempt_at = ?, next_attempt_at = ?"
                " WHERE id = ?",
                (attempts, str(error)[:2000], now, now + wait, item_id),
            )
            if self.max_attempts is not None and attempts >= self.max_attempts:
                reason = f"gave up after {attempts} failed attempts; the last: {error}"
                if not self._set_aside(conn, item_id, reason):
                    reason = None  # not pending (set aside meanwhile)
        if reason is not None:
            log.warning("outbox %s: request %s set aside: %s", self.path, request_id, reason)
        else:
            log.info("outbox %s: request %s failed (attempt %d), next try in %.1f s: %s", self.path,
                     request_id, attempts, wait, error)  # fmt: skip
        return attempts

    def set_aside(self, item_id: int, reason: str) -> None:
        """Give up on a pending item that can never be sent (the server refused it as the client's fault).

        It counts as one attempt; ``reason`` is kept in ``last_error`` and logged (WARNING).
        """
        now = self.clock()
        with self.db.write() as conn:
            row = conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ? WHERE id = ? RETURNING request_id",
                (now, item_id),
            ).fetchone()
            if row is None:
                raise KeyError(f"no outbox item {item_id}")
            changed = self._set_aside(conn, item_id, reason)
        if changed:
            log.warning("outbox %s: request %s set aside: %s", self.path, row[0], reason)

    @staticmethod
    def _set_aside(conn: sqlite3.Connection, item_id: int, reason: str) -> bool:
        cursor = conn.execute(
            "UPDATE outbox SET status = 'dead', last_error = ?, next_attempt_at = NULL"
            " WHERE id = ? AND status = 'pending'",
            (str(reason)[:2000], item_id),
        )
        return cursor.rowcount == 1

    def revive(self, item_id: int) -> None:
        """Put a set-aside item back in the queue (in its old place), its attempts reset (the operator's retry)."""
        with self.db.write() as conn:
            cursor = conn.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = NULL"
                " WHERE id = ? AND status = 'dead'",
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
                "DELETE FROM outbox WHERE status = 'sent' AND sent_at <= ?", (self.clock() - older_than_s,)
            )
        return cursor.rowcount

    def describe(self, dead_limit: int = 20) -> dict[str, Any]:
        """The operator's view: counts, what waits and until when, and the set-aside items with their reasons."""
        now = self.clock()
        with self.db.read() as conn:
            waiting, next_at, oldest = conn.execute(
                "SELECT coalesce(sum(next_attempt_at > ?), 0), min(next_attempt_at), min(created_at)"
                " FROM outbox WHERE status = 'pending'",
                (now,),
            ).fetchone()
        dead = [
            {
                "id": item.id,
                "request_id": item.request.id,
                "question": item.request.question,
                "attempts": item.attempts,
                "reason": item.last_error,
                "last_attempt_at": item.last_attempt_at,
            }
            for item in self.dead(dead_limit)
        ]
        return {
            "path": str(self.path),
            "schema_version": OUTBOX_SCHEMA_VERSION,
            "counts": self.counts(),
            "waiting_for_backoff": waiting,
            "next_attempt_at": next_at,
            "oldest_pending_at": oldest,
            "max_attempts": self.max_attempts,
            "dead": dead,
        }

    def drain(self, send_fn: SendFn, limit: int | None = None) -> DrainResult:
        """Send the due items in order with ``send_fn`` until done, ``limit`` sent, or a transient failure.

        ``send_fn(request)`` returns the server's ``AnswerReply`` (kept), or None, once the
        server has the request. A refusal as the client's fault (an ``ErrorReply``
        returned, or an exception raised, whose ``code`` is in ``CLIENT_FAULT_CODES``) sets
        the item aside and the drain goes on. Any other exception or ``ErrorReply``, or a
        reply to another id, is transient: counted on the item (``attempts``,
        ``last_error``, its backoff), and the drain stops, the later items left pending in
        their order. An exception that is not an ``Exception`` (KeyboardInterrupt)
        propagates, leaving the item pending and uncounted.
        """
        with self._drain_lock:
            sent = set_aside = 0
            while limit is None or sent < limit:
                batch = self.due(100 if limit is None else min(100, limit - sent))
                if not batch:
                    break
                for item in batch:
                    outcome, error = self._send_one(send_fn, item)
                    if outcome == "sent":
                        sent += 1
                    elif outcome == "set_aside":
                        set_aside += 1
                    else:
                        if outcome == "gave_up":
                            set_aside += 1
                        return DrainResult(sent, len(self), item.id, error, set_aside)
            return DrainResult(sent, len(self), set_aside=set_aside)

    def _send_one(self, send_fn: SendFn, item: OutboxItem) -> tuple[str, str | None]:
        """Send one item and mark it: ("sent", None), ("set_aside", why), ("retry", error) or ("gave_up", error)."""
        try:
            reply = send_fn(item.request)
        except Exception as exc:  # a failure of the transport or the server: sorted out below
            error, code = f"{type(exc).__name__}: {exc}", getattr(exc, "code", None)
        else:
            code = None
            if isinstance(reply, ErrorReply):
                error, code = f"server error {reply.code}: {reply.message}", reply.code
            elif reply is not None and getattr(reply, "id", None) != item.request.id:
                error = (
                    f"send_fn returned a reply to {getattr(reply, 'id', None)!r}, not to {item.request.id!r}"
                )
            elif reply is not None and not isinstance(reply, AnswerReply):
                error = f"send_fn returned a {type(reply).__name__}, not an AnswerReply"
            else:
                self.mark_sent(item.id, reply)
                return "sent", None
        if isinstance(code, str) and code in CLIENT_FAULT_CODES:
            reason = f"refused by the server as the client's fault ({code}): {error}"
            self.set_aside(item.id, reason)
            return "set_aside", reason
        attempts = self.mark_failed(item.id, error)
        gave_up = self.max_attempts is not None and attempts >= self.max_attempts
        return ("gave_up" if gave_up else "retry"), error


def migrate_outbox(path: str | os.PathLike, *, timeout: float = 30.0) -> int | None:
    """Bring an outbox file of an older schema version to ``OUTBOX_SCHEMA_VERSION``, in place.

    All steps run in one transaction, so a crash leaves the old version whole. Returns the
    version found (None: no file, or not an outbox; opening it says what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout, isolation_level=None
        )
    except sqlite3.Error:
        return None
    try:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            found = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError:
            return None  # not SQLite: DurableSqlite reports it
        if app_id != OUTBOX_APPLICATION_ID or not 1 <= found < OUTBOX_SCHEMA_VERSION:
            return found if app_id == OUTBOX_APPLICATION_ID else None
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
            while version < OUTBOX_SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
            conn.execute(f"PRAGMA user_version={int(version)}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise sqlite3.OperationalError(
                f"{path}: cannot migrate the outbox from schema version {found} to "
                f"{OUTBOX_SCHEMA_VERSION}: {exc}"
            ) from exc
        log.info("outbox %s: migrated from schema version %d to %d", path, found, OUTBOX_SCHEMA_VERSION)
        return found
    finally:
        conn.close()


def describe_outbox(path: str | os.PathLike, dead_limit: int = 20) -> dict[str, Any]:
    """``Outbox.describe()`` of the outbox file at ``path`` (for ``elma outbox``); it must exist."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no outbox at {path}")
    with Outbox(path) as box:
        return box.describe(dead_limit)
