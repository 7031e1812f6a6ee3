"""The model service under abuse: poison contexts, huge contexts and deadlines, 200 devices at
once, and devices that claim another device's name — with a tiny real QA model, the real
loopback socket server and real SQLite stores."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest
from qa_fixtures import save_tiny_artifact

from elma_utils.edge.identity import DeviceRegistry, sign_request, signature_valid
from elma_utils.edge.protocol import (
    AnswerReply,
    AskRequest,
    EdgeResult,
    ErrorReply,
    LineReader,
    decode,
    encode,
)
from elma_utils.edge.ssh_keys import generate_ed25519_key, public_key_line
from elma_utils.server.service import LISTEN_BACKLOG, ModelAnswerer, OffloadServer, ServerAnswer
from elma_utils.server.store import HardQuestionStore

pytestmark = pytest.mark.network

CONTEXT = "The Seine flows through Paris. The Loire is the longest river in France."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer):
    return save_tiny_artifact(tmp_path_factory.mktemp("hardening-model") / "tiny", minilm_tokenizer)


@pytest.fixture(scope="module")
def answerer(model_dir):
    return ModelAnswerer.load(model_dir)


def _ask(rid: str, question: str = "Which river flows through Paris?", context: str = CONTEXT, **kw):
    edge = EdgeResult(text="x", model_version="edge-t", exit_layer=None, entropies=(0.9, 0.8))
    return AskRequest(
        id=rid, device_id=kw.pop("device", "dev-1"), question=question, edge=edge, context=context, **kw
    )


def _exchange(address, lines: list[bytes], timeout: float = 30.0) -> list:
    """Send each line over one connection and decode one reply per line."""
    with socket.create_connection(address, timeout=timeout) as sock:
        replies, reader = [], LineReader(1 << 22)
        for line in lines:
            sock.sendall(line)
            while len(replies) < lines.index(line) + 1:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                replies.extend(decode(item) for item in reader.feed(chunk))
        return replies


# ------------------------------------------------------------------ poison contexts


@pytest.mark.parametrize("context", ["\u200b" * 40, "\x00" * 40, "\u00ad\ufeff\u200b" * 20, "\ufeff"])
def test_a_context_the_model_cannot_read_gets_a_no_answer_reply(answerer, tmp_path, context):
    """Contexts of only zero-width spaces, NUL, soft hyphens or a BOM used to give a score of
    -inf, which the protocol refused: the device would have resent the question for ever."""
    with OffloadServer(answerer, tmp_path / "s.sqlite3") as srv:
        (reply,) = _exchange(srv.address, [encode(_ask("r1", context=context))])
        assert isinstance(reply, AnswerReply), reply
        assert reply.no_answer and reply.text == "" and reply.start is None and reply.score == 0.0
        assert srv.store.stats().offloads == 1  # stored like any other hard question


def test_non_finite_scores_become_no_answer():
    from elma_utils.server.service import _server_answer

    class A:  # the fields QAModel.predict gives
        def __init__(self, score, no_answer=False, start=3):
            self.score, self.no_answer, self.char_start, self.char_end, self.text = (
                score,
                no_answer,
                start,
                8,
                "Seine",
            )

    assert _server_answer(A(float("-inf"))) == ServerAnswer("", None, None, 0.0, True)
    assert _server_answer(A(float("nan"))) == ServerAnswer("", None, None, 0.0, True)
    assert _server_answer(A(2.5)) == ServerAnswer("Seine", 3, 8, 2.5, False)


# ------------------------------------------------------------------ sizes and deadlines


def test_an_oversized_context_is_refused_before_the_model_runs(answerer, tmp_path):
    with OffloadServer(answerer, tmp_path / "s.sqlite3", max_context_chars=5_000) as srv:
        big = (CONTEXT + " ") * 200  # 14,600 characters
        t0 = time.perf_counter()
        refused, answered = _exchange(srv.address, [encode(_ask("big", context=big)), encode(_ask("ok"))])
        assert isinstance(refused, ErrorReply) and refused.code == "too_large" and refused.id == "big"
        assert "5000" in refused.message and "--max-context-chars" in refused.message
        assert isinstance(answered, AnswerReply) and answered.id == "ok"
        assert srv.service.batcher.answered == 1  # the big one never reached the model
        assert srv.store.stats().offloads == 1
        print(f"refusal + one answer in {1000 * (time.perf_counter() - t0):.0f} ms")


class _SlowAnswerer:
    """A stand-in model that takes ``seconds`` per batch (the thing under test is the deadline)."""

    model_version = "slow-1"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def answer_batch(self, pairs):
        time.sleep(self.seconds)
        return [ServerAnswer("Seine", 4, 9, 1.0, False) for _ in pairs]


def test_a_deadline_of_an_hour_is_cut_to_the_servers_cap(tmp_path):
    with OffloadServer(_SlowAnswerer(3.0), tmp_path / "s.sqlite3", max_deadline_ms=500) as srv:
        t0 = time.perf_counter()
        (reply,) = _exchange(srv.address, [encode(_ask("long", deadline_ms=3_600_000))])
        waited = time.perf_counter() - t0
    assert isinstance(reply, ErrorReply) and reply.code == "overloaded" and "500 ms" in reply.message
    assert waited < 2.5, f"the server held the request {waited:.1f} s, past its 0.5 s cap"


# ------------------------------------------------------------------ 200 devices at once


def _listen_backlog(port: int) -> int:
    """The accept queue of the listening socket on ``port``, as the kernel reports it (ss's Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[2])


def test_two_hundred_simultaneous_asks_are_all_answered(tmp_path):
    with OffloadServer(_SlowAnswerer(0.002), tmp_path / "s.sqlite3", max_batch=64) as srv:
        assert _listen_backlog(srv.port) == LISTEN_BACKLOG == 256  # socketserver's default is 5
        replies: dict[int, object] = {}
        start = threading.Barrier(200)

        def one(i: int) -> None:
            start.wait()
            try:
                (replies[i],) = _exchange(
                    srv.address, [encode(_ask(f"r{i}", device=f"dev-{i}", deadline_ms=20_000))], 20
                )
            except OSError as exc:
                replies[i] = exc

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        elapsed = time.perf_counter() - t0
        answered = [i for i, r in replies.items() if isinstance(r, AnswerReply) and r.id == f"r{i}"]
        print(f"200 simultaneous asks: {len(answered)} answered in {elapsed:.2f} s")
        assert len(answered) == 200, {i: r for i, r in replies.items() if i not in answered}
        assert srv.store.stats().offloads == 200


# ------------------------------------------------------------------ device identity


@pytest.fixture
def devices(tmp_path):
    """Two registered devices (comment = device id) and a key that is registered nowhere."""
    keys = {
        name: generate_ed25519_key(tmp_path / name, comment=name) for name in ("tx2-a", "tx2-b", "stranger")
    }
    ak = tmp_path / "authorized_keys"
    ak.write_text(
        f"{public_key_line(keys['tx2-a'], 'tx2-a')}\n"
        f'restrict,port-forwarding,permitopen="127.0.0.1:1" {public_key_line(keys["tx2-b"], "tx2-b")}\n'
    )
    return keys, ak


def test_signatures_bind_the_device_id_to_its_key(devices):
    keys, ak = devices
    registry = DeviceRegistry(ak)
    assert set(registry.devices()) == {"tx2-a", "tx2-b"}
    signed = sign_request(_ask("r1", device="tx2-a"), keys["tx2-a"])
    registry.verify(signed)
    # The signature covers the content: the by-reference form of the same request verifies too ...
    by_ref = AskRequest(
        signed.id, signed.device_id, signed.question, signed.edge, None, signed.ref, 900, signed.sig
    )
    registry.verify(by_ref)
    assert decode(encode(signed)) == signed
    # ... and any change of question, id or device breaks it.
    for changed in (
        AskRequest("r2", "tx2-a", signed.question, signed.edge, CONTEXT, sig=signed.sig),
        AskRequest("r1", "tx2-a", "Which river is longest?", signed.edge, CONTEXT, sig=signed.sig),
        AskRequest("r1", "tx2-b", signed.question, signed.edge, CONTEXT, sig=signed.sig),
    ):
        assert not any(signature_valid(changed, k) for k in keys.values())
        with pytest.raises(ValueError, match="forbidden"):
            registry.verify(changed)


def test_the_server_refuses_asks_not_signed_by_the_claimed_device(answerer, devices, tmp_path):
    keys, ak = devices
    with OffloadServer(answerer, tmp_path / "s.sqlite3", registry=DeviceRegistry(ak)) as srv:
        lines = [
            encode(sign_request(_ask("a1", device="tx2-a"), keys["tx2-a"])),  # genuine
            encode(_ask("a2", device="tx2-a")),  # unsigned
            encode(sign_request(_ask("a3", device="tx2-a"), keys["tx2-b"])),  # b signs as a
            encode(sign_request(_ask("s1", device="stranger"), keys["stranger"])),  # not registered
            encode(sign_request(_ask("b1", device="tx2-b"), keys["tx2-b"])),  # genuine, with options
        ]
        replies = _exchange(srv.address, lines)
        assert [type(r).__name__ for r in replies] == [
            "AnswerReply",
            "ErrorReply",
            "ErrorReply",
            "ErrorReply",
            "AnswerReply",
        ]
        assert [getattr(r, "code", None) for r in replies[1:4]] == ["forbidden"] * 3
        assert "not signed" in replies[1].message and "not registered" in replies[3].message
        assert srv.store.stats().offloads == 2

        # Revoking tx2-a (its line removed) stops its very next ask, on the same connection.
        ak.write_text(ak.read_text().splitlines()[1] + "\n")
        (after,) = _exchange(srv.address, [encode(sign_request(_ask("a4", device="tx2-a"), keys["tx2-a"]))])
        assert isinstance(after, ErrorReply) and after.code == "forbidden"


def test_a_reused_request_id_with_other_content_is_a_conflict(answerer, devices, tmp_path):
    keys, ak = devices
    store_path = tmp_path / "s.sqlite3"
    with OffloadServer(answerer, store_path, registry=DeviceRegistry(ak)) as srv:
        first = sign_request(_ask("r1", device="tx2-a"), keys["tx2-a"])
        planted = sign_request(
            _ask("r1", question="What is the capital of Spain?", device="tx2-a"), keys["tx2-a"]
        )
        replies = _exchange(srv.address, [encode(first), encode(first), encode(planted)])
    assert isinstance(replies[0], AnswerReply) and isinstance(replies[1], AnswerReply)  # a retry
    assert isinstance(replies[2], ErrorReply) and replies[2].code == "conflict"
    with HardQuestionStore(store_path) as store:
        stats = store.stats()
        row = store.offload(1)
    assert stats.offloads == 1 and stats.retries == 1
    assert row["question"] == "Which river flows through Paris?"  # the first text stands


# ------------------------------------------------------------------ `elma serve` as an administrator runs it


def _serve_behind_endpoint(model_dir, work):
    """``elma serve --ssh-port 0`` in its own process; returns (process, ssh port, service port)."""
    import re
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "elma_utils.cli", "serve", "--model", str(model_dir),
         "--store", str(work / "server" / "hard.sqlite3"), "--ssh-port", "0",
         "--authorized-keys", str(work / "authorized_keys"), "--host-key", str(work / "host_ed25519")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines = []
    while not any("devices forward to" in line for line in lines):
        line = proc.stdout.readline()
        assert line, f"elma serve exited: {lines}"
        lines.append(line)
    m = re.search(r"SSH endpoint on 127\.0\.0\.1:(\d+).*devices forward to 127\.0\.0\.1:(\d+)", lines[-1])
    return proc, int(m.group(1)), int(m.group(2)), lines


def test_elma_serve_behind_its_endpoint_binds_no_tcp_service_and_checks_who_asks(
    model_dir, tmp_path, minilm_tokenizer
):
    """The service sits on a 0600 Unix socket (no TCP port another local user could reach);
    a registered device is answered; a device signing as another is refused and its outbox
    sets the question aside; `elma keys revoke` cuts the device off on its live connection."""
    import os
    import sys

    from qa_fixtures import write_tiny_bundle

    from elma_utils.edge.client import EdgeQA
    from elma_utils.edge.outbox import Outbox
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.edge.ssh_client import SSHTunnelClient
    from elma_utils.edge.ssh_keys import add_known_host, load_private_key
    from elma_utils.server.device_keys import add_device

    for name in ("tx2-a", "tx2-b"):
        generate_ed25519_key(tmp_path / name, comment=name)
        add_device(tmp_path / "authorized_keys", name, tmp_path / f"{name}.pub")
    generate_ed25519_key(tmp_path / "host_ed25519")
    proc, ssh_port, service_port, lines = _serve_behind_endpoint(model_dir, tmp_path)
    try:
        sock = tmp_path / "server" / "elma-service.sock"
        assert any(str(sock) in line for line in lines), lines
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        ours = [line for line in listening.splitlines() if f"pid={proc.pid}," in line]
        assert len(ours) == 1 and f":{ssh_port} " in ours[0], ours  # the SSH endpoint, nothing else

        known = add_known_host(
            tmp_path / "known_hosts", "127.0.0.1", ssh_port, load_private_key(tmp_path / "host_ed25519")
        )
        bundle = EdgeModel.load(write_tiny_bundle(tmp_path / "edge", minilm_tokenizer, -1.0))  # never settles

        def device(key: str, claims: str) -> EdgeQA:
            tunnel = SSHTunnelClient(
                "127.0.0.1", ssh_port, "elma", tmp_path / key, known, ("127.0.0.1", service_port), timeout=10
            )
            return EdgeQA(
                bundle,
                tunnel,
                Outbox(tmp_path / f"outbox-{key}.sqlite3"),
                device_id=claims,
                deadline_ms=10_000,
            )

        genuine, impostor = device("tx2-a", "tx2-a"), device("tx2-b", "tx2-a")
        ok = genuine.answer("Which river flows through Paris?", CONTEXT)
        assert ok.source == "server", ok.error
        forged = impostor.answer("Which river flows through Paris?", CONTEXT)
        assert forged.source == "edge-fallback" and "forbidden" in forged.error
        impostor.flush_outbox()
        (aside,) = impostor.outbox.dead()
        assert "forbidden" in aside.last_error and len(impostor.outbox) == 0

        done = subprocess.run(
            [sys.executable, "-m", "elma_utils.cli", "keys", "revoke", "--authorized-keys", str(tmp_path / "authorized_keys"), "--device", "tx2-a"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while genuine.tunnel.is_connected() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not genuine.tunnel.is_connected(), "the revoked device's connection is still open"
        after = genuine.answer("Which river is the longest in France?", CONTEXT)
        assert after.source == "edge-fallback"
        for qa in (genuine, impostor):
            qa.tunnel.close()
            qa.outbox.close()
    finally:
        proc.terminate()
        proc.wait(15)
    with HardQuestionStore(tmp_path / "server" / "hard.sqlite3") as store:
        assert store.stats().offloads == 1  # only the genuine ask
    assert not os.path.exists(sock)  # removed on a clean shutdown
