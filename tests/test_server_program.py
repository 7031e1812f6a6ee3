"""The server program as an administrator runs it: `elma serve --listen/--server-root` in its own
process with a tiny real model, ELMA's SSH endpoint, a signing device, a real SQLite store;
a clean stop on SIGTERM; `elma status` beside it; the growth loop publishing a real retrained
edge by itself while the server keeps answering; the systemd units."""

from __future__ import annotations

import configparser
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from qa_fixtures import save_tiny_artifact

from elma_utils.edge.identity import sign_request
from elma_utils.edge.protocol import AnswerReply, AskRequest, EdgeResult, ErrorReply, Message, decode, encode
from elma_utils.edge.ssh_client import SSHTunnelClient
from elma_utils.edge.ssh_keys import add_known_host, generate_ed25519_key, load_private_key
from elma_utils.server import publish
from elma_utils.server.device_keys import add_device
from elma_utils.server.status import ServerLayout
from elma_utils.server.store import HardQuestionStore

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
CONTEXTS = [
    "The Seine flows through Paris. The Loire is the longest river in France, about 1,000 km long.",
    "Marie Curie was born in Warsaw in 1867. She won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.",
    "The Great Wall of China was built over many centuries. Its best-known parts date from the Ming dynasty.",
    "Mount Kilimanjaro is in Tanzania. At 5,895 metres it is the highest mountain in Africa.",
    "The Amazon rainforest covers much of Brazil. The Amazon river carries more water than any other river.",
    "Johannes Gutenberg introduced printing with movable type in Europe around 1440 in Mainz.",
    "The Pacific is the largest ocean on Earth. The Mariana Trench, its deepest point, is about 11 km deep.",
    "Ada Lovelace wrote the first published program, for Charles Babbage's Analytical Engine, in 1843.",
]
QUESTIONS = [
    "Which river flows through Paris?",
    "Where was Marie Curie born?",
    "Which dynasty built the best-known parts of the Great Wall?",
    "How high is Mount Kilimanjaro?",
    "Which river carries the most water?",
    "When did Gutenberg introduce movable type?",
    "How deep is the Mariana Trench?",
    "Who wrote the first published program?",
    "What is the longest river in France?",
    "When did Marie Curie win the Nobel Prize in Chemistry?",
    "In which country is Mount Kilimanjaro?",
    "In which city did Gutenberg print?",
]


def qa(i: int) -> tuple[str, str]:
    """The i-th question with its context, cycling through eight contexts."""
    return QUESTIONS[i % len(QUESTIONS)], CONTEXTS[i % len(QUESTIONS) % len(CONTEXTS)]


# ------------------------------------------------------------------ a server root with a first edge published
@pytest.fixture(scope="module")
def template(tmp_path_factory, minilm_tokenizer):
    """A tiny 3-layer full model and a server root holding its first edge (2 layers, zeroed exits
    that never settle, so a retrained one can only be no worse) and one registered device."""
    from elma_utils.early_exit.experiment import load_exits_model_from
    from elma_utils.export.bundle import write_bundle

    work = tmp_path_factory.mktemp("program")
    full = save_tiny_artifact(work / "full", minilm_tokenizer, seed=1, num_layers=3)
    edge, _, _ = load_exits_model_from(full, 2)
    for head in edge.exit_heads:
        head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    exits = publish.save_exits(edge, full, work / "exits0", mode="zeroed")
    bundle = write_bundle(
        edge, minilm_tokenizer, work / "bundle0", seq_len=96, precision="float32",
        thresholds={"policy": "entropy", "E_T": 0.97, "rule": "max"}, model_version="tiny-edge-zeroed",
        doc_stride=48, max_query_len=24,
    )  # fmt: skip
    root = work / "root"
    v1 = publish.publish_bundle(bundle, root, exits_dir=exits)
    generate_ed25519_key(work / "dev1", comment="dev1")
    add_device(root / "authorized_keys", "dev1", work / "dev1.pub")
    return SimpleNamespace(work=work, full=full, bundle=bundle, root=root, v1=v1, key=work / "dev1")


def fresh_root(template, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(template.root, root)
    return root


# ------------------------------------------------------------------ `elma serve` in its own process
class Served:
    """A running `elma serve`; its stdout and stderr lines are collected as they come."""

    def __init__(self, args: list[str], prefix: tuple[str, ...] = ()):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "elma_utils.cli", "serve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            with self._changed:
                self.lines[name].append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, stream: str = "err", after: int = 0, limit_s: float = 300) -> re.Match:
        """The first line (from index ``after``) matching ``pattern``; fails if the server exits first."""
        rx, end = re.compile(pattern), time.monotonic() + limit_s
        with self._changed:
            while True:
                for line in self.lines[stream][after:]:
                    if m := rx.search(line):
                        return m
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                    pytest.fail(
                        f"elma serve exited ({self.proc.returncode}) before {pattern!r}:\n" + self.text()
                    )
                assert time.monotonic() < end, f"no {pattern!r} within {limit_s} s:\n{self.text()}"
                self._changed.wait(0.5)

    def index(self, pattern: str, stream: str = "err") -> int:
        rx = re.compile(pattern)
        return next(i for i, line in enumerate(self.lines[stream]) if rx.search(line))

    def text(self) -> str:
        return "\n".join(self.lines["out"] + self.lines["err"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(120)
        for t in self._readers:
            t.join(10)
        return rc


def endpoint_of(served: Served) -> tuple[str, int, int]:
    m = served.wait_for(
        r"SSH endpoint on \[?([\d.:a-f]+)\]?:(\d+) .*devices forward to 127\.0\.0\.1:(\d+)", "out"
    )
    return m.group(1), int(m.group(2)), int(m.group(3))


class Device:
    """A registered device: logs in with its key, signs each ask, waits for the reply."""

    def __init__(self, root: Path, key: Path, host: str, port: int, service_port: int, tmp: Path):
        known = add_known_host(
            tmp / f"known_hosts-{host}-{port}", host, port, load_private_key(ServerLayout(root).host_key)
        )
        self.tunnel = SSHTunnelClient(
            host, port, "elma", key, known, ("127.0.0.1", service_port), timeout=120
        )

    def ask(self, rid: str, question: str, context: str, device: str = "dev1") -> Message:
        edge = EdgeResult(text="", model_version="tiny-edge-zeroed", exit_layer=None, entropies=(1.0, 1.0))
        req = AskRequest(rid, device, question, edge, context=context, deadline_ms=60_000)
        return decode(
            self.tunnel.request_line(encode(sign_request(req, self.tunnel.client_key)), timeout=120)
        )

    def close(self) -> None:
        self.tunnel.close()


def elma(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "elma_utils.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: exit status 2, one line on stderr naming it, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and all(n in lines[0] for n in needles), lines


# ------------------------------------------------------------------ addresses
@pytest.mark.parametrize(
    "listen, needle",
    [
        ("1.2.3:22", "is not an IP address"),
        ("::1:2222", "IPv6 address in brackets"),
        ("[::1]:70000", "port 0-65535"),
        ("[10.0.0.1]:2222", "not an IPv6 address"),
        ("127.0.0.1", "HOST:PORT"),
        ("localhost:2222", "is not an IP address"),
        ("192.0.2.1:2222", "cannot listen on 192.0.2.1:2222"),  # TEST-NET-1: on no interface here
    ],
)
def test_a_wrong_listen_address_is_one_line_before_anything_loads(listen, needle, tmp_path):
    """The model directory does not even exist: the address is checked first."""
    done = elma("serve", "--model", str(tmp_path / "no-model"), "--listen", listen)
    assert_one_line_error(done, "elma serve: error:", needle)
    assert not (tmp_path / "no-model").exists()


def test_a_busy_port_and_missing_keys_are_one_line(template, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = elma("serve", "--model", str(template.full), "--listen", f"127.0.0.1:{port}",
                    "--server-root", str(fresh_root(template, tmp_path)))  # fmt: skip
        assert_one_line_error(done, f"cannot listen on 127.0.0.1:{port}", "in use")
    done = elma("serve", "--model", str(template.full), "--listen", "127.0.0.1:0",
                "--server-root", str(tmp_path / "empty-root"))  # fmt: skip
    assert_one_line_error(done, "authorized_keys", "not found", "elma keys add")
    done = elma("serve", "--model", str(template.full), "--grow-after", "5")
    assert_one_line_error(done, "needs --server-root")
    (tmp_path / "bad.toml").write_text("[retrain]\nepochz = 3\n")
    done = elma("serve", "--model", str(template.full), "--server-root", str(tmp_path / "r"),
                "--grow-after", "5", "--grow-config", str(tmp_path / "bad.toml"))  # fmt: skip
    assert_one_line_error(done, "unknown growth option 'epochz'", "epochs")


def _netns(name: str):
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)


CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_server_program import Device
from pathlib import Path
root, key, port, service, tmp = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
out = {}
for host in ("127.0.0.1", "::1"):
    d = Device(root, key, host, port, service, tmp)
    r = d.ask("q-" + host.replace(":", "x").replace(".", "-"), "Which river flows through Paris?",
              "The Seine flows through Paris. The Loire is the longest river in France.")
    out[host] = [type(r).__name__, getattr(r, "text", None), getattr(r, "message", None)]
    d.close()
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and ip netns")
def test_listen_on_ipv6_any_takes_ipv4_and_ipv6_devices(template, tmp_path):
    """`--listen [::]:PORT` in a network namespace of its own (only its loopback exists): a device
    comes in over 127.0.0.1 and another over ::1, both answered and stored."""
    ns = f"elma-srv-{os.getpid()}"
    _netns(ns)
    prefix = ("ip", "netns", "exec", ns)
    root = fresh_root(template, tmp_path)
    served = Served(["--model", str(template.full), "--server-root", str(root), "--listen", "[::]:0"], prefix)
    try:
        host, port, service = endpoint_of(served)
        assert host == "::"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [*prefix, sys.executable, "-c", CLIENT, str(REPO / "tests"), str(root), str(template.key), str(port),
             str(service), str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        replies = json.loads(done.stdout.splitlines()[-1])
        assert {h: r[0] for h, r in replies.items()} == {"127.0.0.1": "AnswerReply", "::1": "AnswerReply"}, (
            replies
        )
        logins = [line for line in served.lines["err"] if "logged in as" in line]
        assert any("::ffff:127.0.0.1" in line for line in logins) and any("::1:" in line for line in logins)
    finally:
        rc = served.stop()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert rc == 0, served.text()
    with HardQuestionStore(ServerLayout(root).store) as store:
        assert store.stats().offloads == 2


# ------------------------------------------------------------------ logging and a clean stop
def test_sigterm_lets_a_slow_ask_finish_then_exits_0(template, tmp_path):
    """A 49,000-character context is in the model when SIGTERM comes: its device still gets the
    answer (stored first), the process says what it waits for, closes everything and exits 0.
    Client mistakes before it are one log line each, never a traceback; every answered ask is
    one timestamped line with its source and latency."""
    root = fresh_root(template, tmp_path)
    served = Served(["--model", str(template.full), "--server-root", str(root), "--listen", "127.0.0.2:0",
                     "--log-level", "debug"])  # fmt: skip
    host, port, service = endpoint_of(served)
    assert host == "127.0.0.2"
    device = Device(root, template.key, host, port, service, tmp_path)
    q, c = qa(0)
    warm = device.ask("warm-1", q, c)
    assert isinstance(warm, AnswerReply), warm
    forged = device.ask("forged-1", q, c, device="dev-unknown")
    assert isinstance(forged, ErrorReply) and forged.code == "forbidden"
    bad = decode(device.tunnel.request_line(b'{"type": "ask", "v": 1}', timeout=30))
    assert isinstance(bad, ErrorReply) and bad.code in ("malformed", "bad_request")

    long_context = (" ".join(CONTEXTS) + " ") * 80
    long_context = long_context[:49_000]
    reply: list[Message] = []
    asking = threading.Thread(target=lambda: reply.append(device.ask("slow-1", q, long_context)))
    mark = len(served.lines["err"])
    asking.start()
    served.wait_for(r"ask device=dev1 id=slow-1 received", after=mark)
    sent = time.perf_counter()
    served.proc.send_signal(signal.SIGTERM)
    asking.join(120)
    answered_after = time.perf_counter() - sent
    rc = served.stop()
    print(
        f"\nSIGTERM: the slow ask answered {answered_after:.2f} s later, exit after {time.perf_counter() - sent:.2f} s"
    )
    device.close()
    assert rc == 0, served.text()
    assert len(reply) == 1 and isinstance(reply[0], AnswerReply), reply
    err = served.lines["err"]
    stopping = served.index(r"SIGTERM: stopping; waiting up to 10 s for 1 request\(s\) in flight")
    answered = served.index(r"ask device=dev1 id=slow-1 source=server stored")
    assert stopping < answered < served.index(r"elma serve: stopped$"), "\n".join(err)
    assert "Traceback" not in served.text()
    ask_lines = [line for line in err if " ask device=" in line and " received" not in line]
    assert len(ask_lines) == 3 and all(LOG_LINE.match(line) for line in ask_lines), ask_lines
    assert re.search(
        r" INFO [\w.]+: ask device=dev1 id=warm-1 source=server stored \d+\.\d ms$", ask_lines[0]
    )
    assert re.search(
        r" WARNING [\w.]+: ask device=dev-unknown id=forged-1 source=server refused forbidden: ", ask_lines[1]
    )
    assert any("refused a message" in line and "WARNING" in line for line in err)  # the malformed line
    assert not ServerLayout(root).service_socket.exists()  # removed on the way out
    with HardQuestionStore(ServerLayout(root).store) as store:
        stats = store.stats()
    assert stats.offloads == 2 and stats.per_device == {"dev1": 2}


# ------------------------------------------------------------------ status
def test_status_of_an_empty_root_and_of_a_missing_one(tmp_path):
    (tmp_path / "root").mkdir()
    done = elma("status", "--server-root", str(tmp_path / "root"), "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert status["store"]["exists"] is False and status["published"] is None
    assert status["devices"] == [] and status["growth"]["last_run"] is None
    human = elma("status", "--server-root", str(tmp_path / "root"))
    assert "store: none yet" in human.stdout and "published: nothing yet" in human.stdout
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == []  # status wrote nothing
    assert_one_line_error(elma("status", "--server-root", str(tmp_path / "nowhere")), "no server root")


# ------------------------------------------------------------------ the growth loop
def test_growth_step_records_kept_failed_and_waits_for_its_lock(template, tmp_path, monkeypatch):
    """The supervisor's real step (default command) on a store without training questions keeps
    the current version; a failing step is recorded as failed with its last line, a hung one is
    stopped at max_run_seconds; a run while another holds the lock, or before anything is
    published, is skipped."""
    from elma_utils.server.growth import GrowthSettings, GrowthSupervisor

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the step runs this tree's code
    root = fresh_root(template, tmp_path)
    layout = ServerLayout(root)
    HardQuestionStore(layout.store).close()
    sup = GrowthSupervisor(root, layout.store, GrowthSettings(after=1).check())
    kept = sup.run("test: default step")
    assert kept["outcome"] == "kept" and kept["exit_status"] == 3, kept
    assert "0 training" in kept["reason"] and kept["numbers"]["current_version"] == template.v1
    log_text = Path(kept["log"]).read_text()
    assert f"niceness {19}" in log_text, log_text
    state = json.loads(layout.growth_state.read_text())
    assert state["runs"] == 1 and state["running"] is None and state["last_run"]["outcome"] == "kept"

    failing = GrowthSettings(
        after=1, command=[sys.executable, "-c", "print('no data here'); raise SystemExit(5)"]
    )
    sup = GrowthSupervisor(root, layout.store, failing.check())
    failed = sup.run("test: failing step")
    assert failed["outcome"] == "failed" and failed["reason"] == "exit status 5: no data here", failed

    hung = GrowthSettings(after=1, max_run_s=1.0, command=["sleep", "600"])
    stopped = GrowthSupervisor(root, layout.store, hung.check()).run("test: a step that hangs")
    assert stopped["outcome"] == "failed" and "longer than 1 s" in stopped["reason"], stopped
    assert stopped["exit_status"] == -signal.SIGTERM

    with open(layout.growth_lock, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        assert sup.run("test: lock held") is None
    assert json.loads(layout.growth_state.read_text())["runs"] == 3

    state = json.loads(layout.growth_state.read_text())  # a server killed during a run left this
    state["running"] = {**state["last_run"], "pid": 2**22 + 1, "started_at": "2026-01-01T00:00:00+00:00"}
    layout.growth_state.write_text(json.dumps(state))
    recovered = GrowthSupervisor(root, layout.store, failing.check()).state
    assert recovered["running"] is None and recovered["last_run"]["outcome"] == "interrupted"
    assert recovered["last_run"]["started_at"] == "2026-01-01T00:00:00+00:00"

    with HardQuestionStore(layout.store) as store:  # one new question: due on the schedule only
        q, c = qa(0)
        edge = EdgeResult(text="", model_version="tiny-edge-zeroed", entropies=(1.0, 1.0))
        store.record(
            AskRequest("s1", "dev1", q, edge, context=c), AnswerReply("s1", "x", 0.0, False, "m", 1.0)
        )
    assert GrowthSupervisor(root, layout.store, GrowthSettings(after=5).check()).due() is None
    due = GrowthSupervisor(root, layout.store, GrowthSettings(after=5, every_s=1e-6).check()).due()
    assert due == "schedule (--grow-every 1e-06 s), 1 new stored questions", due

    unpublished = tmp_path / "unpublished"
    unpublished.mkdir()
    assert GrowthSupervisor(unpublished, layout.store, failing.check()).run("test: nothing published") is None


def test_growth_step_learns_an_offload_threshold_from_what_devices_reported(
    template, tmp_path, monkeypatch, dev_v11
):
    """The supervisor's real step, when the retrained edge is refused (it must win by 100
    points), learns E_offload from the stored offloads over the questions dev1 reported asking,
    leaves out a device that sent no count, publishes the same weights with it (gate on the
    ``dev_eval`` questions) and records it as the run's outcome."""
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.export.bundle import read_thresholds
    from elma_utils.server.growth import GrowthSettings, GrowthSupervisor
    from elma_utils.server.offload_threshold import weights_fingerprint
    from elma_utils.squad.data import examples_to_squad_json

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    root = fresh_root(template, tmp_path)
    layout = ServerLayout(root)
    # the zeroed edge's last-layer entropy (the uniform one) is what the device would report
    h = EdgeModel.load(template.bundle).answer(*reversed(qa(0))).entropies[-1]
    with HardQuestionStore(layout.store) as store:
        for i in range(6):  # dev1 asked 40 questions and offloaded these 6, all agreeing with the server
            edge = EdgeResult(text="the Loire", model_version=template.v1, entropies=(h, h), asked=5 + 7 * i)
            request = AskRequest(f"g{i}", "dev1", qa(i)[0], edge, context=qa(i)[1])
            store.record(request, AnswerReply(request.id, "the Loire", 0.5, False, "m", 1.0))
        # a device that is not (or no longer) registered, claiming a huge count that would make
        # keeping questions look free, and one that disagrees with the server every time
        rogue = EdgeResult(text="x", model_version=template.v1, entropies=(h, h), asked=10**9)
        store.record(AskRequest("o1", "rogue", qa(1)[0], rogue, context=qa(1)[1]),
                     AnswerReply("o1", "y", 0.5, False, "m", 1.0))  # fmt: skip
    examples = [e for e in dev_v11.examples if not e.is_impossible]
    sets = {}
    for name, part in (("calibration", examples[:8]), ("dev_eval", examples[8:16])):
        sets[name] = tmp_path / f"{name}.json"
        sets[name].write_text(json.dumps(examples_to_squad_json(part)))
    settings = GrowthSettings(  # no full model given: the one the current exits sit on
        after=1,
        options={"calibration": str(sets["calibration"]), "dev_eval": str(sets["dev_eval"]),
                 "squad_version": "1.1", "tolerance": -100.0, "epochs": 1.0, "batch_size": 4},
        offload={"budget": 100.0, "tolerance": 100.0},
    ).check()  # fmt: skip
    run = GrowthSupervisor(root, layout.store, settings).run("test: offload threshold")
    latest = publish.read_latest(root)
    assert run["outcome"] == "published" and run["version"] == latest.version != template.v1, run
    assert "E_offload" in run["reason"] and "the retrained edge was refused" in run["reason"]
    result = json.loads(Path(run["result"]).read_text())
    offload = result["offload"]
    assert run["numbers"]["E_offload"] == pytest.approx(
        h
    )  # the published step's numbers, not the refused one's
    assert run["numbers"]["candidate_system_f1"] == offload["candidate"]["system_f1"]
    assert run["numbers"]["current_system_f1"] == offload["base"]["system_f1"]
    assert (
        offload["asked_by_device"] == {"dev1": 40} and offload["left_out_devices"] == []
    )  # rogue: not registered
    assert offload["learned"]["questions_asked"] == 40 and offload["learned"]["stored_offloads"] == 6
    assert offload["learned"]["kept_on_device"] == 6 and offload["learned"]["E_offload_cost"] == 0.0
    published = publish.bundles_dir(root) / latest.version
    assert read_thresholds(published)["E_offload"] == pytest.approx(h)
    assert weights_fingerprint(published) == weights_fingerprint(publish.bundles_dir(root) / template.v1)
    assert latest.notes["previous"] == template.v1

    # a failing offload step is recorded, not raised; the retraining's outcome stands
    import argparse

    from elma_utils.server.growth import check_offload, offload_step, with_offload_step

    not_a_store = tmp_path / "not-a-store.sqlite3"
    not_a_store.write_text("plain text")
    args = argparse.Namespace(
        store=str(not_a_store), server_root=str(root), server_model=None, full_model=None
    )
    failed = offload_step(args, settings.options, check_offload({}))
    assert not failed["published"] and "cannot open as an SQLite database" in failed["error"], failed
    step = with_offload_step({"published": False, "reason": "kept v1: no better"}, failed)
    assert not step["published"] and step["reason"].startswith(
        "kept v1: no better; offload threshold not learned"
    )

    off = GrowthSettings(after=1, offload={"learn": False}).check()  # turned off: only the retraining
    kept = GrowthSupervisor(root, layout.store, off).run("test: offload step off")
    assert kept["outcome"] == "kept" and "offload" not in json.loads(Path(kept["result"]).read_text())
    with pytest.raises(ValueError, match="offload setting budget"):
        GrowthSettings(after=1, offload={"budget": -1}).check()
    with pytest.raises(ValueError, match="unknown offload setting"):
        GrowthSettings(after=1, offload={"budgte": 1}).check()


def test_growth_config_sets_the_offload_step_and_refuses_bad_values(tmp_path):
    from elma_utils.server.growth import OFFLOAD_DEFAULTS, load_config

    config = tmp_path / "growth.toml"
    config.write_text("after = 3\n[offload]\nbudget = 0.5\n")
    assert load_config(config)["offload"] == {**OFFLOAD_DEFAULTS, "budget": 0.5}
    for bad, needle in (("learn = 1", "learn must be true or false"), ("tolerence = 1", "unknown offload")):
        config.write_text(f"after = 3\n[offload]\n{bad}\n")
        with pytest.raises(ValueError, match=needle):
            load_config(config)


def test_growth_loop_publishes_by_itself_while_answers_keep_coming(template, tmp_path):
    """`--grow-after 8`: the eighth stored question starts a real retrain (distil → gate →
    publish) in a niced process; questions asked while it runs are all answered; the new
    version is published and recorded; `elma status` reads it all while the server runs;
    the next run is interrupted by SIGTERM and recorded so, and the server exits 0.

    The step is the real one, held open after it finished until the test has asked its
    questions, so that they are asked while the run is in progress."""
    root = fresh_root(template, tmp_path)
    layout = ServerLayout(root)
    config = tmp_path / "growth.toml"
    config.write_text(
        "[retrain]\nepochs = 3\nlearning_rate = 0.01\neval_fraction = 0.25\nbatch_size = 4\n"
        "tolerance = 100.0\nseed = 0\n"
    )
    hold = 'until [ -e "$ELMA_GROWTH_RESULT.release" ]; do sleep 0.1; done'
    step = shlex.join(
        ["sh", "-c", f'"$0" -m elma_utils.server.growth run; rc=$?; {hold}; exit $rc', sys.executable]
    )
    served = Served(["--model", str(template.full), "--server-root", str(root), "--listen", "127.0.0.1:0",
                     "--grow-after", "8", "--grow-config", str(config), "--grow-command", step])  # fmt: skip
    device = None
    try:
        host, port, service = endpoint_of(served)
        served.wait_for(r"growth loop on \(0 new stored questions", "out")
        device = Device(root, template.key, host, port, service, tmp_path)
        before = []
        for i in range(8):
            t0 = time.perf_counter()
            r = device.ask(f"a{i}", *qa(i))
            before.append(time.perf_counter() - t0)
            assert isinstance(r, AnswerReply), r
        started = served.wait_for(r"growth: run started: (\d+) new stored questions .*log (\S+)\)$")
        assert int(started.group(1)) == 8
        running = json.loads(layout.growth_state.read_text())["running"]
        result = Path(running["result"])

        during, i = [], 8
        while not result.exists() or len(during) < 8:  # the step computes, then waits for .release
            t0 = time.perf_counter()
            r = device.ask(f"a{i}", *qa(i))
            during.append((time.perf_counter() - t0, result.exists()))
            assert isinstance(r, AnswerReply), r
            i += 1
            time.sleep(0.05)  # a device asking every ~50 ms, not a flood: the step gets the CPU left
        status = json.loads(elma("status", "--server-root", str(root), "--json").stdout)
        assert status["growth"]["running"]["pid"] == running["pid"]
        Path(f"{result}.release").touch()
        finished = served.wait_for(r"growth: run finished in ([\d.]+) s: published")

        state = json.loads(layout.growth_state.read_text())
        run = state["last_run"]
        latest = publish.read_latest(root)
        assert run["outcome"] == "published" and run["version"] == latest.version and latest.serial == 2, run
        assert (
            latest.notes["previous"] == template.v1 and state["last_published"]["version"] == latest.version
        )
        assert run["offloads_at_start"] == 8 and state["offloads_seen"] == 8
        assert run["numbers"]["train_questions"] > 0 and run["numbers"]["held_out_questions"] > 0
        assert "niceness 19" in Path(run["log"]).read_text()
        from elma_utils.export.bundle import verify_bundle

        verify_bundle(publish.bundles_dir(root) / latest.version)

        # the questions asked during the run count toward the next one, which starts by itself
        served.wait_for(
            r"growth: run started: \d+ new stored questions", after=served.index("growth: run finished")
        )
        status = json.loads(elma("status", "--server-root", str(root), "--json", "--recent", "3").stdout)
        asked = 8 + len(during)
        assert status["store"]["offloads"] == asked and status["store"]["retries"] == 0
        assert status["store"]["questions"] == min(asked, len(QUESTIONS))
        assert [r["question"] for r in status["store"]["recent"]] == [qa(asked - 1 - k)[0] for k in range(3)]
        assert status["devices"] == [
            {"device_id": "dev1", "offloads": asked, "last_seen": status["store"]["last_at"],
             "registered": True, "fingerprints": status["devices"][0]["fingerprints"]}
        ]  # fmt: skip
        assert status["published"]["version"] == latest.version and status["published"]["versions"] == 2
        assert status["growth"]["last_run"]["outcome"] == "published" and status["growth"]["running"]
        human = elma("status", "--server-root", str(root)).stdout
        assert f"published: {latest.version} (serial 2" in human and "growth: last run" in human
    finally:
        if device is not None:
            device.close()
        rc = served.stop()
    assert rc == 0, served.text()
    state = json.loads(layout.growth_state.read_text())
    assert state["runs"] == 2 and state["running"] is None
    assert (
        state["last_run"]["outcome"] == "interrupted" and state["last_published"]["version"] == latest.version
    )
    with open(layout.growth_lock, "a+b") as fh:  # nothing holds the lock any more
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    in_run = [s for s, _ in during]
    print(
        f"\ngrowth run {float(finished.group(1)):.1f} s; {len(during)} questions answered during it "
        f"({sum(1 for _, done in during if not done)} while it computed); latency p50 "
        f"{1000 * statistics.median(before):.0f} ms before, {1000 * statistics.median(in_run):.0f} ms during, "
        f"max {1000 * max(in_run):.0f} ms"
    )


# ------------------------------------------------------------------ systemd units
UNITS = REPO / "deploy" / "systemd"


def _exec_start(unit: Path) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(unit)
    return shlex.split(parser["Service"]["ExecStart"].replace("\\\n", " "))


@pytest.mark.parametrize(
    "name, command", [("elma-server.service", "serve"), ("elma-device.service", "device")]
)
def test_systemd_units_name_real_commands_and_harden_the_service(name, command):
    """ExecStart parses with `elma`'s own parser; the hardening options are there."""
    from elma_utils.cli import build_parser

    unit = UNITS / name
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(unit)
    service = parser["Service"]
    argv = _exec_start(unit)
    assert Path(argv[0]).name == "elma" and argv[1] == command, argv
    args = build_parser().parse_args(argv[1:])  # unknown flags or a missing subcommand: SystemExit
    assert args.command == command
    for key, value in {
        "Restart": "on-failure", "KillSignal": "SIGTERM", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "PrivateTmp": "yes", "ProtectHome": "yes",
    }.items():  # fmt: skip
        assert service.get(key) == value, (name, key, service.get(key))
    for key in ("User", "TimeoutStopSec", "ReadWritePaths", "Nice"):
        assert service.get(key), (name, key)
    if command == "serve":
        assert int(service["TimeoutStopSec"].rstrip("s")) > args.drain_seconds + 10  # drain + growth stop
        assert service["ReadWritePaths"].split()[0] == str(args.server_root)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    """`systemd-analyze verify` with ExecStart pointed at an executable that exists here."""
    fake = tmp_path / "bin" / "elma"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/opt/elma/.venv/bin/elma", str(fake))
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *[str(p) for p in sorted(tmp_path.glob("*.service"))]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    problems = [line for line in done.stderr.splitlines() if "elma-" in line]
    assert done.returncode == 0 and not problems, done.stderr
