"""The micro-batcher: one worker thread owns the model and answers whatever requests wait.

Requests from all connections queue up; the worker takes what is waiting (up to
``max_batch``, waiting at most ``max_wait_ms`` for more) and answers them in one batched
call, so 8 devices asking at once cost far less than 8 sequential calls, and the model is
never entered by two threads.

Fair between devices, so one device sending huge contexts cannot starve the others:

- every device has its own queue, and a batch is filled **round-robin** over the devices
  that wait: one request per device per turn, the device served longest ago first (a
  device that just started waiting goes before one served a moment ago); a device with 100
  waiting requests gets one turn per round like a device with one;
- a batch has a **cost budget** (``max_batch_cost``; by default the characters of question
  and context): a request that does not fit waits for the next batch, keeping its turn, so a
  heavy request runs alone and never holds light requests of other devices in its batch
  (a request over the budget still runs, alone, when its turn comes);
- one device may have at most ``max_per_device`` requests waiting: its excess is refused at
  once with ``Overloaded`` while the others are unaffected; ``max_queue`` bounds them all;
- a request whose deadline passed while it waited is dropped (``Overloaded``), never run.

So a light request waits at most about the batch running when it came plus one round of
light requests. ``batches`` and ``answered`` count the work; ``device_stats()`` has the
per-device counters (answered, overloaded, expired, failed, waiting) for the server's log.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_COST = 32_768  # characters: ~20 windows of 384 tokens, or ~40 SQuAD contexts


@dataclass(frozen=True)
class ServerAnswer:
    text: str
    start: int | None
    end: int | None
    score: float
    no_answer: bool


class Overloaded(Exception):
    """The request would miss its deadline (queue too long, or the model too slow)."""


def context_chars(question: str, context: str) -> int:
    """The default cost of a request: the characters the model reads (at least 1)."""
    return max(1, len(question) + len(context))


@dataclass
class DeviceStats:
    """What one device got from the batcher (a snapshot from ``device_stats()``)."""

    answered: int = 0  # answered by the model
    overloaded: int = 0  # refused at submit: the device's or the global bound was reached
    expired: int = 0  # dropped unrun: the deadline passed while the request waited
    failed: int = 0  # the model raised on the request's batch
    waiting: int = 0  # waiting now
    cost_answered: int = 0  # total cost (characters by default) of the answered requests
    max_wait_ms: float = 0.0  # longest queue wait of an answered request


@dataclass
class _Request:
    question: str
    context: str
    deadline: float | None
    device_id: str
    cost: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def _expired(req: _Request, now: float) -> bool:
    return req.deadline is not None and now > req.deadline


class MicroBatcher:
    """One worker thread runs ``answer_batch`` on the waiting requests, fair between devices."""

    def __init__(
        self,
        answer_batch: Callable[[list[tuple[str, str]]], list[ServerAnswer]],
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        *,
        max_per_device: int = 64,
        max_batch_cost: int = DEFAULT_MAX_BATCH_COST,
        cost: Callable[[str, str], int] = context_chars,
    ):
        if min(max_batch, max_queue, max_per_device, max_batch_cost) < 1:
            raise ValueError("max_batch, max_queue, max_per_device and max_batch_cost must be ≥ 1")
        self._answer_batch = answer_batch
        self.max_batch, self.max_wait_s = int(max_batch), max_wait_ms / 1000
        self.max_queue, self.max_per_device = int(max_queue), int(max_per_device)
        self.max_batch_cost = max_batch_cost
        self._cost = cost
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Request]] = {}  # devices with waiting requests
        # Their turn order, one entry per waiting device: (last turn, started waiting, device).
        self._turns: list[tuple[int, int, str]] = []
        self._last_turn: dict[str, int] = {}  # device → number of its latest turn
        self._turn_seq = itertools.count()
        self._arrival_seq = itertools.count()
        self._waiting = 0
        self._waiting_cost = 0
        self._stats: dict[str, DeviceStats] = {}
        self._stop = threading.Event()
        self.batches = 0
        self.answered = 0
        self._thread = threading.Thread(target=self._run, name="elma-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the client side
    def submit(
        self, question: str, context: str, deadline: float | None = None, device_id: str = ""
    ) -> Future:
        """Queue one request of ``device_id``; its future gets a ``ServerAnswer``.

        Raises ``Overloaded`` at once when the device already has ``max_per_device``
        requests waiting, or all devices together ``max_queue``.
        """
        req = _Request(question, context, deadline, device_id, int(self._cost(question, context)))
        with self._cond:
            stats = self._stats.setdefault(device_id, DeviceStats())
            own = self._queues.get(device_id)
            if self._stop.is_set():
                raise Overloaded("the server is shutting down")
            if own is not None and len(own) >= self.max_per_device:
                stats.overloaded += 1
                raise Overloaded(f"device {device_id!r} already has {len(own)} questions waiting")
            if self._waiting >= self.max_queue:
                stats.overloaded += 1
                raise Overloaded(f"{self._waiting} questions are already waiting")
            if own is None:
                own = self._queues[device_id] = deque()
                self._push_turn(device_id)
            own.append(req)
            stats.waiting += 1
            self._waiting += 1
            self._waiting_cost += req.cost
            self._cond.notify()
        return req.future

    def device_stats(self) -> dict[str, DeviceStats]:
        """A snapshot of the per-device counters (for the server's log)."""
        with self._cond:
            return {dev: replace(s) for dev, s in self._stats.items()}

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    # ------------------------------------------------------------------ the worker
    def _push_turn(self, device_id: str) -> None:
        entry = (self._last_turn.get(device_id, -1), next(self._arrival_seq), device_id)
        heapq.heappush(self._turns, entry)

    def _pop_head(self, device_id: str) -> _Request:
        own = self._queues[device_id]
        req = own.popleft()
        if not own:
            del self._queues[device_id]
        self._waiting -= 1
        self._waiting_cost -= req.cost
        self._stats[device_id].waiting -= 1
        return req

    def _pick(self) -> tuple[list[_Request], list[_Request]]:
        """Fill one batch round-robin within the budgets (lock held) → (batch, expired).

        A device whose next request does not fit the cost budget keeps its turn, so it goes
        first in the next batch (alone, if it is over the budget)."""
        now = time.monotonic()
        batch: list[_Request] = []
        expired: list[_Request] = []
        skipped: list[tuple[int, int, str]] = []
        cost = 0
        while self._turns and len(batch) < self.max_batch:
            entry = heapq.heappop(self._turns)
            dev = entry[2]
            own = self._queues[dev]
            while own and (own[0].future.cancelled() or _expired(own[0], now)):
                req = self._pop_head(dev)  # dropped unrun; not the device's turn yet
                if not req.future.cancelled():
                    self._stats[dev].expired += 1
                    expired.append(req)
            if dev not in self._queues:
                continue
            if batch and cost + own[0].cost > self.max_batch_cost:
                skipped.append(entry)
                continue
            req = self._pop_head(dev)
            batch.append(req)
            cost += req.cost
            self._last_turn[dev] = next(self._turn_seq)
            if dev in self._queues:
                self._push_turn(dev)  # its next request waits for the next round
        for entry in skipped:
            heapq.heappush(self._turns, entry)
        return batch, expired

    def _take(self) -> tuple[list[_Request], list[_Request]]:
        with self._cond:
            while not self._waiting and not self._stop.is_set():
                self._cond.wait()
            until = time.monotonic() + self.max_wait_s
            while self._waiting < self.max_batch and self._waiting_cost < self.max_batch_cost:
                remaining = until - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    break
                self._cond.wait(remaining)
            return ([], []) if self._stop.is_set() else self._pick()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch, expired = self._take()
            for req in expired:
                req.future.set_exception(Overloaded("the deadline passed while the question waited"))
            live = [req for req in batch if req.future.set_running_or_notify_cancel()]
            if live:
                self._answer(live)

    def _answer(self, live: list[_Request]) -> None:
        started = time.monotonic()
        try:
            answers = self._answer_batch([(r.question, r.context) for r in live])
            if len(answers) != len(live):
                raise RuntimeError(f"answer_batch returned {len(answers)} answers for {len(live)}")
        except Exception as exc:  # the model failed: every request of the batch learns it
            log.exception("answer_batch failed")
            with self._cond:
                for r in live:
                    self._stats[r.device_id].failed += 1
            for r in live:
                r.future.set_exception(exc)
            return
        with self._cond:
            self.batches += 1
            self.answered += len(live)
            for r in live:
                stats = self._stats[r.device_id]
                stats.answered += 1
                stats.cost_answered += r.cost
                stats.max_wait_ms = max(stats.max_wait_ms, (started - r.enqueued) * 1000)
        for r, ans in zip(live, answers, strict=True):
            r.future.set_result(ans)

    def close(self) -> None:
        """Stop after the running batch; requests still waiting get ``Overloaded``."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(timeout=5)
        left: list[_Request] = []
        with self._cond:
            while self._turns:
                dev = heapq.heappop(self._turns)[2]
                while dev in self._queues:
                    left.append(self._pop_head(dev))
        for req in left:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(Overloaded("the server is shutting down"))
