"""Shared by the offload tests: message factories and a run-then-kill -9 harness."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from elma_utils.edge.protocol import AnswerReply, AskRequest, EdgeResult

REPO = Path(__file__).resolve().parents[1]
CONTEXTS = (
    "Paris is the capital and most populous city of France.",
    "The Amazon is the largest rainforest on Earth, spanning nine countries.",
    "Ada Lovelace wrote the first published algorithm for a machine in 1843.",
)


def make_edge(exit_layer: int | None = None, entropies: tuple[float, ...] = (0.9, 0.8, 0.7)) -> EdgeResult:
    return EdgeResult(text="Paris", model_version="edge-test-1", start=0, end=5, exit_layer=exit_layer,
                      entropies=entropies)  # fmt: skip


def make_ask(
    i: int = 0,
    *,
    device_id: str = "edge-1",
    question: str | None = None,
    context: str = CONTEXTS[0],
    by_ref: str | None = None,
    exit_layer: int | None = None,
) -> AskRequest:
    """Request ``r{i}``; ``by_ref`` sends that context_ref instead of the context text."""
    return AskRequest(
        id=f"r{i}",
        device_id=device_id,
        question=question if question is not None else f"Question number {i}?",
        edge=make_edge(exit_layer),
        context=None if by_ref else context,
        context_ref=by_ref,
    )


def make_answer(request: AskRequest, text: str = "Paris", *, context: str | None = None, **kw) -> AnswerReply:
    """The server's reply to ``request``: ``text`` with its span in ``context`` when it is there."""
    context = context if context is not None else request.context or ""
    start = context.find(text) if text else -1
    span = {"start": start, "end": start + len(text)} if start >= 0 else {}
    fields = {"score": 0.75, "no_answer": False, "model_version": "server-test-1", "server_ms": 12.5, **span}
    fields.update(kw)
    return AnswerReply(id=request.id, text=text, **fields)


def run_until_killed(script: str, args: list[str], kill_after: int, timeout_s: float = 60.0) -> list[str]:
    """Run ``python -c script args``, SIGKILL it after ``kill_after`` lines of stdout; all whole lines it wrote.

    The script prints one line per acknowledged write (after the write returned), so
    every returned line names something that must have survived the kill. Asserts the
    process was really killed mid-way, not finished on its own.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    try:
        lines = []
        while len(lines) < kill_after:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        # Read the rest through the same buffered reader: readline() may already hold lines that
        # ``communicate()`` (which reads the raw pipe) would lose. The writer is dead, so both reads end.
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, (
        f"the writer ended on its own (rc {proc.returncode}): {err[-2000:]!r}"
    )
    assert len(lines) == kill_after, f"the writer acknowledged only {len(lines)} writes: {err[-2000:]!r}"
    whole = [line for line in rest.splitlines(keepends=True) if line.endswith(b"\n")]
    return [line.decode().strip() for line in lines + whole]
