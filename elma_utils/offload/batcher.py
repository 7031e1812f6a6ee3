"""The micro-batcher: one worker thread owns the model and answers whatever requests wait.

Requests from all connections queue up; the worker takes what is waiting (up to
``max_batch``, waiting at most ``max_wait_ms`` for more) and answers them in one batched
call, so 8 devices asking at once cost far less than 8 sequential calls, and the model is
never entered by two threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerAnswer:
    text: str
    start: int | None
    end: int | None
    score: float
    no_answer: bool


class Overloaded(Exception):
    """The request would miss its deadline (queue too long, or the model too slow)."""


class MicroBatcher:
    """One worker thread runs ``answer_batch`` on whatever requests are waiting."""

    def __init__(
        self,
        answer_batch: Callable[[list[tuple[str, str]]], list[ServerAnswer]],
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
    ):
        self._answer_batch = answer_batch
        self.max_batch, self.max_wait_s = int(max_batch), max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self.batches = 0
        self.answered = 0
        self._thread = threading.Thread(target=self._run, name="elma-batcher", daemon=True)
        self._thread.start()

    def submit(self, question: str, context: str, deadline: float | None = None) -> Future:
        fut: Future = Future()
        try:
            self._queue.put_nowait((question, context, deadline, fut))
        except queue.Full as err:
            raise Overloaded(f"{self._queue.maxsize} questions are already waiting") from err
        return fut

    def _take(self) -> list:
        first = self._queue.get(timeout=0.1)
        batch = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._take()
            except queue.Empty:
                continue
            now = time.monotonic()
            live = []
            for q, c, deadline, fut in batch:
                if deadline is not None and now > deadline:
                    fut.set_exception(Overloaded("the deadline passed while the question waited"))
                elif fut.set_running_or_notify_cancel():
                    live.append((q, c, fut))
            if not live:
                continue
            try:
                answers = self._answer_batch([(q, c) for q, c, _ in live])
                if len(answers) != len(live):
                    raise RuntimeError(f"answer_batch returned {len(answers)} answers for {len(live)}")
            except Exception as exc:  # the model failed: every waiting request learns it
                log.exception("answer_batch failed")
                for _, _, fut in live:
                    fut.set_exception(exc)
                continue
            self.batches += 1
            self.answered += len(live)
            for (_, _, fut), ans in zip(live, answers, strict=True):
                fut.set_result(ans)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
