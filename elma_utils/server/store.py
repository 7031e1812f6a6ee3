"""The server's store of offloaded (hard) questions, and the training data grown from it.

Every question an edge device offloads is recorded with the edge's answer (span, exit layer,
per-layer entropies) and the server's answer, in one SQLite file. ``export_squad`` turns
the store into SQuAD json with the server answers as pseudo-labels, split by context, to
retrain or distil the edge model.

The devices' counts: an ask may carry ``edge.asked``, how many questions the device answered
with its model version; ``device_counts`` keeps the largest per device and version (the
denominator of the offload threshold's price, ``questions_asked``).

Durability: WAL journal and ``synchronous=FULL``, one transaction per record, so a record
that ``record`` returned survives a crash or ``kill -9`` of the server.

Threads: one connection shared under a lock (``check_same_thread=False``). SQLite allows
one writer at a time even in WAL mode and every write here fsyncs, so a connection per
thread would add no write throughput, only SQLITE_BUSY waits between the server's own
threads and connections that nobody can close when their thread ends. Other processes
(an export or a report while the server runs) are safe too: WAL lets them read while the
server writes, and a writer waits up to ``timeout`` seconds for the lock.

Duplicates, two kinds:
- a *retry*: the same (device_id, request id) again, e.g. a client that lost the reply and
  sent the request once more. Nothing new is stored; ``record`` returns the first row's id
  with ``duplicate=True`` (and the row's ``retries`` count goes up). The same ids with
  different content (question, context, edge answer) are not a retry but a conflict:
  ``ProtocolError("conflict")``, and the stored row stays as it was.
- a *repeated question*: the same question on the same context in another request (from
  any device). It is stored as a new offload (its own edge and server answers), but all
  such offloads share one row of the questions table, whose ``times_asked`` counts them,
  and the export holds the question once. Questions match after Unicode NFKC
  normalisation, case folding, collapsing whitespace and dropping trailing question marks
  (``question_key``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import tempfile
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from elma_utils.edge.protocol import AnswerReply, AskRequest, ProtocolError, context_ref

log = logging.getLogger(__name__)

STORE_APPLICATION_ID = 0x454C4D53  # "ELMS" in PRAGMA application_id: the file is a hard-question store
STORE_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    sha256 TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS questions (
    id INTEGER PRIMARY KEY,
    context_sha256 TEXT NOT NULL REFERENCES contexts(sha256),
    question_key TEXT NOT NULL,
    question TEXT NOT NULL,            -- the wording of the first request
    times_asked INTEGER NOT NULL,      -- offloads (not retries) of this question on this context
    first_asked REAL NOT NULL,
    last_asked REAL NOT NULL,
    UNIQUE (context_sha256, question_key)
);
CREATE TABLE IF NOT EXISTS offloads (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    question_id INTEGER NOT NULL REFERENCES questions(id),
    question TEXT NOT NULL,
    context_sha256 TEXT NOT NULL REFERENCES contexts(sha256),
    edge_text TEXT NOT NULL,
    edge_start INTEGER,
    edge_end INTEGER,
    edge_exit_layer INTEGER,
    edge_entropies TEXT NOT NULL,      -- JSON list, one entropy per computed layer
    edge_model_version TEXT NOT NULL,
    server_text TEXT NOT NULL,
    server_start INTEGER,
    server_end INTEGER,
    server_score REAL NOT NULL,
    no_answer INTEGER NOT NULL,
    server_model_version TEXT NOT NULL,
    server_ms REAL NOT NULL,
    received_at REAL NOT NULL,
    retries INTEGER NOT NULL DEFAULT 0, -- the same request received again
    UNIQUE (device_id, request_id)
);
CREATE INDEX IF NOT EXISTS offloads_by_question ON offloads (question_id, received_at);
-- what each device says it asked with each model version (edge.asked, the largest one seen):
-- the denominator of an offload threshold's price (created on older stores too when opened)
CREATE TABLE IF NOT EXISTS device_counts (
    device_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    asked INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (device_id, model_version)
);
"""


# ---------------------------------------------------------------- durable SQLite (also used by the outbox)


class DurableSqlite:
    """One SQLite connection (WAL, synchronous=FULL, foreign keys) shared by threads under a lock.

    ``application_id`` marks what the file is, so a store is never opened as an outbox or
    the other way round; ``schema`` is run (idempotently) every time the file is opened, so a
    table added to it later is created in older files too.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        application_id: int,
        schema: str,
        version: int,
        timeout: float = 30.0,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._set_up(application_id, schema, version)
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise sqlite3.DatabaseError(f"{self.path}: cannot open as an SQLite database: {exc}") from exc
        except BaseException:
            self.conn.close()
            raise

    def _set_up(self, application_id: int, schema: str, version: int) -> None:
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("%s: SQLite refused WAL mode (journal_mode=%s)", self.path, mode)
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.write() as conn:
            found = conn.execute("PRAGMA application_id").fetchone()[0]
            n_tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
            if found == 0 and n_tables == 0:
                conn.execute(f"PRAGMA application_id={int(application_id)}")
                conn.execute(f"PRAGMA user_version={int(version)}")
            elif found != application_id:
                raise ValueError(
                    f"{self.path}: this SQLite file is something else (application_id {found:#x}, "
                    f"expected {application_id:#x})"
                )
            else:
                found_version = conn.execute("PRAGMA user_version").fetchone()[0]
                if found_version != version:
                    raise ValueError(
                        f"{self.path}: schema version {found_version}, this code reads {version}"
                    )
            for statement in schema.split(";"):
                if statement.strip():
                    conn.execute(statement)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed, and on disk, when the block ends."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        with self._lock:
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                if self.conn.in_transaction:
                    self.conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.conn.close()


# ---------------------------------------------------------------- the store


def question_key(question: str) -> str:
    """What two questions must share to count as the same: case, spacing and trailing '?' ignored."""
    text = " ".join(unicodedata.normalize("NFKC", question).casefold().split())
    return text.rstrip("? ") or text  # a question of only "?" keeps them


@dataclass(frozen=True)
class RecordResult:
    row_id: int  # the offload's row (the first one, for a retry)
    duplicate: bool  # a retry of a stored request: nothing new was written
    question_id: int
    times_asked: int  # offloads of this question on this context so far, this one included

    @property
    def repeated_question(self) -> bool:
        """The question had been offloaded before (by any device)."""
        return self.times_asked > 1


@dataclass
class StoreStats:
    offloads: int = 0  # stored requests (retries not counted)
    questions: int = 0  # distinct questions (per context)
    contexts: int = 0
    retries: int = 0  # requests received again after being stored
    repeated: int = 0  # offloads of a question that was already stored
    no_answer: int = 0  # offloads the server found unanswerable
    per_device: dict[str, int] = field(default_factory=dict)
    per_exit_layer: dict[int | None, int] = field(default_factory=dict)  # None: no edge layer answered


def store_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """The store's counts on an open connection (``stats`` and the read-only ``elma status``)."""

    def one(sql: str) -> int:
        return conn.execute(sql).fetchone()[0] or 0

    return {
        "offloads": one("SELECT count(*) FROM offloads"),
        "questions": one("SELECT count(*) FROM questions"),
        "contexts": one("SELECT count(*) FROM contexts"),
        "retries": one("SELECT sum(retries) FROM offloads"),
        "repeated": one("SELECT sum(times_asked - 1) FROM questions"),
        "no_answer": one("SELECT count(*) FROM offloads WHERE no_answer"),
    }


@dataclass
class ExportSummary:
    train_questions: int = 0
    eval_questions: int = 0
    train_contexts: int = 0
    eval_contexts: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> questions left out


class HardQuestionStore:
    """Offloaded questions with the edge's and the server's answers, in an SQLite file."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 30.0):
        self.db = DurableSqlite(
            path,
            application_id=STORE_APPLICATION_ID,
            schema=_SCHEMA,
            version=STORE_SCHEMA_VERSION,
            timeout=timeout,
        )
        self.path = self.db.path

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> HardQuestionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ contexts

    def add_context(self, context: str) -> str:
        """Keep ``context`` (once) so later requests can name it by ``context_ref``; returns the ref."""
        if not isinstance(context, str) or not context:
            raise ValueError("a context must be a non-empty string")
        ref = context_ref(context)
        with self.db.write() as conn:
            self._insert_context(conn, ref, context, time.time())
        return ref

    def has_context(self, ref: str) -> bool:
        with self.db.read() as conn:
            return conn.execute("SELECT 1 FROM contexts WHERE sha256 = ?", (ref,)).fetchone() is not None

    def get_context(self, ref: str) -> str | None:
        """The context whose sha256 is ``ref``, or None when the store does not hold it."""
        with self.db.read() as conn:
            row = conn.execute("SELECT text FROM contexts WHERE sha256 = ?", (ref,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _insert_context(conn: sqlite3.Connection, ref: str, context: str, now: float) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO contexts (sha256, text, first_seen) VALUES (?, ?, ?)", (ref, context, now)
        )

    # ------------------------------------------------------------ recording

    def record(
        self, request: AskRequest, reply: AnswerReply, *, received_at: float | None = None
    ) -> RecordResult:
        """Store one answered offload; a retry of a stored request is recognised and not stored again.

        A request with a ``context_ref`` the store does not hold raises
        ``ProtocolError("unknown_context")`` (send it back with ``error_reply_for``).
        """
        if not isinstance(request, AskRequest) or not isinstance(reply, AnswerReply):
            raise TypeError("record(request: AskRequest, reply: AnswerReply)")
        if reply.id != request.id:
            raise ValueError(f"reply id {reply.id!r} does not answer request {request.id!r}")
        now = time.time() if received_at is None else float(received_at)
        ref = request.ref
        with self.db.write() as conn:
            if request.edge.asked is not None:
                conn.execute(
                    "INSERT INTO device_counts (device_id, model_version, asked, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (device_id, model_version) DO UPDATE SET"
                    " asked = max(asked, excluded.asked), updated_at = excluded.updated_at",
                    (request.device_id, request.edge.model_version, request.edge.asked, now),
                )
            row = conn.execute(
                "SELECT id, question_id, question, context_sha256, edge_text, edge_start, edge_end,"
                " edge_exit_layer, edge_model_version FROM offloads WHERE device_id = ? AND request_id = ?",
                (request.device_id, request.id),
            ).fetchone()
            if row is not None:
                edge = request.edge
                sent = (
                    request.question,
                    ref,
                    edge.text,
                    edge.start,
                    edge.end,
                    edge.exit_layer,
                    edge.model_version,
                )
                if tuple(row[2:]) != sent:
                    raise ProtocolError(
                        "conflict",
                        f"request id {request.id} of device {request.device_id} was already used for"
                        " another question; a retry must repeat the request unchanged",
                        request.id,
                    )
                conn.execute("UPDATE offloads SET retries = retries + 1 WHERE id = ?", (row[0],))
                (times,) = conn.execute(
                    "SELECT times_asked FROM questions WHERE id = ?", (row[1],)
                ).fetchone()
                return RecordResult(row[0], True, row[1], times)
            if request.context is not None:
                self._insert_context(conn, ref, request.context, now)
            elif conn.execute("SELECT 1 FROM contexts WHERE sha256 = ?", (ref,)).fetchone() is None:
                raise ProtocolError("unknown_context", f"the server holds no context {ref}", request.id)
            question_id, times = conn.execute(
                "INSERT INTO questions (context_sha256, question_key, question, times_asked, first_asked, last_asked)"
                " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (context_sha256, question_key) DO UPDATE SET"
                " times_asked = times_asked + 1, last_asked = max(last_asked, excluded.last_asked)"
                " RETURNING id, times_asked",
                (ref, question_key(request.question), request.question, now, now),
            ).fetchone()
            edge = request.edge
            cursor = conn.execute(
                "INSERT INTO offloads (device_id, request_id, question_id, question, context_sha256,"
                " edge_text, edge_start, edge_end, edge_exit_layer, edge_entropies, edge_model_version,"
                " server_text, server_start, server_end, server_score, no_answer, server_model_version,"
                " server_ms, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.device_id,
                    request.id,
                    question_id,
                    request.question,
                    ref,
                    edge.text,
                    edge.start,
                    edge.end,
                    edge.exit_layer,
                    json.dumps(list(edge.entropies)),
                    edge.model_version,
                    reply.text,
                    reply.start,
                    reply.end,
                    reply.score,
                    int(reply.no_answer),
                    reply.model_version,
                    reply.server_ms,
                    now,
                ),
            )
            return RecordResult(int(cursor.lastrowid), False, question_id, times)

    def offload(self, row_id: int) -> dict | None:
        """One stored offload as a dict of its columns (entropies decoded), or None."""
        with self.db.read() as conn:
            cursor = conn.execute("SELECT * FROM offloads WHERE id = ?", (row_id,))
            row = cursor.fetchone()
            names = [d[0] for d in cursor.description]
        if row is None:
            return None
        out = dict(zip(names, row, strict=True))
        out["edge_entropies"] = json.loads(out["edge_entropies"])
        out["no_answer"] = bool(out["no_answer"])
        return out

    def questions_asked(self, model_versions: Sequence[str]) -> dict[str, dict[str, int | None]]:
        """device_id -> {model_version: questions it asked with that version}, for every device
        with stored offloads (or a report) under ``model_versions``: the largest count the device
        reported, never fewer than its stored offloads; None where it stored offloads but never
        reported a count (a device older than ``edge.asked``)."""
        versions = list(dict.fromkeys(model_versions))
        if not versions:
            return {}
        marks = ",".join("?" * len(versions))
        with self.db.read() as conn:
            stored = conn.execute(
                f"SELECT device_id, edge_model_version, count(*) FROM offloads"
                f" WHERE edge_model_version IN ({marks}) GROUP BY device_id, edge_model_version",
                versions,
            ).fetchall()
            reported = conn.execute(
                f"SELECT device_id, model_version, asked FROM device_counts WHERE model_version IN ({marks})",
                versions,
            ).fetchall()
        out: dict[str, dict[str, int | None]] = {}
        counts = {(d, v): int(n) for d, v, n in reported}
        for device, version, n in stored:
            said = counts.pop((device, version), None)
            out.setdefault(device, {})[version] = None if said is None else max(said, int(n))
        for (device, version), said in counts.items():
            out.setdefault(device, {})[version] = said
        return out

    # ------------------------------------------------------------ reading out

    def stats(self) -> StoreStats:
        with self.db.read() as conn:
            stats = StoreStats(**store_counts(conn))
            sql = "SELECT {0}, count(*) FROM offloads GROUP BY {0} ORDER BY {0}"
            stats.per_device = dict(conn.execute(sql.format("device_id")).fetchall())
            stats.per_exit_layer = dict(conn.execute(sql.format("edge_exit_layer")).fetchall())
        return stats

    def export_squad(
        self,
        path_train: str | os.PathLike,
        path_eval: str | os.PathLike,
        eval_fraction: float = 0.2,
        seed: int = 0,
        *,
        version: str = "2.0",
    ) -> ExportSummary:
        """Write the stored questions as SQuAD json, server answers as pseudo-labels, split by context.

        Each distinct question appears once, labelled with the answer of its latest offload;
        each qa is marked ``"pseudo_label": true`` with the server's score and model version.
        A no-answer reply becomes ``is_impossible: true`` (version "2.0"; left out of a "1.1"
        export). ``round(eval_fraction * n_contexts)`` contexts go to the eval file (at least
        one and not all, when 0 < eval_fraction < 1 and there are two contexts or more), so
        no context is in both files. Each paragraph carries its sha256 as ``context_id``.
        """
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
        if version not in ("1.1", "2.0"):
            raise ValueError(f"version must be '1.1' or '2.0', got {version!r}")
        summary = ExportSummary()
        paragraphs = self._labelled_paragraphs(version, summary.skipped)
        refs = sorted(paragraphs)
        n_eval = round(eval_fraction * len(refs))
        if 0.0 < eval_fraction < 1.0 and len(refs) >= 2:
            n_eval = min(max(n_eval, 1), len(refs) - 1)
        random.Random(seed).shuffle(refs)
        eval_refs = set(refs[:n_eval])
        for path, part in ((path_train, False), (path_eval, True)):
            chosen = [ref for ref in sorted(paragraphs) if (ref in eval_refs) == part]
            data = [{"title": f"elma-offload-{ref[:12]}", "paragraphs": [paragraphs[ref]]} for ref in chosen]
            _write_json_atomic(Path(path), {"version": "v2.0" if version == "2.0" else "1.1", "data": data})
            n_questions = sum(len(paragraphs[ref]["qas"]) for ref in chosen)
            if part:
                summary.eval_contexts, summary.eval_questions = len(chosen), n_questions
            else:
                summary.train_contexts, summary.train_questions = len(chosen), n_questions
        return summary

    def _labelled_paragraphs(self, version: str, skipped: dict[str, int]) -> dict[str, dict]:
        """context sha256 -> SQuAD paragraph holding its questions, each labelled by its latest offload."""
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT q.id, q.question, q.times_asked, c.sha256, c.text, o.server_text, o.server_start,"
                " o.server_score, o.no_answer, o.server_model_version"
                " FROM questions q JOIN contexts c ON c.sha256 = q.context_sha256"
                " JOIN offloads o ON o.id = (SELECT id FROM offloads WHERE question_id = q.id"
                "   ORDER BY received_at DESC, id DESC LIMIT 1)"
                " ORDER BY q.id"
            ).fetchall()
        paragraphs: dict[str, dict] = {}
        for qid, question, times, ref, context, text, start, score, no_answer, model in rows:
            qa: dict = {"id": f"elma-{qid}", "question": question, "answers": []}
            if no_answer:
                if version == "1.1":
                    skipped["no answer (not in SQuAD 1.1)"] = (
                        skipped.get("no answer (not in SQuAD 1.1)", 0) + 1
                    )
                    continue
            else:
                answer_start = _answer_start(context, text, start)
                if answer_start is None:
                    reason = "empty answer" if not text.strip() else "answer not in its context"
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                qa["answers"] = [{"text": text, "answer_start": answer_start}]
            if version == "2.0":
                qa["is_impossible"] = bool(no_answer)
            qa.update(pseudo_label=True, server_score=score, server_model_version=model, times_asked=times)
            paragraphs.setdefault(ref, {"context": context, "context_id": ref, "qas": []})["qas"].append(qa)
        return paragraphs


def _answer_start(context: str, text: str, start: int | None) -> int | None:
    """Char offset of ``text`` in ``context``: the stored start if the text is there, else the nearest match."""
    if not text.strip():
        return None
    if start is not None and context[start : start + len(text)] == text:
        return start
    best, pos = None, context.find(text)
    while pos != -1:
        if best is None or abs(pos - (start or 0)) < abs(best - (start or 0)):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def _write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(obj, out, ensure_ascii=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
