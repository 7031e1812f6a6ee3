"""`elma device` as a board runs it: `init` writes the config and key, then `run` is a real process
talking to a real `elma serve --ssh-port` process (tiny real models, ELMA's SSH endpoint, the
real SQLite store) with questions typed on stdin or spoken by espeak-ng into a watched folder;
bundles published on the server, corrupt ones, and the server killed and restarted."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from queue import Empty, Queue

import numpy as np
import pytest
import soundfile as sf
from qa_fixtures import save_tiny_artifact, write_tiny_bundle
from speech_helpers import spoken

from elma_utils.atomic_files import write_bytes_atomic
from elma_utils.edge.device import transcript_doubt
from elma_utils.edge.device_config import load_config
from elma_utils.edge.outbox import describe_outbox
from elma_utils.edge.question_sources import FolderSource, VadSegmenter
from elma_utils.edge.ssh_keys import add_known_host, generate_ed25519_key, load_private_key
from elma_utils.edge.sync import LATEST_NAME, current_version, installed_versions
from elma_utils.server import publish
from elma_utils.server.sshd import free_loopback_port
from elma_utils.server.store import HardQuestionStore
from elma_utils.speech.wer import word_error_rate

pytestmark = [pytest.mark.network, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "elma_utils.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
CONTEXT = (
    "France is a country in Western Europe. Paris is the capital and most populous city of France, "
    "with more than two million residents. The Seine flows through the city."
)
QUESTIONS = ("What is the capital of France?", "Which river flows through the city?", "Where is France?")
# questions Whisper tiny.en hears well from espeak-ng at 150 words a minute (the device is under test, not ASR)
SPOKEN = (
    "How many people live in Paris?",
    "What river flows through Paris?",
    "Where is France?",
    "Who lives in Paris?",
)
HANG_GUARD_S = 180.0  # only against a hang: nothing here asserts how long anything took


def elma(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env or ENV, cwd=cwd, timeout=300)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, one stderr line, no traceback, nothing on stdout."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("elma device: error: "), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    return lines[0]


def set_option(config: Path, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (TOML text) in ``[section]`` of a config ``elma device init`` wrote."""
    text = config.read_text()
    head = text.index(f"[{section}]\n")
    end = text.find("\n[", head + 1)
    end = len(text) if end < 0 else end
    body = text[head:end]
    line = re.compile(rf"^#?\s*{re.escape(key)} = .*$", re.M)
    body = (
        line.sub(f"{key} = {value}", body, count=1)
        if line.search(body)
        else f"{body.rstrip()}\n{key} = {value}\n"
    )
    config.write_text(text[:head] + body + text[end:])


# ---------------------------------------------------------------- the server and its models


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_tokenizer) -> dict[str, Path]:
    """The server's full model; an edge bundle whose first layer settles everything, one that never settles."""
    base = tmp_path_factory.mktemp("device-models")
    return {
        "server": save_tiny_artifact(base / "server", minilm_tokenizer),
        "settles": write_tiny_bundle(base / "settles", minilm_tokenizer, 1.0),
        "offloads": write_tiny_bundle(base / "offloads", minilm_tokenizer, -1.0),
    }


class Server:
    """`elma serve` with ELMA's SSH endpoint on a fixed port, so a restart is the same server."""

    def __init__(self, work: Path, model: Path):
        self.work, self.model = work, model
        self.port = free_loopback_port()
        self.authorized_keys = work / "authorized_keys"
        self.host_key, self.store = work / "host_ed25519", work / "hard.sqlite3"
        self.root = work / "root"
        self.bundles = publish.bundles_dir(self.root)
        self.bundles.mkdir(parents=True)
        generate_ed25519_key(self.host_key, comment="elma-serve host key")
        placeholder = work / "placeholder_ed25519"
        generate_ed25519_key(placeholder, comment="placeholder")  # serve wants at least one device
        elma("keys", "add", "--authorized-keys", str(self.authorized_keys), "--device", "placeholder",
             "--public-key", f"{placeholder}.pub")  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        log = open(self.work / "serve.log", "a")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--model", str(self.model), "--store", str(self.store), "--ssh-port", str(self.port),
             "--authorized-keys", str(self.authorized_keys), "--host-key", str(self.host_key),
             "--sftp-root", str(self.bundles)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=ENV,
        )  # fmt: skip
        log.close()
        lines = []
        while not any("devices forward to" in line for line in lines):
            line = self.proc.stdout.readline()
            assert line, f"elma serve exited: {lines} {(self.work / 'serve.log').read_text()[-2000:]}"
            lines.append(line)
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc.stdout.close()

    def offloads_of(self, device_id: str) -> list[str]:
        """The questions the store holds from ``device_id``, one entry per stored offload."""
        with HardQuestionStore(self.store) as store:
            rows = [store.offload(i) for i in range(1, store.stats().offloads + 1)]
        return [r["question"] for r in rows if r is not None and r["device_id"] == device_id]


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    srv = Server(tmp_path_factory.mktemp("device-server"), models["server"]).start()
    yield srv
    srv.stop()


# ---------------------------------------------------------------- a device, as its owner sets it up


def init_device(
    work: Path, name: str, server_port: int, authorized_keys: Path, *options: str
) -> tuple[Path, str]:
    """`elma device init` in ``work/name``; returns the config and what init printed."""
    context = work / f"{name}-context.txt"
    context.write_text(CONTEXT + "\n", encoding="utf-8")
    config = work / name / "device.toml"
    done = elma("device", "init", "--config", str(config), "--device-id", name,
                "--server", f"127.0.0.1:{server_port}", "--context-file", str(context),
                "--authorized-keys", str(authorized_keys), *options)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return config, done.stdout


def printed(output: str, starts: str) -> str:
    (line,) = [line.strip() for line in output.splitlines() if line.strip().startswith(starts)]
    return line


def register_and_pin(config: Path, output: str) -> None:
    """Run the two commands init printed: the administrator's `elma keys add`, the device's ssh-keyscan."""
    argv = shlex.split(printed(output, "elma keys add"))
    done = elma(*argv[1:], cwd=config.parent)  # the .pub file copied to the server: same name there
    assert done.returncode == 0, done.stderr
    subprocess.run(printed(output, "ssh-keyscan"), shell=True, check=True, capture_output=True, timeout=60)
    assert "ssh-ed25519" in (config.parent / "known_hosts").read_text()


def new_device(server: Server, work: Path, name: str, *options: str) -> Path:
    config, output = init_device(work, name, server.port, server.authorized_keys, *options)
    register_and_pin(config, output)
    return config


class DeviceRun:
    """`elma device run --config … --json` as its own process; answers and log lines read as they come."""

    def __init__(self, config: Path, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [*CLI, "device", "run", "--config", str(config), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV,
        )  # fmt: skip
        self.lines: Queue[str | None] = Queue()
        self.log: list[str] = []
        self._threads = [
            threading.Thread(target=self._answers, daemon=True),
            threading.Thread(target=self._log_lines, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _answers(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # the process closed stdout: it is ending

    def _log_lines(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def line(self) -> str | None:
        try:
            return self.lines.get(timeout=HANG_GUARD_S)
        except Empty:
            pytest.fail(f"no answer line from the device; its log:\n{self.stderr()}")

    def record(self) -> dict:
        line = self.line()
        assert line is not None, f"the device exited; its log:\n{self.stderr()}"
        return json.loads(line)

    def ask(self, question: str) -> dict:
        self.proc.stdin.write(question + "\n")
        self.proc.stdin.flush()
        return self.record()

    def wait_log(self, pattern: str) -> str:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            found = [line for line in list(self.log) if re.search(pattern, line)]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"the device exited; its log:\n{self.stderr()}"
            time.sleep(0.1)
        pytest.fail(f"no log line matching {pattern!r}; the log:\n{self.stderr()}")

    def stderr(self) -> str:
        return "\n".join(self.log[-60:])

    def finish(self, *, signal_: int | None = None) -> tuple[int, list[str]]:
        """End it (EOF on stdin, or a signal); its exit status and the answer lines still to come."""
        if signal_ is None:
            self.proc.stdin.close()
        else:
            self.proc.send_signal(signal_)
        rest = []
        while (line := self.line()) is not None:
            rest.append(line)
        rc = self.proc.wait(HANG_GUARD_S)
        for t in self._threads:
            t.join(10)
        if signal_ is not None:
            self.proc.stdin.close()
        return rc, rest


# ---------------------------------------------------------------- init and fail-fast checks


def test_init_writes_a_commented_config_and_a_new_key_and_refuses_to_overwrite(tmp_path):
    """The file reads back with tomllib and load_config (IPv6 server), the key is new and private, the
    printed commands name this device and its server, and a second init changes nothing."""
    config = tmp_path / "board" / "device.toml"
    done = elma("device", "init", "--config", str(config), "--device-id", "tx2-07", "--server", "[::1]:2222",
                "--authorized-keys", "/srv/elma/authorized_keys", "--sync-interval", "600")  # fmt: skip
    assert done.returncode == 0, done.stderr
    raw = tomllib.loads(config.read_text())
    assert (
        raw["device"]["id"] == "tx2-07"
        and raw["server"]["host"] == "::1"
        and raw["server"]["ssh_port"] == 2222
    )
    assert raw["server"]["service"] == "127.0.0.1:7433" and raw["sync"]["interval_seconds"] == 600
    assert raw["model"]["root"] == "bundles" and "bundle" not in raw["model"]
    assert config.read_text().count("#") > 20  # commented for the person who edits it
    cfg = load_config(config)
    assert cfg.server_name == "[::1]:2222" and cfg.key == config.parent / "device_ed25519"
    assert cfg.model_root == config.parent / "bundles" and cfg.input_kind == "stdin"

    key = config.parent / "device_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    pub = (config.parent / "device_ed25519.pub").read_text().split()
    assert pub[0] == "ssh-ed25519" and pub[2] == "tx2-07"
    assert load_private_key(key).get_base64() == pub[1]
    assert printed(done.stdout, "elma keys add") == (
        "elma keys add --authorized-keys /srv/elma/authorized_keys --device tx2-07 --public-key device_ed25519.pub"
    )
    assert (
        printed(done.stdout, "ssh-keyscan")
        == f"ssh-keyscan -t ed25519 -p 2222 ::1 >> {config.parent / 'known_hosts'}"
    )

    before = key.read_bytes(), config.read_text()
    again = elma("device", "init", "--config", str(config), "--device-id", "other")
    line = one_line_error(again)
    assert "already exists" in line and "never overwrites" in line
    assert (key.read_bytes(), config.read_text()) == before


@pytest.fixture(scope="module")
def offline_board(tmp_path_factory, models) -> Path:
    """A complete board directory for a server that is never contacted (its bundle settles every question)."""
    work = tmp_path_factory.mktemp("offline-board")
    config, _ = init_device(
        work, "tx2-off", 2222, work / "authorized_keys", "--bundle", str(models["settles"])
    )
    generate_ed25519_key(work / "server_host_key")
    add_known_host(
        config.parent / "known_hosts", "127.0.0.1", 2222, load_private_key(work / "server_host_key")
    )
    return config.parent


def test_a_valid_offline_board_answers_on_the_edge_and_warns_once_without_espeak(offline_board, tmp_path):
    """The control for the failure cases below: the same directory, unchanged, runs and answers
    (plain text); `speak = true` without espeak-ng on PATH is a warning at start-up, not a crash."""
    board = shutil.copytree(offline_board, tmp_path / "board")
    set_option(board / "device.toml", "output", "speak", "true")
    empty_path = tmp_path / "no-programs"
    empty_path.mkdir()
    done = subprocess.run(
        [*CLI, "device", "run", "--config", str(board / "device.toml")],
        input=f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}",  # a blank line, and a last line without its newline
        capture_output=True, text=True, env={**ENV, "PATH": str(empty_path)}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for n, (line, question) in enumerate(zip(lines, QUESTIONS, strict=False), 1):
        assert line.startswith(f"stdin:{2 * n - 1} | Q: {question} | A: ") and "| edge layer 1/2 |" in line, (
            line
        )
        assert line.endswith("| model tiny-edge-0")
    assert sum("espeak-ng is not installed" in line for line in done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr


def _remove(board: Path, name: str) -> None:
    (board / name).unlink()


def _use_sync_root(config: Path) -> None:
    """[model] root = "bundles" (an empty sync root) instead of the fixed bundle."""
    text = re.sub(r"^bundle = .*$", 'root = "bundles"', config.read_text(), count=1, flags=re.M)
    config.write_text(re.sub(r"^# root = .*\n", "", text, flags=re.M))


BAD_CONFIGS = {
    "missing key": (lambda b: _remove(b, "device_ed25519"), "[server] key", "no such private key file"),
    ".pub as known_hosts": (
        lambda b: set_option(b / "device.toml", "server", "known_hosts", '"device_ed25519.pub"'),
        "[server] known_hosts",
        "is a public key (.pub), not a known_hosts file",
    ),
    "unknown key": (
        lambda b: set_option(b / "device.toml", "output", "colour", '"blue"'),
        "unknown key 'colour' in [output]",
        "known keys: speak, voice",
    ),
    "empty context file": (
        lambda b: (b.parent / "tx2-off-context.txt").write_text(" \n"),
        "[context] file",
        "is empty",
    ),
    "missing bundle": (
        lambda b: set_option(b / "device.toml", "model", "bundle", '"no/such/bundle"'),
        "[model] bundle",
        "no such directory",
    ),
    "sync root without a bundle": (
        lambda b: _use_sync_root(b / "device.toml"),
        "holds no installed bundle yet",
        "install one with: elma sync --local-root",
    ),
    "port as a string": (
        lambda b: set_option(b / "device.toml", "server", "ssh_port", '"2222"'),
        "[server] ssh_port",
        "must be an integer",
    ),
    "sync with a fixed bundle": (
        lambda b: set_option(b / "device.toml", "sync", "interval_seconds", "60"),
        "[sync] interval_seconds > 0 needs [model] root",
        "set interval_seconds = 0",
    ),
    "not TOML": (
        lambda b: (b / "device.toml").write_text("[device\nid = 1\n"),
        "not valid TOML",
        "line 1",
    ),
    "microphone without PyAudio": (
        lambda b: set_option(b / "device.toml", "input", "kind", '"microphone"'),
        '[input] kind = "microphone"',
        "PyAudio",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_and_exit_2_before_anything_loads(offline_board, tmp_path, case):
    import importlib.util

    if case == "microphone without PyAudio" and importlib.util.find_spec("pyaudio") is not None:
        pytest.skip("PyAudio is installed here")
    board = shutil.copytree(offline_board, tmp_path / "board")
    shutil.copy(offline_board.parent / "tx2-off-context.txt", tmp_path / "tx2-off-context.txt")
    set_option(board / "device.toml", "context", "file", json.dumps(str(tmp_path / "tx2-off-context.txt")))
    mutate, *expected = BAD_CONFIGS[case]
    mutate(board)
    done = subprocess.run(
        [*CLI, "device", "run", "--config", str(board / "device.toml")],
        input=QUESTIONS[0] + "\n", capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    line = one_line_error(done)
    for fragment in expected:
        assert fragment in line, line


def test_missing_config_and_init_options_on_run_are_one_line_errors(tmp_path):
    line = one_line_error(elma("device", "--config", str(tmp_path / "none.toml")))
    assert "does not exist; make one with: elma device init --config" in line
    line = one_line_error(elma("device", "run", "--config", str(tmp_path / "none.toml"), "--server", "x:1"))
    assert "--server is for `elma device init`" in line


# ---------------------------------------------------------------- pure parts


def test_transcript_doubt_flags_single_words_and_context_echoes():
    assert transcript_doubt("What is the capital of France?", CONTEXT) is None
    assert transcript_doubt("Paris.", CONTEXT) == "a single word"
    assert transcript_doubt("...", CONTEXT).startswith("no words")
    assert "repeats the context" in transcript_doubt("The Seine flows through the city.", CONTEXT)


def test_vad_segmenter_cuts_a_continuous_stream_into_its_questions():
    """Two espeak-ng questions in one stream with low noise between them, fed as a microphone would
    (1024-sample chunks): exactly two utterances, each about as long as what was said."""
    rng = np.random.default_rng(0)

    def noise(seconds: float) -> np.ndarray:
        return (rng.standard_normal(int(seconds * 16000)) * 10 ** (-55 / 20)).astype(np.float32)

    first, second = spoken(QUESTIONS[0]), spoken(QUESTIONS[1])
    stream = np.concatenate([noise(0.6), first, noise(1.5), second, noise(1.5)])
    segmenter, utterances = VadSegmenter(), []
    for i in range(0, stream.size, 1024):
        utterances += segmenter.feed(stream[i : i + 1024])
    utterances += segmenter.flush()
    assert len(utterances) == 2
    for got, said in zip(utterances, (first, second), strict=True):
        assert abs(got.size - said.size) / 16000 < 0.6, (got.size / 16000, said.size / 16000)
    quiet = VadSegmenter()
    found = [u for i in range(0, 48000, 1024) for u in quiet.feed(noise(1024 / 16000))] + quiet.flush()
    assert found == []


# ---------------------------------------------------------------- against the real server


def test_typed_questions_over_stdin_are_answered_by_the_server_with_their_source(server, models, tmp_path):
    """A device whose edge never settles: every typed question is the server's answer (the same text
    the server's model gives), reported as such, and stored under this device's id."""
    from elma_utils.server.service import ModelAnswerer

    config = new_device(server, tmp_path, "tx2-typed", "--bundle", str(models["offloads"]))
    device = DeviceRun(config, "--json")
    records = [device.ask(q) for q in QUESTIONS]
    rc, rest = device.finish()
    assert rc == 0 and rest == [], device.stderr()
    expected = ModelAnswerer.load(models["server"]).answer_batch([(q, CONTEXT) for q in QUESTIONS])
    for record, question, answer in zip(records, QUESTIONS, expected, strict=True):
        assert record["question"] == question and record["input"] == "stdin"
        assert record["source"] == "server" and record["where"] == "server (edge stopped at layer 2/2)"
        assert record["answer"] == answer.text and record["answer"] in CONTEXT
        assert CONTEXT[record["char_start"] : record["char_end"]] == record["answer"]
        assert record["model_version"] == "tiny-edge-0" and record["transcript"] is None
        assert set(record["timings_ms"]) == {"audio", "asr", "edge", "offload", "total"}
        assert (
            record["timings_ms"]["offload"] > 0
            and record["timings_ms"]["total"] >= record["timings_ms"]["edge"]
        )
    assert sorted(server.offloads_of("tx2-typed")) == sorted(QUESTIONS)
    assert "device tx2-typed stopped" in device.stderr()


def write_spoken(folder: Path, name: str, text: str) -> str:
    """espeak-ng → sox 16 kHz mono, written as NAME.part and renamed into place (as a recorder should)."""
    raw = folder.parent / f"{name}.raw.wav"
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True, capture_output=True
    )
    part = folder / f"{name}.part"
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-t", "wav", str(part)], check=True)
    os.rename(part, folder / name)
    return name


def test_folder_of_spoken_questions_is_answered_once_each_across_a_restart(server, models, tmp_path):
    """espeak-ng WAVs dropped into the folder: each answered exactly once although the device is
    stopped (SIGTERM) after its first answer and started again; a tone gives an empty transcript,
    a broken file goes to failed/, a file still being written (.part) is never taken."""
    config = new_device(server, tmp_path, "tx2-ears", "--bundle", str(models["settles"]), "--input", "folder")
    set_option(config, "input", "settle_seconds", "0.2")
    set_option(config, "input", "poll_seconds", "0.1")
    inbox = config.parent / "inbox"
    assert inbox.is_dir()  # init made it
    spoken_files = {write_spoken(inbox, f"q{i}.wav", q): q for i, q in enumerate(SPOKEN[:3], 1)}
    t = np.arange(32000) / 16000
    sf.write(inbox / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32), 16000)
    (inbox / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (inbox / "q9.wav.part").write_bytes((inbox / "q1.wav").read_bytes()[:1000])  # still being written

    first = DeviceRun(config, "--json")
    run1 = [first.record()]
    rc, rest = first.finish(signal_=signal.SIGTERM)  # finishes the question in hand, then stops
    assert rc == 0, first.stderr()
    run1 += [json.loads(line) for line in rest]
    assert "SIGTERM: stopping after the current question" in first.stderr()

    spoken_files[write_spoken(inbox, "q4.wav", SPOKEN[3])] = SPOKEN[3]
    expected = {*spoken_files, "tone.wav", "broken.wav"}
    second = DeviceRun(config, "--json")
    run2 = []
    while {r["item"] for r in run1 + run2} != expected:
        run2.append(second.record())
        assert len(run1) + len(run2) <= len(expected), [r["item"] for r in run1 + run2]
    rc, rest = second.finish(signal_=signal.SIGTERM)
    assert rc == 0 and rest == [], second.stderr()

    items = [r["item"] for r in run1 + run2]
    assert sorted(items) == sorted(expected)  # each exactly once over both runs
    by_item = {r["item"]: r for r in run1 + run2}
    for name, text in spoken_files.items():
        r = by_item[name]
        assert r["input"] == "folder" and not r["transcript_empty"]
        assert word_error_rate(text, r["transcript"]) <= 0.34, (text, r["transcript"])  # one word of 3-6
        assert r["question"] == r["transcript"] and r["source"] == "edge" and r["where"] == "edge layer 1/2"
        assert r["answer"] in CONTEXT and r["timings_ms"]["asr"] > 0 and r["model_version"] == "tiny-edge-0"
    assert by_item["tone.wav"]["transcript_empty"] and by_item["tone.wav"]["source"] == "none"
    assert by_item["tone.wav"]["status"] == "empty_transcript"
    assert (
        by_item["broken.wav"]["status"] == "unreadable_audio"
        and "broken.wav" in by_item["broken.wav"]["error"]
    )
    assert sorted(p.name for p in (inbox / "done").glob("*.wav")) == sorted([*spoken_files, "tone.wav"])
    assert [p.name for p in (inbox / "failed").iterdir()] == ["broken.wav"]
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["q9.wav.part"]
    ledger = [json.loads(line) for line in (inbox / "done" / "ledger.jsonl").read_text().splitlines()]
    assert sorted(e["file"] for e in ledger) == sorted(expected) and len({e["key"] for e in ledger}) == 6


def test_a_published_bundle_is_swapped_in_between_questions_and_a_corrupt_one_is_refused(
    server, models, tmp_path
):
    """v1 (never settles: the server answers) is installed with the `elma sync` command the device
    prints when it has none; v2 (settles at layer 1) is published while the device runs: the
    answers switch from server to edge exactly where the printed version switches. A tampered v3
    is refused by sync and the device goes on answering with v2."""
    v1 = publish.publish_bundle(models["offloads"], server.root)
    config = new_device(server, tmp_path, "tx2-sync", "--sync-interval", "1")
    line = one_line_error(elma("device", "run", "--config", str(config)))
    install = shlex.split(line.split("install one with: ", 1)[1])
    assert install[:2] == ["elma", "sync"]
    done = elma(*install[1:])
    assert done.returncode == 0 and current_version(config.parent / "bundles") == v1, done.stderr

    device = DeviceRun(config, "--json")
    records = [device.ask(QUESTIONS[0])]
    assert records[0]["model_version"] == v1 and records[0]["source"] == "server"
    v2 = publish.publish_bundle(models["settles"], server.root)
    while records[-1]["model_version"] != v2:
        time.sleep(0.2)
        records.append(device.ask(QUESTIONS[len(records) % 3]))
        assert len(records) < 500, "the new version never arrived"
    assert device.wait_log(f"model version {v1} → {v2}")
    versions = [r["model_version"] for r in records]
    assert versions == sorted(versions, key=[v1, v2].index)  # one switch, never back
    for r in records:
        expected = (
            ("server", "server (edge stopped at layer 2/2)")
            if r["model_version"] == v1
            else ("edge", "edge layer 1/2")
        )
        assert (r["source"], r["where"]) == expected, r

    # v3: published in a copy of the server's tree, one part tampered with, then put in place and
    # pointed at, so the device can only ever see the corrupt version
    scratch = tmp_path / "scratch-root"
    shutil.copytree(server.root, scratch)
    v3 = publish.publish_bundle(models["offloads"], scratch)
    part = publish.bundles_dir(scratch) / v3 / "layer_2.tflite"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    shutil.copytree(publish.bundles_dir(scratch) / v3, server.bundles / v3)
    write_bytes_atomic(
        server.bundles / LATEST_NAME, (publish.bundles_dir(scratch) / LATEST_NAME).read_bytes()
    )
    refused = device.wait_log("sync: no new version installed")
    assert f"keeping {v2}" in refused and "layer_2.tflite: sha256 does not match" in refused
    after = [device.ask(q) for q in QUESTIONS]
    assert all(r["model_version"] == v2 and r["source"] == "edge" for r in after), after

    # the device reported how many questions it asked with v1 (every one of them was offloaded)
    with HardQuestionStore(server.store) as store:
        assert store.questions_asked([v1]) == {"tx2-sync": {v1: versions.count(v1)}}
    # v4: v1's weights with a learned offload threshold above every entropy: the device keeps what
    # v1 offloaded, and says why
    from elma_utils.server.offload_threshold import offload_candidate

    learned = {"E_offload": 1e6, "E_offload_cost": 0.0}
    v4 = publish.publish_bundle(offload_candidate(models["offloads"], tmp_path / "v4" / "candidate", learned),
                                server.root)  # fmt: skip
    while records[-1]["model_version"] != v4:
        time.sleep(0.2)
        records.append(device.ask(QUESTIONS[len(records) % 3]))
        assert len(records) < 1000, "the version with the offload threshold never arrived"
    kept = records[-1]
    assert kept["source"] == "edge" and kept["below_offload_threshold"] and kept["edge_solved"], kept
    assert kept["where"] == "edge layer 2/2, kept below the offload threshold"
    assert all(r["below_offload_threshold"] is False for r in records if r["model_version"] != v4)
    rc, _ = device.finish()
    assert rc == 0, device.stderr()
    assert current_version(config.parent / "bundles") == v4 and v3 not in installed_versions(
        config.parent / "bundles"
    )
    assert sum("sync: no new version installed" in line for line in device.log) == 1  # repeats only at DEBUG


def test_server_killed_gives_queued_fallbacks_that_drain_once_when_it_returns(server, models, tmp_path):
    """kill -9 of `elma serve`: the device answers on its own, keeps each question in the outbox;
    once the server is back the drain thread delivers them, and the store holds each exactly once."""
    config = new_device(server, tmp_path, "tx2-away", "--bundle", str(models["offloads"]))
    set_option(config, "outbox", "drain_seconds", "0.5")
    set_option(config, "outbox", "retry_max_seconds", "1.0")
    device = DeviceRun(config, "--json")
    asked = ["What is the capital of France?", "Which river flows through the city?", "Where is France?", "How many live in Paris?"]  # fmt: skip
    before = device.ask(asked[0])
    assert before["source"] == "server"
    server.kill()
    away = [device.ask(q) for q in asked[1:3]]
    for r in away:
        assert r["source"] == "edge-fallback" and r["queued"] is True and r["answer"] in CONTEXT, r
        assert "queued for the server" in r["where"] and r["error"]
    assert server.offloads_of("tx2-away") == [asked[0]]
    server.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while len(server.offloads_of("tx2-away")) < 3:
        assert time.monotonic() < deadline, device.stderr()
        time.sleep(0.2)
    last = device.ask(asked[3])
    assert last["source"] == "server"
    rc, _ = device.finish()
    assert rc == 0, device.stderr()
    assert sorted(server.offloads_of("tx2-away")) == sorted(asked)  # each exactly once
    outbox = describe_outbox(config.parent / "outbox.sqlite3")
    assert outbox["counts"].get("pending", 0) == 0 and outbox["dead"] == []
    assert outbox["counts"].get("sent", 0) == 2


# ---------------------------------------------------------------- the folder's bookkeeping


class ManualClock:
    """Seconds that pass only when the test says so (the settle rule, without sleeping)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_folder_takes_a_file_only_once_it_stopped_changing_and_never_part_or_hidden_files(tmp_path):
    clock, stop = ManualClock(), threading.Event()
    stop.set()  # next() looks once and returns
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = FolderSource(inbox, poll_seconds=0.01, settle_seconds=1.0, clock=clock)
    (inbox / "q.wav").write_bytes(b"RIFF" + b"\0" * 100)
    (inbox / "r.wav.part").write_bytes(b"RIFF" + b"\0" * 100)
    (inbox / ".s.wav").write_bytes(b"RIFF" + b"\0" * 100)
    (inbox / "notes.txt").write_text("not audio")
    assert source.next(stop) is None  # first sight
    clock.now = 0.5
    with open(inbox / "q.wav", "ab") as fh:  # still being written
        fh.write(b"\0" * 100)
    assert source.next(stop) is None
    clock.now = 1.2
    assert source.next(stop) is None  # unchanged for 0.7 s only
    clock.now = 1.6
    question = source.next(stop)
    assert question is not None and question.label == "q.wav" and question.path == inbox / "q.wav"
    clock.now = 100.0
    assert source.next(stop).label == "q.wav"  # not done yet: offered again, nothing else is


def test_a_file_committed_before_a_crash_is_moved_on_restart_not_answered_again(tmp_path):
    """The ledger line is the commit: a process killed between it and the move leaves the file in
    the inbox, and the next start moves it to done/ instead of answering it a second time."""
    clock, stop = ManualClock(), threading.Event()
    stop.set()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "q.wav").write_bytes(b"RIFF" + b"\0" * 100)
    (inbox / "other.wav").write_bytes(b"RIFF" + b"\0" * 50)
    source = FolderSource(inbox, settle_seconds=1.0, clock=clock)
    source.next(stop)
    clock.now = 2.0
    question = source.next(stop)
    assert question.label in ("other.wav", "q.wav")
    source.commit(question, {"status": "answered", "answer": "Paris", "source": "edge"})  # then "killed"
    assert (inbox / question.label).exists()

    restarted = FolderSource(inbox, settle_seconds=1.0, clock=clock)
    assert (inbox / "done" / question.label).exists() and not (inbox / question.label).exists()
    restarted.next(stop)
    clock.now = 4.0
    left = restarted.next(stop)
    assert left is not None and left.label != question.label
    (entry,) = [json.loads(line) for line in (inbox / "done" / "ledger.jsonl").read_text().splitlines()]
    assert entry["file"] == question.label and entry["answer"] == "Paris" and entry["status"] == "answered"
