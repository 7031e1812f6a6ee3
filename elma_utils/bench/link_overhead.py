"""What the SSH link costs per offloaded line: round-trip time and bytes on the wire.

A measurement, not a test: it compares, on the same service and payload, (a) the persistent
SSH channel the edge uses, (b) a new channel per line on that connection, (c) a new SSH
connection per line (what keeping the connection open saves) and (d) plain TCP to the
service (the floor). Wire bytes are what went through the TCP socket (SSH handshake,
encryption, MACs and framing included; TCP/IP headers not).
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from elma_utils.edge.ssh_client import LineChannel, SSHTunnelClient, line_frame

DEFAULT_PAYLOAD = b'{"type": "question", "id": "q-000001", "question": "Which river flows through the city?"}'


@dataclass
class RoundTrip:
    """Round trips of one mode, in milliseconds; ``wire_bytes_per_line`` both directions together."""

    mode: str
    lines: int
    p50_ms: float
    mean_ms: float
    p95_ms: float
    wire_bytes_per_line: float

    def as_dict(self) -> dict:
        return asdict(self)


def _summary(mode: str, times_s: list[float], wire_bytes: int) -> RoundTrip:
    ms = sorted(t * 1000.0 for t in times_s)
    return RoundTrip(
        mode=mode,
        lines=len(ms),
        p50_ms=statistics.median(ms),
        mean_ms=statistics.fmean(ms),
        p95_ms=ms[min(len(ms) - 1, int(0.95 * len(ms)))],
        wire_bytes_per_line=wire_bytes / len(ms),
    )


def _wire(client: SSHTunnelClient) -> int:
    return client.stats.wire_bytes_sent + client.stats.wire_bytes_received


def _plain_tcp(target: tuple[str, int], line: bytes, lines: int, warmup: int) -> RoundTrip:
    times = []
    with socket.create_connection(target, timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        for i in range(warmup + lines):
            t0 = time.perf_counter()
            sock.sendall(line)
            reply = reader.readline()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            if not reply.endswith(b"\n"):
                raise ConnectionError("service closed the connection")
    return _summary("plain_tcp", times, lines * (len(line) + len(reply)))


def measure_round_trip(
    make_client: Callable[[], SSHTunnelClient],
    payload: bytes = DEFAULT_PAYLOAD,
    *,
    lines: int = 200,
    new_connection_lines: int = 20,
    warmup: int = 10,
) -> dict[str, RoundTrip]:
    """Measure the four modes; ``make_client`` builds an (unconnected) client for the service.

    Plain TCP connects straight to the client's ``target``, so call it on the server host
    (or, in tests, with everything on loopback).
    """
    line = line_frame(payload)
    results: dict[str, RoundTrip] = {}

    with make_client() as client:
        client.connect()
        for _ in range(warmup):
            client.request_line(line)
        before, times = _wire(client), []
        for _ in range(lines):
            t0 = time.perf_counter()
            client.request_line(line)
            times.append(time.perf_counter() - t0)
        results["ssh_persistent"] = _summary("ssh_persistent", times, _wire(client) - before)

        before, times = _wire(client), []
        for _ in range(max(1, lines // 4)):
            t0 = time.perf_counter()
            lc = LineChannel(client.open_channel(), client.stats)
            lc.request(line, time.monotonic() + client.timeout)
            lc.close()
            times.append(time.perf_counter() - t0)
        results["ssh_channel_per_line"] = _summary("ssh_channel_per_line", times, _wire(client) - before)
        target = client.target

    times, wire = [], 0
    for _ in range(new_connection_lines):
        t0 = time.perf_counter()
        with make_client() as fresh:
            fresh.request_line(line)
        times.append(time.perf_counter() - t0)
        wire += _wire(fresh)
    results["ssh_connection_per_line"] = _summary("ssh_connection_per_line", times, wire)

    results["plain_tcp"] = _plain_tcp(target, line, lines, warmup)
    return results


def format_round_trips(results: dict[str, RoundTrip]) -> str:
    """A small fixed-width table for logs and reports."""
    rows = [f"{'mode':<24}{'lines':>7}{'p50 ms':>10}{'mean ms':>10}{'p95 ms':>10}{'wire B/line':>13}"]
    for r in results.values():
        rows.append(
            f"{r.mode:<24}{r.lines:>7}{r.p50_ms:>10.3f}{r.mean_ms:>10.3f}{r.p95_ms:>10.3f}"
            f"{r.wire_bytes_per_line:>13.0f}"
        )
    return "\n".join(rows)
