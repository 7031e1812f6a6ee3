"""`EdgeQA`: answer on the device, offload only what the device cannot settle.

    edge = EdgeQA(EdgeModel.load(bundle), tunnel, Outbox("edge/outbox.sqlite3"), device_id="tx2-01")
    result = edge.answer(question, context)
    result.text, result.source          # "edge", "server" or "edge-fallback"

1. The edge model runs layer by layer and stops at the first confident exit (``solved``).
2. An unsolved question goes to the server over the SSH tunnel with a deadline; the reply
   is the answer (``source="server"``).
3. If the server is unreachable, slow or refuses, the device's own best answer is returned
   marked ``edge-fallback``, and the request is kept in the outbox (SQLite) to be sent when
   the server is back — so the server still learns from every hard question. If the outbox
   cannot take it (disk full, read-only), the user still gets the answer (``queued`` False,
   ``error`` says why) and the failure is logged.

Contexts are sent once per connection: after the server has answered about a context, the
device refers to it by sha256 (``context_ref``); an ``unknown_context`` reply (a restarted
or different server) makes it resend the text.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from elma_utils.edge.identity import sign_request
from elma_utils.edge.outbox import Outbox
from elma_utils.edge.protocol import (
    AnswerReply,
    AskRequest,
    EdgeResult,
    ErrorReply,
    ProtocolError,
    context_ref,
    decode,
    encode,
)
from elma_utils.edge.ssh_client import OffloadUnavailable

log = logging.getLogger(__name__)

SOURCES = ("edge", "server", "edge-fallback")


@dataclass
class EdgeQAResult:
    """The answer the user gets, where it came from, and what each stage cost (ms)."""

    text: str
    source: str  # one of SOURCES
    char_start: int | None
    char_end: int | None
    exit_layer: int  # last edge layer computed
    edge_solved: bool
    entropies: list[float]
    edge_ms: float
    offload_ms: float = 0.0  # round trip, server time included
    server_ms: float = 0.0
    no_answer: bool = False
    error: str | None = None  # why the server answer is missing (fallback), and why not queued
    queued: bool = False  # the request waits in the outbox to be sent later
    request_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    kept_below_offload_threshold: bool = False  # settled by E_offload, not by an exit (edge_solved too)

    @property
    def total_ms(self) -> float:
        return self.edge_ms + self.offload_ms


class EdgeQA:
    """Early exit on the device; hard questions to the server; an outbox when it is away."""

    def __init__(
        self,
        edge_model,
        tunnel=None,
        outbox: Outbox | None = None,
        *,
        device_id: str = "edge",
        deadline_ms: int = 2000,
        model_version: str | None = None,
        signer=None,
    ):
        """``signer``: the device's private key, which signs every ask so the server can tell
        it really comes from ``device_id`` (``device_identity``); by default the key the
        tunnel logs in with."""
        self.edge = edge_model
        self.tunnel = tunnel
        self.signer = signer if signer is not None else getattr(tunnel, "client_key", None)
        self.outbox = outbox
        self.device_id = device_id
        self.deadline_ms = int(deadline_ms)
        manifest = getattr(edge_model, "manifest", {}) or {}
        self.model_version = model_version or str(manifest.get("model_version", "edge"))
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-{int(time.time() * 1000):x}"
        self._known_contexts: set[str] = set()
        self._lock = threading.Lock()
        # questions answered with that version (None: not read from the outbox yet)
        self._counted: tuple[str | None, int] = (None, 0)

    def _next_id(self) -> str:
        with self._lock:
            return f"{self._prefix}-{next(self._ids)}"

    def _count_question(self) -> tuple[str, int]:
        """One more question answered with the current model version; the server prices an
        offload threshold with it (``edge.asked``). With an outbox the count goes on from what
        it kept for that version (a restart, a rollback), else from 0 in this process."""
        with self._lock:
            version, n = self._counted
            if version != self.model_version:
                version, n = self.model_version, self._saved_count(self.model_version)
            self._counted = (version, n + 1)
            return self._counted

    def _saved_count(self, version: str) -> int:
        if self.outbox is None:
            return 0
        try:
            return self.outbox.asked_count(version)
        except (sqlite3.Error, OSError) as exc:  # a broken outbox must not stop the answers
            log.warning(
                "outbox %s: the count of questions asked could not be read: %s", self.outbox.path, exc
            )
            return 0

    def save_count(self) -> None:
        """Keep the current count in the outbox (done before each offload; call it at shutdown)."""
        if self.outbox is None:
            return
        version, n = self._counted
        if n <= 0:
            return
        try:
            self.outbox.save_asked_count(version, n)
        except (sqlite3.Error, OSError) as exc:
            log.warning("outbox %s: the count of questions asked was not kept: %s", self.outbox.path, exc)

    def answer(self, question: str, context: str) -> EdgeQAResult:
        t0 = time.perf_counter()
        version, asked = self._count_question()
        local = self.edge.answer(question, context)
        edge_ms = (time.perf_counter() - t0) * 1000
        result = EdgeQAResult(
            text=local.text,
            source="edge",
            char_start=local.char_start if local.char_start >= 0 else None,
            char_end=local.char_end if local.char_start >= 0 else None,
            exit_layer=local.exit_layer,
            edge_solved=bool(local.solved),
            kept_below_offload_threshold=bool(getattr(local, "kept_below_offload_threshold", False)),
            entropies=list(local.entropies),
            edge_ms=edge_ms,
            timings={"tokenise_ms": getattr(local, "tokenise_ms", 0.0), "edge_ms": edge_ms},
        )
        if local.solved:
            return result
        self.save_count()  # an offload is a round trip anyway; a count kept now survives a restart
        request = AskRequest(
            id=self._next_id(),
            device_id=self.device_id,
            question=question,
            edge=EdgeResult.from_answer(local, version, asked=asked),
            context=context,
            deadline_ms=self.deadline_ms,
        )
        result.request_id = request.id
        t1 = time.perf_counter()
        try:
            reply = self.send(request)
        except (OffloadUnavailable, ProtocolError, OSError, TimeoutError) as err:
            result.offload_ms = (time.perf_counter() - t1) * 1000
            result.source = "edge-fallback"
            result.error = f"{type(err).__name__}: {err}"
            self._queue(request, result)
            return result
        result.offload_ms = (time.perf_counter() - t1) * 1000
        result.timings["offload_ms"] = result.offload_ms
        result.source = "server"
        result.text = reply.text
        result.no_answer = reply.no_answer
        result.char_start, result.char_end = reply.start, reply.end
        result.server_ms = reply.server_ms
        self._flush_after_reply()
        return result

    def _queue(self, request: AskRequest, result: EdgeQAResult) -> None:
        """Keep ``request`` in the outbox; a failure to store it (disk full, read-only) is logged, never raised."""
        if self.outbox is None:
            return
        try:
            self.outbox.put(request)
        except (sqlite3.Error, OSError, ValueError) as exc:  # ValueError: ProtocolError("too_large")
            why = f"{type(exc).__name__}: {exc}"
            log.error("request %s not queued in the outbox %s: %s", request.id, self.outbox.path, why)
            result.error = f"{result.error}; not queued: {why}"
            return
        result.queued = True

    def _flush_after_reply(self) -> None:
        """The server is back: send what waited. A failing outbox must not cost the user the server's answer."""
        if self.outbox is None:
            return
        try:
            if len(self.outbox):
                self.flush_outbox()
        except (sqlite3.Error, OSError, ValueError) as exc:
            log.error("outbox %s not drained: %s: %s", self.outbox.path, type(exc).__name__, exc)

    def send(self, request: AskRequest) -> AnswerReply:
        """One request → its ``AnswerReply`` (raises ``OffloadUnavailable``/``ProtocolError``)."""
        if self.tunnel is None:
            raise OffloadUnavailable("no server configured (offline device)")
        if request.sig is None and self.signer is not None:  # also what an older outbox kept unsigned
            request = sign_request(request, self.signer)
        ref = request.ref
        if request.context is not None and ref in self._known_contexts:
            short = dataclasses.replace(
                request, context=None, context_ref=ref
            )  # same content, same signature
            reply = self._exchange(short)
            if not (isinstance(reply, ErrorReply) and reply.code == "unknown_context"):
                return self._accept(request, reply)
            self._known_contexts.discard(ref)
        return self._accept(request, self._exchange(request))

    def _exchange(self, request: AskRequest):
        timeout = (request.deadline_ms or self.deadline_ms) / 1000
        line = self.tunnel.request_line(encode(request), timeout=timeout)
        try:
            return decode(line)
        except ProtocolError as err:  # the server's fault, not the request's: "internal", worth a retry
            raise ProtocolError("internal", f"unreadable reply from the server ({err})", request.id) from err

    def _accept(self, request: AskRequest, reply) -> AnswerReply:
        """The reply if it answers ``request``; an ``ErrorReply`` raises ``ProtocolError`` with the server's code.

        That code tells the outbox whether to retry (``CLIENT_FAULT_CODES`` never are).
        """
        if isinstance(reply, ErrorReply):
            raise ProtocolError(reply.code, f"server: {reply.message}", request.id)
        if not isinstance(reply, AnswerReply) or reply.id != request.id:
            raise ProtocolError("internal", f"the server's reply does not answer {request.id}", request.id)
        self._known_contexts.add(request.ref if request.context is None else context_ref(request.context))
        return reply

    def flush_outbox(self, limit: int | None = None):
        """Send questions kept while the server was away (oldest first; see ``Outbox.drain``)."""
        if self.outbox is None:
            return None
        return self.outbox.drain(self.send, limit)
