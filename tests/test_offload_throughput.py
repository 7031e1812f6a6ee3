"""The server throughput benchmark: real model, real SSH endpoint, N devices on N connections.

Values only, no timing thresholds: every request answered with the model's own answer, no
errors or mismatched replies, one persistent connection per simulated device, every ask stored.
"""

from __future__ import annotations

import threading

import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.bench.loopback import LoopbackDeployment
from elma_utils.bench.throughput import format_throughput, measure_server_throughput, percentile
from elma_utils.edge.protocol import AnswerReply, AskRequest, ErrorReply, decode, encode
from elma_utils.edge.ssh_client import SSHTunnelClient
from elma_utils.model.inference import QAModel

pytestmark = pytest.mark.network

CLIENTS = (1, 4, 8)
PER_CLIENT, WARMUP = 20, 2


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (1, 50, 95, 99, 100)] == [1.0, 50.0, 95.0, 99.0, 100.0]
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="questions"):
        measure_server_throughput(lambda: None, [])
    with pytest.raises(ValueError, match="per_client"):
        measure_server_throughput(lambda: None, [("q?", "c")], per_client=0)
    with pytest.raises(ValueError, match="clients"):
        measure_server_throughput(lambda: None, [("q?", "c")], clients=(0,))


class _ScriptedTunnel:
    """Stands in for an SSH tunnel: the n-th timed request gets a right answer, an error reply,
    the reply to another request, or a broken connection, in turn (warm-up: always right)."""

    def __init__(self, warmup: int):
        self.sent, self.warmup, self.closed = 0, warmup, False

    def connect(self) -> None:
        pass

    def request_line(self, payload: bytes, timeout: float | None = None) -> bytes:
        request = decode(payload)
        kind, self.sent = (self.sent - self.warmup) % 4 if self.sent >= self.warmup else 0, self.sent + 1
        if kind == 3:
            raise OSError("connection reset")
        if kind == 1:
            return encode(ErrorReply(request.id, "overloaded", "busy"))
        reply_id = request.id if kind == 0 else "someone-else"
        return encode(AnswerReply(reply_id, "an answer", 1.0, False, "fake", 1.0))

    def close(self) -> None:
        self.closed = True


def test_errors_and_mismatched_replies_are_counted_not_timed():
    tunnels: list[_ScriptedTunnel] = []

    def make_tunnel(device_id: str) -> _ScriptedTunnel:
        tunnels.append(_ScriptedTunnel(warmup=1))
        return tunnels[-1]

    results = measure_server_throughput(make_tunnel, [("Who?", "Somebody.")], (1, 2), per_client=8, warmup=1)
    for n, r in results.items():
        assert (r.requests, r.answered, r.errors, r.mismatches) == (8 * n, 2 * n, 4 * n, 2 * n)
        assert len(r.error_examples) == 5 and r.p50_ms <= r.p99_ms <= r.max_ms
    assert len(tunnels) == 3 and all(t.closed and t.sent == 9 for t in tunnels)
    table = format_throughput(results).splitlines()
    assert len(table) == 3 and table[2].split()[:4] == [
        "2",
        "16",
        "8",
        "4",
    ]  # clients requests errors mismatch


@pytest.mark.slow
def test_1_4_8_clients_each_on_its_own_connection(tmp_path, minilm_tokenizer, dev_v11):
    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    bundle = write_tiny_bundle(tmp_path / "bundle", minilm_tokenizer, -1.0)
    questions = [(e.question, e.context) for e in dev_v11.examples[:60]]
    expected = {
        q: a.text for (q, _), a in zip(questions, QAModel.load(model).predict(questions), strict=True)
    }
    replies: list[tuple[AskRequest, AnswerReply]] = []
    lock = threading.Lock()

    def keep(request: AskRequest, reply: AnswerReply) -> None:
        with lock:
            replies.append((request, reply))

    with LoopbackDeployment(model, bundle, tmp_path / "work") as dep:
        tunnels: list[SSHTunnelClient] = []
        make_tunnel = dep.make_tunnel

        def counted_tunnel(device_id: str) -> SSHTunnelClient:
            tunnels.append(make_tunnel(device_id))
            return tunnels[-1]

        dep.make_tunnel = counted_tunnel  # see every connection the benchmark opens
        before = dep.server.store.stats()
        results = dep.server_throughput(
            questions, CLIENTS, per_client=PER_CLIENT, warmup=WARMUP, on_reply=keep
        )
        after = dep.server.store.stats()
    print("\n" + format_throughput(results))

    assert list(results) == list(CLIENTS)
    for n, r in results.items():
        assert r["clients"] == n
        assert r["requests"] == r["answered"] == n * PER_CLIENT, r["error_examples"]
        assert (r["errors"], r["mismatches"], r["error_examples"]) == (0, 0, [])
        assert r["seconds"] > 0 and r["throughput_qps"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert 0 < r["mean_ms"] <= r["max_ms"]

    # every timed answer is the full model's own answer to that question, under its own id
    assert len(replies) == sum(CLIENTS) * PER_CLIENT
    assert all(reply.id == request.id for request, reply in replies)
    assert len({request.id for request, _ in replies}) == len(replies)
    assert [reply.text for _, reply in replies] == [expected[request.question] for request, _ in replies]

    # one persistent SSH connection per simulated device, used for all its requests
    assert len(tunnels) == sum(CLIENTS)
    assert all(t.stats.connects == 1 and t.stats.reconnects == 0 for t in tunnels)
    assert all(t.stats.requests == WARMUP + PER_CLIENT for t in tunnels)

    # every ask (warm-up included) is a real offload, stored under its device's id
    per_run = WARMUP + PER_CLIENT
    assert after.offloads - before.offloads == sum(CLIENTS) * per_run
    bench = {d: c for d, c in after.per_device.items() if d.startswith("bench-")}
    runs_with_k = {k: sum(1 for n in CLIENTS if k < n) for k in range(max(CLIENTS))}
    assert bench == {f"bench-{k}": runs * per_run for k, runs in runs_with_k.items()}


@pytest.mark.slow
def test_a_second_run_into_the_same_work_dir_is_answered_too(tmp_path, minilm_tokenizer):
    """Notebook 05 reruns into the same directory: the simulated devices' keys are on disk from
    the first run and ``authorized_keys`` is written anew at start; every device must still be
    let in (it once was not: every ask of the second run was ``AuthenticationRejected``)."""
    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    bundle = write_tiny_bundle(tmp_path / "bundle", minilm_tokenizer, -1.0)
    questions = [("Who wrote it?", "It was written by Ada Lovelace in 1843.")]
    for run in ("first", "second"):
        with LoopbackDeployment(model, bundle, tmp_path / "work") as dep:
            results = dep.server_throughput(questions, (1, 2), per_client=2, warmup=1)
        for n, r in results.items():
            assert (r["errors"], r["answered"], r["error_examples"]) == (0, 2 * n, []), f"{run} run, {n}"
