"""`elma ask` checks every input before any model loads, prints strict JSON and no start-up noise.

Each command runs as a real `elma ask` in a fresh interpreter (a two-line wrapper around
``elma_utils.cli.main`` that records, at exit, which heavy modules were imported), on real
inputs: tiny real models (``qa_fixtures``), espeak-ng speech and sox-made audio files, OpenSSH
keys from ``ssh-keygen``, a real SSH endpoint and offload server for the good offload path. A
bad input must give exit status 2, exactly one line on stderr naming the problem and the fix,
no traceback, and must not have imported TensorFlow, Keras, Whisper or the LiteRT interpreter:
the proof that no model was loaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.edge import input_checks as checks
from elma_utils.edge.protocol import MAX_QUESTION_CHARS
from elma_utils.edge.ssh_keys import add_known_host, load_private_key, load_public_key
from elma_utils.native_logs import native_noise_filtered
from elma_utils.speech.spoken_qa import SpokenAnswer

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
CONTEXT = (
    "France is a country in Western Europe. Paris is the capital and most populous city of France, "
    "with more than two million residents. The Seine flows through the city."
)
# importing any of these means a model (or its framework) was being loaded
HEAVY = ("tensorflow", "keras", "jax", "faster_whisper", "ctranslate2", "ai_edge_litert", "librosa")
NOISE_WORDS = ("cuda", "onednn", "absl", "xnnpack", "cuinit", "tensorflow lite", "i0000", "e0000", "w0000")

WRAPPER = """
import atexit, json, os, sys
watch = {heavy!r}
def _report():
    with open(os.environ["ELMA_TEST_IMPORTED"], "w") as fh:
        json.dump(sorted(m for m in watch if m in sys.modules), fh)
atexit.register(_report)
from elma_utils.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _reject_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (what other JSON parsers do)."""
    return json.loads(text, parse_constant=_reject_constant)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ask")


@pytest.fixture(scope="module")
def elma(work):
    """Run `elma ask ARGS` in a fresh interpreter: (exit status, stdout, stderr, heavy modules)."""
    wrapper = work / "elma_wrapper.py"
    wrapper.write_text(WRAPPER.format(heavy=HEAVY))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "ELMA_", "GRPC_"))}
    env.update(PYTHONPATH=str(REPO), ELMA_CACHE_DIR=str(work / "cache"), ELMA_DATA_DIR=str(work / "no-data"))

    def run(*args, extra_env: dict | None = None, timeout: float = 300):
        record = work / "imported.json"
        record.unlink(missing_ok=True)
        argv = [sys.executable, str(wrapper), "ask", *args]
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env={**env, "ELMA_TEST_IMPORTED": str(record), **(extra_env or {})},
            cwd=work,
        )
        imported = json.loads(record.read_text()) if record.is_file() else None
        return done.returncode, done.stdout.decode(), done.stderr.decode(errors="replace"), imported

    return run


@pytest.fixture(scope="module")
def model_dir(work, minilm_tokenizer):
    return save_tiny_artifact(work / "model", minilm_tokenizer)


@pytest.fixture(scope="module")
def bundle(work, minilm_tokenizer):
    """E_T = 1: layer 1 settles every question."""
    return write_tiny_bundle(work / "bundle", minilm_tokenizer, 1.0)


@pytest.fixture(scope="module")
def unsettled_bundle(work, minilm_tokenizer):
    """E_T below any entropy: every question is offloaded."""
    return write_tiny_bundle(work / "bundle-unsettled", minilm_tokenizer, -1.0)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def audio(work):
    """Real recordings: espeak-ng speech (WAV) and sox-made files, good and bad."""
    d = work / "audio"
    d.mkdir()
    subprocess.run([_tool("espeak-ng"), "-w", str(d / "question.wav"), QUESTION], check=True)
    sox = _tool("sox")
    subprocess.run([sox, str(d / "question.wav"), "-r", "16000", str(d / "question.flac")], check=True)
    subprocess.run([sox, "-n", "-r", "8000", "-c", "1", str(d / "long.wav"), "trim", "0", "200"], check=True)
    (d / "truncated.wav").write_bytes((d / "question.wav").read_bytes()[:30])
    (d / "notes.wav").write_text("What is the capital of France?\n")
    (d / "empty.wav").write_bytes(b"")
    (d / "folder.wav").mkdir()
    os.mkfifo(d / "pipe.wav")  # sf.info on a FIFO would block: must be refused before
    return d


@pytest.fixture(scope="module")
def keys(work):
    """OpenSSH keys made by ssh-keygen: the device's, the server's host key, bad variants."""
    d = work / "keys"
    d.mkdir()
    keygen = _tool("ssh-keygen")
    for name, options in (
        ("device", ["-t", "ed25519", "-N", ""]),
        ("host", ["-t", "ed25519", "-N", ""]),
        ("locked", ["-t", "ed25519", "-N", "secret"]),
        ("rsa", ["-t", "rsa", "-b", "2048", "-N", ""]),
    ):
        subprocess.run([keygen, *options, "-q", "-C", name, "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "device.pub").read_text())
    return d


SSH_PORT = 2222


@pytest.fixture(scope="module")
def known_hosts(keys):
    """A known_hosts file pinning the host key for 127.0.0.1:2222 (the bad-input tests never connect)."""
    path = keys / "known_hosts"
    add_known_host(path, "127.0.0.1", SSH_PORT, load_public_key(keys / "host.pub"))
    return path


def offload_args(keys, known_hosts, **override) -> list[str]:
    options = {
        "--ssh-port": str(SSH_PORT),
        "--service-port": "7433",
        "--key": str(keys / "device"),
        "--known-hosts": str(known_hosts),
        **override,
    }
    return [a for name, value in options.items() if value is not None for a in (name, value)]


def assert_refused_before_loading(result, *fragments: str) -> str:
    status, out, err, imported = result
    assert status == 2, (status, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line, no traceback, no library noise
    assert lines[0].startswith("elma ask: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert imported == [], f"a model (or its framework) was loaded before the error: {imported}"
    return lines[0]


# ---------------------------------------------------------------- the question


@pytest.mark.parametrize(
    ("question", "fragments"),
    [
        ("   ", ["--question is empty", "type the question"]),
        ("x" * (MAX_QUESTION_CHARS + 1), [f"{MAX_QUESTION_CHARS + 1:,} characters long", "limit is 2,000"]),
        ("?!?", ["holds no words"]),
        ("\x1b[31mWhat is the capital?", ["control character U+001B at character 0", "plain text"]),
    ],
    ids=["blank", "too-long", "no-words", "control-char"],
)
def test_bad_question_is_refused_before_any_model(elma, bundle, question, fragments):
    result = elma("--question", question, "--context", CONTEXT, "--bundle", str(bundle))
    assert_refused_before_loading(result, *fragments)


def test_question_that_is_not_utf8_is_refused(elma, model_dir):
    """Bytes that are not UTF-8 on the command line (a Latin-1 terminal) reach Python as lone
    surrogates; they would break the tokenizer and the protocol's JSON."""
    result = elma(b"--question", b"Qui a fond\xe9 Paris ?", "--context", CONTEXT, "--model", str(model_dir))
    assert_refused_before_loading(
        result, "--question is not valid UTF-8 text", "character 10", "UTF-8 locale"
    )


def test_no_question_at_all(elma, model_dir):
    result = elma("--context", CONTEXT, "--model", str(model_dir))
    assert_refused_before_loading(result, "--audio FILE, --mic or --question TEXT")


# ---------------------------------------------------------------- the audio file


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("missing.wav", ["missing.wav: no such audio file", "check the path"]),
        ("folder.wav", ["folder.wav is not a regular file"]),
        ("pipe.wav", ["pipe.wav is not a regular file"]),
        ("empty.wav", ["empty.wav is empty (0 bytes)", "record the question again"]),
        (
            "notes.wav",
            ["notes.wav is not a readable audio file", "Format not recognised", "ffmpeg -i notes.wav"],
        ),
        ("truncated.wav", ["truncated.wav is not a readable audio file", "ffmpeg -i truncated.wav"]),
        ("long.wav", ["long.wav is 200 s long", "one short question per recording"]),
    ],
)
def test_bad_audio_file_is_refused_before_whisper_or_the_model(elma, audio, model_dir, name, fragments):
    result = elma("--audio", str(audio / name), "--context", CONTEXT, "--model", str(model_dir))
    assert_refused_before_loading(result, f"--audio {audio / name}", *fragments)


def test_missing_question_lm_file_is_refused_before_whisper(elma, audio, bundle, work):
    result = elma("--audio", str(audio / "question.flac"), "--context", CONTEXT, "--bundle", str(bundle),
                  "--lm", str(work / "nope.json.gz"))  # fmt: skip
    assert_refused_before_loading(result, "--lm", "nope.json.gz: no such file", "'none'")


# ---------------------------------------------------------------- the context


def test_bad_context_is_refused_before_any_model(elma, model_dir, work):
    latin1 = work / "latin1.txt"
    latin1.write_bytes("Paris est la capitale de la France, fondée il y a longtemps.".encode("latin-1"))
    cases = [
        (["--context", "   "], ["--context is empty"]),
        (["--context-file", str(work / "nope.txt")], ["context file", "nope.txt does not exist"]),
        (["--context-file", str(latin1)], ["is not UTF-8 text"]),
        (["--squad-id", "56be4db0acb8001400a502ec", "--data-dir", str(work)], ["cannot look up --squad-id"]),
    ]
    for context_args, fragments in cases:
        result = elma("--question", QUESTION, *context_args, "--model", str(model_dir))
        assert_refused_before_loading(result, *fragments)


# ---------------------------------------------------------------- the model and the bundle


def test_bad_model_dir_is_refused_before_tensorflow_loads(elma, model_dir, bundle, work):
    broken = work / "model-broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.weights.h5").write_bytes(b"not HDF5" * 100)  # a valid path whose loading would fail
    cases = [
        (work / "no-model", ["no-model: no such directory", "elma train"]),
        (bundle, ["is an edge bundle, not a full-model artifact", f"use --bundle {bundle}"]),
        (broken, ["model.weights.h5 is not an HDF5 file"]),
    ]
    for path, fragments in cases:
        result = elma("--question", QUESTION, "--context", CONTEXT, "--model", str(path))
        assert_refused_before_loading(result, f"--model {path}", *fragments)


def test_bad_bundle_is_refused_before_the_interpreter_opens(elma, bundle, model_dir, work):
    tampered = work / "bundle-tampered"
    shutil.copytree(bundle, tampered)
    layer = tampered / "layer_2.tflite"
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    layer.write_bytes(bytes(data))
    empty = work / "bundle-empty"
    empty.mkdir()
    cases = [
        (work / "no-bundle", ["no-bundle: no such directory", "elma sync"]),
        (model_dir, ["is a full-model artifact, not an edge bundle", f"use --model {model_dir}"]),
        (empty, ["holds no manifest.json"]),
        (tampered, ["layer_2.tflite: sha256 does not match manifest.json"]),
    ]
    for path, fragments in cases:
        result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(path))
        assert_refused_before_loading(result, f"--bundle {path}", *fragments)


def test_model_and_bundle_together_or_neither(elma, model_dir, bundle):
    for model_args in ([], ["--model", str(model_dir), "--bundle", str(bundle)]):
        result = elma("--question", QUESTION, "--context", CONTEXT, *model_args)
        assert_refused_before_loading(result, "exactly one of --model DIR", "--bundle DIR")


# ---------------------------------------------------------------- offloading


def test_server_public_key_as_known_hosts_fails_before_anything_loads(elma, bundle, keys):
    """The user's report: the server's .pub given as --known-hosts. Before: a 40-line paramiko
    traceback at the first offload (for a .pub whose comment is not base64). Now: one line, at
    once, saying what a known_hosts line looks like and how to pin the key."""
    pub = keys / "host.pub"
    assert pub.read_text().split()[2] == "host"
    with_email = keys / "host-email.pub"  # what ssh-keygen writes by default: user@machine
    with_email.write_text(pub.read_text().replace(" host\n", " root@server\n"))
    with pytest.raises(paramiko.hostkeys.InvalidHostKey):  # what SSHTunnelClient would have met
        paramiko.HostKeys(str(with_email))
    for path in (pub, with_email):
        result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                      *offload_args(keys, path))  # fmt: skip
        assert_refused_before_loading(
            result,
            f"--known-hosts {path} is a public key (.pub), not a known_hosts file",
            "a known_hosts line is `[127.0.0.1]:2222 ssh-ed25519 AAAA",
            f'echo "[127.0.0.1]:2222 $(cat {path})" >> {keys / "known_hosts"}',
            f"ssh-keyscan -t ed25519 -p 2222 127.0.0.1 >> {keys / 'known_hosts'}",
        )


def test_bad_known_hosts_files(elma, bundle, keys, known_hosts, work):
    d = work / "kh"
    d.mkdir()
    (d / "empty").write_text("# nothing pinned yet\n\n")
    (d / "other-port").write_text(known_hosts.read_text().replace("[127.0.0.1]:2222", "[127.0.0.1]:2200"))
    host_line = known_hosts.read_text().strip()
    (d / "ca").write_text(f"@cert-authority *.lan {host_line.split(' ', 1)[1]}\n{host_line}\n")
    (d / "double-space").write_text(host_line.replace(" ", "  ", 1) + "\n")
    (d / "rsa-only").write_text(f"[127.0.0.1]:2222 {(keys / 'rsa.pub').read_text().rsplit(' ', 1)[0]}\n")
    scan = "ssh-keyscan -t ed25519 -p 2222 127.0.0.1 >>"
    cases = [
        ("missing", [": no such file", scan]),
        ("empty", ["holds no host keys", "a known_hosts line is `[127.0.0.1]:2222 ssh-ed25519", scan]),
        ("other-port", ["pins no host key for [127.0.0.1]:2222 (port 2222)", scan]),
        ("ca", ["line 1: @cert-authority lines are not supported"]),
        ("double-space", ["line 1 is not a known_hosts line (fields separated by one space)"]),
        ("rsa-only", ["pins only ssh-rsa for [127.0.0.1]:2222", "ELMA servers use ed25519"]),
    ]
    for name, fragments in cases:
        result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                      *offload_args(keys, d / name))  # fmt: skip
        assert_refused_before_loading(result, f"--known-hosts {d / name}", *fragments)
    result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                  *offload_args(keys, keys / "device"))  # fmt: skip
    assert_refused_before_loading(result, "is a private key, not a known_hosts file")


def test_bad_device_keys(elma, bundle, keys, known_hosts):
    cases = [
        (keys / "missing", ["no such private key file", "ssh-keygen -t ed25519 -N ''", "elma keys add"]),
        (keys / "device.pub", ["is a public key; --key wants the private key", str(keys / "device")]),
        (keys / "locked", ["is passphrase-protected", f"ssh-keygen -p -N '' -f {keys / 'locked'}"]),
        (keys / "rsa", ["ELMA needs an ed25519 key"]),
        (known_hosts, ["is a known_hosts or authorized_keys file"]),
    ]
    for path, fragments in cases:
        result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                      *offload_args(keys, known_hosts, **{"--key": str(path)}))  # fmt: skip
        assert_refused_before_loading(result, f"--key {path}", *fragments)


def test_bad_offload_options(elma, bundle, model_dir, keys, known_hosts, work):
    (work / "outbox-dir").mkdir()
    cases = [
        ({"--service-port": None}, ["offloading needs --service-port too"]),
        ({"--ssh-port": "70000"}, ["--ssh-port 70000 is not a TCP port (1-65535)"]),
        ({"--service-port": "0"}, ["--service-port 0 is not a TCP port"]),
        ({"--ssh-host": "elma@server.lan"}, ["holds a user name", "--user"]),
        ({"--ssh-host": "server.lan:2222"}, ["holds a port", "--ssh-port"]),
        ({"--device-id": "my board"}, ["--device-id 'my board' is not a device id"]),
        ({"--outbox": str(work / "outbox-dir")}, ["outbox-dir is a directory"]),
        ({"--outbox": str(known_hosts)}, ["is not an SQLite database"]),
    ]
    for override, fragments in cases:
        result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                      *offload_args(keys, known_hosts, **override))  # fmt: skip
        assert_refused_before_loading(result, *fragments)
    result = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                  "--key", str(keys / "device"))  # fmt: skip
    assert_refused_before_loading(result, "--key without --ssh-port")
    result = elma("--question", QUESTION, "--context", CONTEXT, "--model", str(model_dir),
                  *offload_args(keys, known_hosts))  # fmt: skip
    assert_refused_before_loading(result, "offloading is for the edge model (--bundle DIR)")


# ---------------------------------------------------------------- good questions


def _noise(err: str) -> list[str]:
    return [line for line in err.splitlines() if any(w in line.lower() for w in NOISE_WORDS)]


def test_typed_question_on_the_edge_prints_strict_json_without_tensorflow(elma, bundle):
    status, out, err, imported = elma("--question", QUESTION, "--context", CONTEXT, "--bundle", str(bundle),
                                      "--json")  # fmt: skip
    assert status == 0, err
    assert err == ""  # no TensorFlow/absl/CUDA/oneDNN/LiteRT start-up lines at all
    answer = strict_json(out)
    assert answer["source"] == "edge" and answer["where"] == "edge layer 1 of 2"
    assert answer["transcript"] == QUESTION and answer["engine"] == "typed"
    assert answer["answer"] and CONTEXT[answer["char_start"] : answer["char_end"]] == answer["answer"]
    assert answer["real_time_factor"] is None and answer["wer"] is None  # typed: no audio, was NaN
    assert set(answer["timings_ms"]) == {"tokenise", "embeddings", "edge_layer_1", "total"}
    assert imported == ["ai_edge_litert"]  # the edge interpreter, and no TensorFlow or Keras


def test_typed_question_with_the_full_model_is_quiet(elma, model_dir):
    status, out, err, imported = elma("--question", QUESTION, "--context", CONTEXT, "--model", str(model_dir),
                                      "--json")  # fmt: skip
    assert status == 0, err
    assert "tensorflow" in imported and "keras" in imported  # the model really loaded ...
    assert _noise(err) == [], err  # ... and none of its start-up lines reached the terminal
    assert "Traceback" not in err
    answer = strict_json(out)
    assert answer["source"] == "full-model" and answer["where"] == "full model"
    assert answer["real_time_factor"] is None


def test_spoken_question_answers_and_says_when_it_builds_the_question_lm(elma, audio, bundle, work):
    """The first spoken question with --lm auto fits the question LM: one line says what is built,
    that it happens once and how to skip it; --lm none skips it (no line, nothing cached)."""
    data = work / "squad"
    data.mkdir()
    questions = [QUESTION, "Which river flows through Paris?", "What is the largest city of France?"] * 40
    paragraphs = [{"context": CONTEXT, "qas": [{"id": str(i), "question": q, "answers": []}
                                               for i, q in enumerate(questions)]}]  # fmt: skip
    (data / "train-v1.1.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    args = ("--audio", str(audio / "question.wav"), "--context", CONTEXT, "--bundle", str(bundle), "--json")
    env = {"ELMA_DATA_DIR": str(data), "ELMA_CACHE_DIR": str(work / "lm-cache")}

    status, out, err, imported = elma(*args, "--lm", "none", extra_env=env)
    assert status == 0, err
    assert "question language model" not in err and not (work / "lm-cache").exists()
    assert _noise(err) == [], err
    heard = strict_json(out)
    assert heard["engine"] == "whisper" and heard["source"] == "edge"
    assert heard["real_time_factor"] is not None and heard["real_time_factor"] > 0
    assert "tensorflow" not in imported and "faster_whisper" in imported

    status, out, err, _ = elma(*args, extra_env=env)  # --lm auto: the data directory's train-v1.1.json
    assert status == 0, err
    built = [line for line in err.splitlines() if line.startswith("building the question language model")]
    assert len(built) == 1, err
    assert "120 questions" in built[0] and "once" in built[0] and "--lm none" in built[0]
    assert "question LM: 100%" in err  # the progress bar finished
    assert len(list((work / "lm-cache" / "speech").glob("question_lm-*.json.gz"))) == 1
    assert strict_json(out)["transcript"]

    status, out, err, _ = elma(*args, extra_env=env)  # cached now: silent
    assert status == 0 and "question language model" not in err, err


@pytest.mark.network
def test_offload_over_a_real_ssh_endpoint_with_a_hashed_known_hosts(
    elma, unsettled_bundle, model_dir, keys, work
):
    """Good offload inputs pass the checks: the question goes to a real SSH endpoint in front of
    the offload server, and the answer is the full model's."""
    from elma_utils.model.inference import QAModel
    from elma_utils.server.service import ModelAnswerer, OffloadServer
    from elma_utils.server.ssh_endpoint import SSHEndpoint

    answerer = ModelAnswerer.load(model_dir)
    answerer.answer_batch([(QUESTION, CONTEXT)])  # traced once here, not within the client's deadline
    server = OffloadServer(answerer, work / "hard.sqlite3").start()
    endpoint = SSHEndpoint(keys / "host", keys / "authorized_keys", ("127.0.0.1", server.port)).start()
    try:
        kh = work / "known_hosts-hashed"
        add_known_host(kh, "127.0.0.1", endpoint.port, load_private_key(keys / "host"))
        subprocess.run([_tool("ssh-keygen"), "-H", "-f", str(kh)], check=True, capture_output=True)
        assert kh.read_text().startswith("|1|")  # hashed names, as ssh-keygen -H writes them
        assert checks.check_known_hosts(kh, "127.0.0.1", endpoint.port) == load_private_key(keys / "host")
        status, out, err, imported = elma(
            "--question", QUESTION, "--context", CONTEXT, "--bundle", str(unsettled_bundle),
            "--ssh-port", str(endpoint.port), "--service-port", str(server.port), "--key", str(keys / "device"),
            "--known-hosts", str(kh), "--outbox", str(work / "outbox.sqlite3"), "--json",
        )  # fmt: skip
    finally:
        endpoint.close()
        server.close()
    assert status == 0, err
    assert _noise(err) == [] and "Traceback" not in err, err
    answer = strict_json(out)
    assert answer["source"] == "server", answer
    assert answer["answer"] == QAModel.load(model_dir).answer(QUESTION, CONTEXT).text
    assert answer["timings_ms"]["offload"] >= answer["timings_ms"]["server"] > 0
    assert "tensorflow" not in imported


# ---------------------------------------------------------------- the pieces


def test_check_functions_return_what_they_checked(audio, bundle, model_dir, keys, known_hosts):
    assert checks.check_question("  Who built it?\n") == "Who built it?"
    info = checks.check_audio_file(audio / "question.flac")
    assert info.format == "FLAC" and info.samplerate == 16000 and info.channels == 1
    assert 1.0 < info.seconds < 4.0
    assert checks.check_bundle_dir(bundle)["num_layers"] == 2
    assert checks.check_model_dir(model_dir)["max_seq_len"] == 96
    assert checks.check_private_key(keys / "device") == load_private_key(keys / "device")
    assert checks.check_known_hosts(known_hosts, "127.0.0.1", SSH_PORT) == load_public_key(keys / "host.pub")
    with pytest.raises(checks.InputError, match=r"pins no host key for 127\.0\.0\.1 \(port 22\)"):
        checks.check_known_hosts(known_hosts, "127.0.0.1", 22)
    gateway = known_hosts.with_name("known_hosts-gateway")  # a host name that starts like a key type
    gateway.write_text(known_hosts.read_text().replace("[127.0.0.1]:2222", "ssh-gw.lan"))
    assert checks.check_known_hosts(gateway, "ssh-gw.lan", 22) == load_public_key(keys / "host.pub")
    assert checks.check_host("[::1]") == "::1"
    assert checks.check_port(2222, label="--ssh-port") == 2222
    for bad in (True, 0, 65536, "22"):
        with pytest.raises(checks.InputError):
            checks.check_port(bad, label="--ssh-port")
    assert issubclass(checks.InputError, ValueError)


def test_spoken_answer_to_dict_is_strict_json():
    typed = SpokenAnswer("q", "a", "edge", 1, 2, True, 0, 1, False, "typed", 0.0, {"total": 1.23456})
    assert math.isnan(typed.real_time_factor)
    d = typed.to_dict()
    assert d["real_time_factor"] is None and d["timings_ms"] == {"total": 1.235}
    weird = SpokenAnswer("q", "a", "edge", 1, 2, True, 0, 1, False, "whisper", float("inf"),
                         {"asr": float("nan"), "total": float("inf")})  # fmt: skip
    d = strict_json(json.dumps(weird.to_dict(), allow_nan=False))
    assert d["audio_seconds"] is None and d["timings_ms"] == {"asr": None, "total": None}


def test_native_noise_is_held_back_and_the_rest_written(capfd):
    """Lines written straight to file descriptor 2 (as TensorFlow's C++ code and LiteRT do)."""
    noise = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        b"I0000 00:00:1796535652.305617    3690 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n",
        b"I0000 00:00:1796535656.192999    3690 port.cc:153] oneDNN custom operations are on.\n",
        b"E0000 00:00:1796535658.648991    3690 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n",
        b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
    ]
    kept = [
        b"E0000 00:00:1796535658.648991    3690 saver.cc:10] could not write checkpoint\n",
        b"real problem\n",
    ]
    with native_noise_filtered():
        for line in noise[:3] + kept[:1] + noise[3:] + kept[1:]:
            os.write(2, line)
    err = capfd.readouterr().err
    assert err == "".join(k.decode() for k in kept)
