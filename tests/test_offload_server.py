"""The offload server and the edge client, with real parts: a tiny real QA model, SQLite
files, the loopback socket server, ELMA's SSH endpoint and a real OpenSSH sshd, and
`elma serve` as a subprocess killed with SIGKILL under load."""

from __future__ import annotations

import getpass
import json
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle
from ssh_helpers import make_keys, pin, talk_lines

from elma_utils.edge.client import EdgeQA
from elma_utils.edge.outbox import Outbox
from elma_utils.edge.protocol import (
    AnswerReply,
    AskRequest,
    EdgeResult,
    ErrorReply,
    Pong,
    context_ref,
    decode,
    encode,
)
from elma_utils.edge.runtime import EdgeModel
from elma_utils.edge.ssh_client import OffloadUnavailable, SSHTunnelClient
from elma_utils.edge.ssh_keys import generate_ed25519_key, load_private_key
from elma_utils.model.inference import QAModel
from elma_utils.server.service import ModelAnswerer, OffloadServer
from elma_utils.server.ssh_endpoint import SSHEndpoint
from elma_utils.server.sshd import free_loopback_port, start_sshd
from elma_utils.server.store import HardQuestionStore

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer):
    return save_tiny_artifact(tmp_path_factory.mktemp("server-model") / "tiny", minilm_tokenizer)


@pytest.fixture(scope="module")
def qa(model_dir):
    return QAModel.load(model_dir)


@pytest.fixture(scope="module")
def questions(dev_v11):
    """120 real dev questions (several share a context, as on a device reading one text)."""
    return [(e.question, e.context) for e in dev_v11.examples[:120]]


@pytest.fixture(scope="module")
def expected(qa, questions):
    """What the full model says, computed directly (not through the server)."""
    return {q: a.text for (q, _), a in zip(questions, qa.predict(questions), strict=True)}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = OffloadServer(ModelAnswerer.load(model_dir), tmp_path_factory.mktemp("store") / "hard.sqlite3")
    srv.start()
    yield srv
    srv.close()


def _ask(i: int, question: str, context: str, device: str = "dev-1", **kw) -> AskRequest:
    edge = EdgeResult(text="x", model_version="edge-t", exit_layer=None, entropies=(0.9, 0.8))
    return AskRequest(id=f"r{i}", device_id=device, question=question, edge=edge, context=context, **kw)


# -- the service on its loopback socket ------------------------------------------------------------
def test_answers_match_the_model_and_are_stored_before_the_reply(server, questions, expected):
    lines = [encode(_ask(i, q, c)).rstrip(b"\n") for i, (q, c) in enumerate(questions[:20])]
    replies = [decode(r) for r in talk_lines(("127.0.0.1", server.port), lines)]
    assert [r.id for r in replies] == [f"r{i}" for i in range(20)]
    assert all(isinstance(r, AnswerReply) for r in replies)
    assert [r.text for r in replies] == [expected[q] for q, _ in questions[:20]]
    for r, (_, c) in zip(replies, questions[:20], strict=True):
        assert r.text == c[r.start : r.end] and r.server_ms > 0 and r.model_version == "tiny-server-0"
    with HardQuestionStore(server.store.db.path) as other:  # a second reader sees every row
        assert other.stats().offloads >= 20


def test_bad_messages_get_error_replies_and_the_connection_lives_on(server, questions):
    q, c = questions[0]
    good = encode(_ask(900, q, c)).rstrip(b"\n")
    ask = json.loads(good)
    ask_v9 = json.dumps({**ask, "v": 9, "id": "r902"}).encode()
    ask_ref = json.dumps({**{k: v for k, v in ask.items() if k != "context"}, "id": "r903",
                          "context_ref": "0" * 64}).encode()  # fmt: skip
    lines = [b"{not json", b"\xff\xfe", b"[1, 2]", ask_v9, ask_ref, b'{"v":1,"type":"ping","id":"p1"}', good]
    replies = [decode(r) for r in talk_lines(("127.0.0.1", server.port), lines)]
    codes = [r.code if isinstance(r, ErrorReply) else type(r).__name__ for r in replies]
    assert codes == ["malformed", "malformed", "malformed", "unsupported_version", "unknown_context", "Pong",
                     "AnswerReply"]  # fmt: skip
    assert replies[3].id == "r902" and replies[4].id == "r903" and replies[5] == Pong("p1")


def test_an_oversized_line_is_refused_without_killing_the_server(server, questions):
    q, c = questions[0]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"x" * (3 << 20) + b"\n")
        assert decode(reader.readline().rstrip(b"\n")).code == "too_large"
        sock.sendall(encode(_ask(950, q, c)))
        assert isinstance(decode(reader.readline().rstrip(b"\n")), AnswerReply)


def test_a_known_context_can_be_sent_by_reference(server, questions, expected):
    q, c = questions[1]
    [first] = talk_lines(("127.0.0.1", server.port), [encode(_ask(960, q, c)).rstrip(b"\n")])
    by_ref = AskRequest("r961", "dev-1", q, _ask(0, q, c).edge, context_ref=context_ref(c))
    [second] = talk_lines(("127.0.0.1", server.port), [encode(by_ref).rstrip(b"\n")])
    assert decode(first).text == decode(second).text == expected[q]


def test_listens_on_loopback_only(model_dir, tmp_path):
    with pytest.raises(ValueError, match="loopback only"):
        OffloadServer(ModelAnswerer.load(model_dir), tmp_path / "s.sqlite3", host="0.0.0.0")


def test_unix_socket(model_dir, tmp_path, questions, expected):
    path = tmp_path / "elma.sock"
    with OffloadServer(ModelAnswerer.load(model_dir), tmp_path / "s.sqlite3", unix_socket=path):
        assert path.stat().st_mode & 0o777 == 0o600
        q, c = questions[2]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(encode(_ask(1, q, c)))
            assert decode(sock.makefile("rb").readline().rstrip(b"\n")).text == expected[q]
    assert not path.exists()


# -- through SSH: ELMA's endpoint and OpenSSH ------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def endpoint(keys, server, tmp_path_factory):
    host_key = tmp_path_factory.mktemp("ep") / "host_ed25519"
    generate_ed25519_key(host_key)
    ep = SSHEndpoint(host_key, keys.authorized_keys, ("127.0.0.1", server.port)).start()
    pin(keys.known_hosts, ep.port, load_private_key(host_key))
    yield ep
    ep.close()


@pytest.fixture(scope="module")
def sshd(keys, server, tmp_path_factory):
    srv = start_sshd(
        tmp_path_factory.mktemp("sshd"),
        authorized_keys_path=keys.authorized_keys,
        permit_open=("127.0.0.1", server.port),
    )
    pin(keys.known_hosts, srv.port, srv.host_key)
    yield srv
    srv.stop()


def _tunnel(keys, ssh_port: int, service_port: int) -> SSHTunnelClient:
    return SSHTunnelClient(
        "127.0.0.1", ssh_port, getpass.getuser(), keys.client_key, keys.known_hosts,
        ("127.0.0.1", service_port), timeout=10,
    )  # fmt: skip


@pytest.fixture(scope="module")
def offload_bundle(tmp_path_factory, minilm_tokenizer):
    """E_T below any entropy: the edge never settles, every question is offloaded."""
    return write_tiny_bundle(tmp_path_factory.mktemp("edge") / "b", minilm_tokenizer, -1.0, seed=5)


@pytest.mark.parametrize("way_in", ["endpoint", "sshd"])
def test_edge_offloads_unsolved_questions_over_ssh(request, way_in, keys, server, offload_bundle, questions,
                                                   expected, tmp_path):  # fmt: skip
    ssh = request.getfixturevalue(way_in)
    tunnel = _tunnel(keys, ssh.port, server.port)
    edge = EdgeQA(EdgeModel.load(offload_bundle), tunnel, Outbox(tmp_path / "out.sqlite3"), device_id="tx2-a")
    try:
        results = [edge.answer(q, c) for q, c in questions[:12]]
    finally:
        tunnel.close()
    assert [r.source for r in results] == ["server"] * 12, results[0].error
    assert [r.text for r in results] == [expected[q] for q, _ in questions[:12]]
    assert all(r.offload_ms >= r.server_ms > 0 and r.exit_layer == 2 and not r.edge_solved for r in results)
    assert tunnel.stats.reconnects == 0 and tunnel.stats.connects == 1  # one persistent connection


def test_confident_questions_never_leave_the_device(tmp_path, minilm_tokenizer, questions):
    bundle = write_tiny_bundle(tmp_path / "b", minilm_tokenizer, 1.01)  # every entropy ≤ 1: layer 1
    edge = EdgeQA(EdgeModel.load(bundle), tunnel=None, outbox=Outbox(tmp_path / "o.sqlite3"))
    r = edge.answer(*questions[0])
    assert (r.source, r.exit_layer, r.edge_solved, r.offload_ms) == ("edge", 1, True, 0.0)
    assert len(edge.outbox) == 0


def test_load_8_clients_x_500_questions_through_the_endpoint(keys, endpoint, server, questions, expected):
    """Every reply matched to its request; none lost or garbled; all stored."""
    before = server.store.stats().offloads
    errors: list[str] = []

    def client(k: int) -> None:
        tunnel = _tunnel(keys, endpoint.port, server.port)
        try:
            for i in range(500):
                q, c = questions[(k * 37 + i) % len(questions)]
                req = _ask(i, q, c, device=f"load-{k}")
                reply = decode(tunnel.request_line(encode(req), timeout=60))
                if not isinstance(reply, AnswerReply) or reply.id != req.id or reply.text != expected[q]:
                    errors.append(f"client {k} request {i}: {reply!r}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {k}: {type(exc).__name__}: {exc}")
        finally:
            tunnel.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert server.store.stats().offloads - before == 4000
    assert server.service.batcher.batches < server.service.batcher.answered  # requests were batched


# -- kill -9 under load: `elma serve` as a real process --------------------------------------------
def _start_serve(model_dir: Path, store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "elma_utils.cli", "serve", "--model", str(model_dir), "--store", str(store),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert f"listening on 127.0.0.1:{port}" in line, line
    return proc


def test_kill_9_under_load_loses_no_acknowledged_record(
    model_dir, tmp_path, questions, expected, keys, minilm_tokenizer
):
    """Devices keep asking while the server is SIGKILLed and restarted: every answer a device
    received is in the store, questions asked meanwhile fall back and reach it later."""
    store = tmp_path / "hard.sqlite3"
    port = free_loopback_port()
    proc = _start_serve(model_dir, store, port)
    host_key = tmp_path / "host_ed25519"
    generate_ed25519_key(host_key)
    endpoint = SSHEndpoint(host_key, keys.authorized_keys, ("127.0.0.1", port)).start()
    known = tmp_path / "known_hosts"
    pin(known, endpoint.port, load_private_key(host_key))
    acknowledged: list[tuple[str, str]] = []
    fallbacks = []
    bundle = write_tiny_bundle(tmp_path / "edge", minilm_tokenizer, -1.0, seed=5)
    stop = threading.Event()

    def device(k: int) -> None:
        tunnel = SSHTunnelClient("127.0.0.1", endpoint.port, "elma", keys.client_key, known, ("127.0.0.1", port),
                                 timeout=5)  # fmt: skip
        edge = EdgeQA(EdgeModel.load(bundle), tunnel, Outbox(tmp_path / f"outbox-{k}.sqlite3"),
                      device_id=f"d{k}", deadline_ms=3000)  # fmt: skip
        i = 0
        while not stop.is_set():
            q, c = questions[(k * 11 + i) % len(questions)]
            r = edge.answer(q, c)
            if r.source == "server":
                assert r.text == expected[q]
                acknowledged.append((f"d{k}", r.request_id))
            else:
                r.device_id = f"d{k}"
                fallbacks.append(r)
            i += 1
        devices[k] = edge

    devices: dict[int, EdgeQA] = {}
    threads = [threading.Thread(target=device, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = len(acknowledged)
    time.sleep(1.0)  # questions asked now fall back to the device and wait in the outbox
    proc = _start_serve(model_dir, store, port)
    time.sleep(2.0)  # devices reconnect (backoff) and drain their outboxes
    stop.set()
    for t in threads:
        t.join(60)
    try:
        assert killed_at >= 40 and fallbacks, "the kill must hit a server under load"
        assert all(r.source == "edge-fallback" and r.error for r in fallbacks)
        for edge in devices.values():  # whatever is left is sent now the server is back
            edge.flush_outbox()
            assert len(edge.outbox) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        endpoint.close()
    with sqlite3.connect(store) as db:
        stored = set(db.execute("SELECT device_id, request_id FROM offloads"))
        (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
    assert integrity == "ok"
    assert set(acknowledged) <= stored
    assert {(r.device_id, r.request_id) for r in fallbacks} <= stored  # sent from the outboxes


def test_unreachable_server_falls_back_to_the_device(tmp_path, keys, offload_bundle, questions):
    port = free_loopback_port()  # nothing listens here
    tunnel = SSHTunnelClient("127.0.0.1", port, "elma", keys.client_key, keys.known_hosts, ("127.0.0.1", 1),
                             timeout=1)  # fmt: skip
    edge = EdgeQA(EdgeModel.load(offload_bundle), tunnel, Outbox(tmp_path / "o.sqlite3"))
    r = edge.answer(*questions[0])
    assert r.source == "edge-fallback" and "OffloadUnavailable" in r.error and r.text
    assert len(edge.outbox) == 1 and edge.outbox.pending()[0].request.question == questions[0][0]
    with pytest.raises(OffloadUnavailable):
        edge.send(edge.outbox.pending()[0].request)


class _SlowEcho(socketserver.StreamRequestHandler):
    """Replies to each line after 0.5 s: long enough to cut the SSH connection meanwhile."""

    def handle(self) -> None:
        for line in self.rfile:
            time.sleep(0.5)
            self.wfile.write(line)


def test_a_connection_dropped_mid_request_is_retried_on_a_new_one(keys, tmp_path):
    slow = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SlowEcho)
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    host_key = tmp_path / "host_ed25519"
    generate_ed25519_key(host_key)
    ep = SSHEndpoint(host_key, keys.authorized_keys, slow.server_address).start()
    pin(keys.known_hosts, ep.port, load_private_key(host_key))
    tunnel = _tunnel(keys, ep.port, slow.server_address[1])
    try:
        assert tunnel.request_line(b"warm-up", timeout=10) == b"warm-up"
        got: list[bytes] = []
        asking = threading.Thread(target=lambda: got.append(tunnel.request_line(b"in flight", timeout=10)))
        asking.start()
        time.sleep(0.2)  # the request is on the wire, its reply not yet
        assert ep.drop_connections() == 1
        asking.join(15)
        assert got == [b"in flight"]
        assert tunnel.stats.reconnects == 1 and tunnel.stats.retried_requests == 1
    finally:
        tunnel.close()
        ep.close()
        slow.shutdown()
        slow.server_close()
