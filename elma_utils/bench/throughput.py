"""Server throughput and tail latency with several edge devices asking at once.

A measurement, not a test: for each number of clients N, N threads each open their own
persistent SSH connection (``make_tunnel()``: N edge devices, each with its own device id)
and send real ``ask`` requests (question + context) one after another, as a device does.
Every reply is matched to its request id; a reply to another id counts as a mismatch, an
``error`` reply or a failed exchange as an error, so the figures only stand when both are 0.
Round trips are timed on the client, SSH included; throughput is answered questions per
second of wall-clock time while all N clients run.

On a loopback deployment the clients, the SSH way in and the server share the same CPU, so
the figures include the clients' own SSH work. Every request is a real offload: the server
stores it (device ids ``<device_prefix>-<k>``, edge model version ``BENCH_MODEL_VERSION``, so
the rows can be told apart from a device's).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from elma_utils.edge.identity import sign_request
from elma_utils.edge.protocol import (
    AnswerReply,
    AskRequest,
    EdgeResult,
    ErrorReply,
    Message,
    decode,
    encode,
)
from elma_utils.edge.ssh_client import SSHTunnelClient

BENCH_MODEL_VERSION = "throughput-benchmark"
MAX_ERROR_EXAMPLES = 5

OnReply = Callable[[AskRequest, AnswerReply], None]


@dataclass
class Throughput:
    """N clients together: requests sent (warm-up excluded), what came back, and latency in ms.

    ``seconds`` runs from the moment all clients start their timed requests to the last
    reply; percentiles are over answered requests (nearest rank, so p50 ≤ p95 ≤ p99 ≤ max).
    """

    clients: int
    requests: int
    answered: int
    errors: int
    mismatches: int
    seconds: float
    throughput_qps: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    error_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _ClientRun:
    """What one client thread saw (written by that thread only)."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    mismatches: int = 0
    error_examples: list[str] = field(default_factory=list)
    started: float = math.inf
    finished: float = -math.inf

    def fail(self, what: str, count: int = 1) -> None:
        self.errors += count
        if len(self.error_examples) < MAX_ERROR_EXAMPLES:
            self.error_examples.append(what)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN for none)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _exchange(tunnel: SSHTunnelClient, request: AskRequest, timeout_s: float) -> Message:
    return decode(tunnel.request_line(encode(request), timeout=timeout_s))


def _run_client(
    tunnel: SSHTunnelClient,
    warmup: list[AskRequest],
    timed: list[AskRequest],
    start_together: threading.Barrier,
    timeout_s: float,
    on_reply: OnReply | None,
    run: _ClientRun,
) -> None:
    """Sign with the tunnel's key, connect and warm up, wait for the other clients, then send
    ``timed`` one by one."""
    ready = True
    key = getattr(tunnel, "client_key", None)
    if key is not None:  # a server with a device registry answers only signed asks
        warmup, timed = ([sign_request(r, key) for r in part] for part in (warmup, timed))
    try:
        tunnel.connect()
        for request in warmup:
            _exchange(tunnel, request, timeout_s)
    except Exception as exc:  # noqa: BLE001 - counted and reported, the other clients go on
        ready = False
        run.fail(f"{timed[0].device_id}: {type(exc).__name__}: {exc}", len(timed))
    with contextlib.suppress(threading.BrokenBarrierError):
        start_together.wait()
    if not ready:
        return
    run.started = time.perf_counter()
    for request in timed:
        t0 = time.perf_counter()
        try:
            reply = _exchange(tunnel, request, timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed exchange is an error, not the end of the run
            run.fail(f"{request.id}: {type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - t0
        if isinstance(reply, ErrorReply) and reply.id in (request.id, None):
            run.fail(f"{request.id}: {reply.code}: {reply.message}")
        elif getattr(reply, "id", None) != request.id:
            run.mismatches += 1
            if len(run.error_examples) < MAX_ERROR_EXAMPLES:
                run.error_examples.append(f"{request.id}: got the reply to {getattr(reply, 'id', None)!r}")
        elif isinstance(reply, AnswerReply):
            run.latencies_s.append(elapsed)
            if on_reply is not None:
                on_reply(request, reply)
        else:
            run.fail(f"{request.id}: unexpected {type(reply).__name__} reply")
    run.finished = time.perf_counter()


def _requests(
    questions: Sequence[tuple[str, str]],
    device_id: str,
    id_prefix: str,
    first: int,
    count: int,
    deadline_ms: int,
) -> list[AskRequest]:
    """``count`` asks from ``questions`` starting at index ``first`` (wrapping round)."""
    edge = EdgeResult(text="", model_version=BENCH_MODEL_VERSION)
    out = []
    for i in range(count):
        question, context = questions[(first + i) % len(questions)]
        out.append(
            AskRequest(
                id=f"{id_prefix}-{i}",
                device_id=device_id,
                question=question,
                edge=edge,
                context=context,
                deadline_ms=deadline_ms,
            )
        )
    return out


def _measure_clients(
    make_tunnel: Callable[[str], SSHTunnelClient],
    questions: Sequence[tuple[str, str]],
    n: int,
    per_client: int,
    warmup: int,
    deadline_ms: int,
    device_prefix: str,
    on_reply: OnReply | None,
) -> Throughput:
    run_tag = f"{os.getpid():x}{time.time_ns() // 1_000_000:x}"  # request ids stay new across runs
    spread = max(1, len(questions) // n)  # clients ask different questions at the same time
    runs = [_ClientRun() for _ in range(n)]
    asks = [
        _requests(
            questions,
            f"{device_prefix}-{k}",
            f"tp{run_tag}-{n}-{k}",
            k * spread,
            warmup + per_client,
            deadline_ms,
        )
        for k in range(n)
    ]
    barrier = threading.Barrier(n)
    tunnels: list[SSHTunnelClient] = []
    try:
        threads = []
        for k, (client_asks, run) in enumerate(zip(asks, runs, strict=True)):
            tunnels.append(make_tunnel(f"{device_prefix}-{k}"))
            args = (
                tunnels[-1],
                client_asks[:warmup],
                client_asks[warmup:],
                barrier,
                deadline_ms / 1000 + 5.0,
                on_reply,
                run,
            )
            threads.append(
                threading.Thread(target=_run_client, args=args, name=f"throughput-{n}-{len(threads)}")
            )
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for tunnel in tunnels:
            tunnel.close()
    latencies_ms = sorted(s * 1000 for r in runs for s in r.latencies_s)
    started = min(r.started for r in runs)
    finished = max(r.finished for r in runs)
    seconds = finished - started if finished > started else 0.0
    return Throughput(
        clients=n,
        requests=n * per_client,
        answered=len(latencies_ms),
        errors=sum(r.errors for r in runs),
        mismatches=sum(r.mismatches for r in runs),
        seconds=seconds,
        throughput_qps=len(latencies_ms) / seconds if seconds > 0 else 0.0,
        mean_ms=statistics.fmean(latencies_ms) if latencies_ms else math.nan,
        p50_ms=percentile(latencies_ms, 50),
        p95_ms=percentile(latencies_ms, 95),
        p99_ms=percentile(latencies_ms, 99),
        max_ms=latencies_ms[-1] if latencies_ms else math.nan,
        error_examples=[e for r in runs for e in r.error_examples][:MAX_ERROR_EXAMPLES],
    )


def measure_server_throughput(
    make_tunnel: Callable[[str], SSHTunnelClient],
    questions: Sequence[tuple[str, str]],
    clients: Sequence[int] = (1, 4, 8),
    *,
    per_client: int = 100,
    warmup: int = 5,
    deadline_ms: int = 30_000,
    device_prefix: str = "bench",
    on_reply: OnReply | None = None,
) -> dict[int, Throughput]:
    """Throughput and latency percentiles for each client count in ``clients``.

    ``make_tunnel(device_id)`` builds a new, unconnected client for simulated device
    ``device_id`` (one SSH connection per device; its key signs that device's asks); ``questions`` are (question, context) pairs, client ``k`` of ``N`` starting at
    ``k * (len(questions) // N)``. Each client first sends ``warmup`` untimed requests
    (connection, channel and server warm), then ``per_client`` timed ones. ``on_reply`` is
    called with every matched answer from the client threads, after that round trip's own
    time is taken but within the run (keep it cheap: it delays the client's next request).
    """
    if not questions:
        raise ValueError("questions must not be empty")
    if per_client < 1 or warmup < 0:
        raise ValueError(f"per_client must be ≥ 1 and warmup ≥ 0, got {per_client} and {warmup}")
    if not clients or any(n < 1 for n in clients):
        raise ValueError(f"clients must be counts ≥ 1, got {list(clients)}")
    return {
        n: _measure_clients(
            make_tunnel, questions, n, per_client, warmup, deadline_ms, device_prefix, on_reply
        )
        for n in clients
    }


def format_throughput(results: Mapping[int, Throughput | dict]) -> str:
    """A small fixed-width table for logs and reports (of results or their ``as_dict()``)."""
    rows = [
        f"{'clients':>7}{'requests':>10}{'errors':>8}{'mismatch':>10}{'q/s':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    ]
    for result in results.values():
        r = result if isinstance(result, Throughput) else Throughput(**result)
        rows.append(
            f"{r.clients:>7}{r.requests:>10}{r.errors:>8}{r.mismatches:>10}{r.throughput_qps:>9.1f}"
            f"{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.p99_ms:>9.1f}{r.max_ms:>9.1f}"
        )
    return "\n".join(rows)
