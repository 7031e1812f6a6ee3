"""The device program on an emulated TX2 (qemu-aarch64, Cortex-A57) gives the x86 answers.

jetson_setup/emulation.py builds (once, cached outside the clone) an arm64 Debian root with the
exact wheels of jetson_setup/environment.yml, the TX2's interpreter (tflite-runtime cut from
TensorFlow 2.21.0's aarch64 wheel) included. Here the smoke bundle's tiny model is exported in
every precision on x86, then verify_edge.py runs under emulation: every pin's version, every
device module and library imported, and one step of each part of the device program, whose
results must equal those of the same steps on x86 with the development stack (ai-edge-litert):

* QA (8 questions x float32/float16/int8): answer text, character span, exit layer and
  "solved" identical; each layer's entropy within 1e-5 (float32, float16) or 1e-2 (int8: the
  int8 kernels may round differently on ARM; measured: identical to 6 decimals);
* the speech gate (Silero VAD on onnxruntime): the same speech segments within 32 ms (one
  VAD window); pocketsphinx restricted to the sample questions: the same transcript, the
  question the clip says; faster-whisper's tiny.en model loads (decoding it emulated takes
  ~6 minutes, see README);
* SSH: the emulated device logs in with its key to an SSHEndpoint running on x86 (host key
  pinned in known_hosts) and gets its line back through a forwarded channel.

The root has Debian 12's glibc 2.36, not JetPack 4.6's 2.27: that the wheels load on 2.27 is
check_wheels.py's job (readelf), tested in test_jetson_setup.py. Skipped only when
qemu-user-static or debootstrap is not installed (scripts/setup.sh installs both) or this is
not root; the first run downloads ~600 MB and builds the root (~2 minutes), later runs reuse it.
"""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from elma_utils.config import PROJECT_ROOT

SETUP = PROJECT_ROOT / "jetson_setup"
sys.path.insert(0, str(SETUP))
import build_tflite_runtime  # noqa: E402
import emulation  # noqa: E402
import verify_edge  # noqa: E402

PRECISIONS = ("float32", "float16", "int8")
ENTROPY_TOLERANCE = {"float32": 1e-5, "float16": 1e-5, "int8": 1e-2}
VAD_TOLERANCE_S = 0.032
STEPS = "qa,vad,sphinx,whisper_load,ssh"


def _json_objects(text: str) -> dict:
    """verify_edge.py prints one indented JSON object per check; all of them, merged."""
    found, decoder, i = {}, json.JSONDecoder(), 0
    while (j := text.find('{\n "', i)) >= 0:
        obj, end = decoder.raw_decode(text[j:])
        found.update(obj)
        i = j + end
    return found


@pytest.fixture(scope="module")
def root() -> Path:
    missing = emulation.missing_tools()
    if missing:
        pytest.skip(f"no aarch64 emulation here: apt-get install {' '.join(missing)} (scripts/setup.sh does)")
    if os.geteuid() != 0:
        pytest.skip("building the emulated arm64 root needs root (debootstrap)")
    return emulation.ensure_root()  # a failure here (network, mirror) fails the tests


@pytest.fixture(scope="module")
def bundles(minilm_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The smoke bundle's model (tests/qa_fixtures.py) in every precision."""
    from qa_fixtures import TINY_WINDOWS, tiny_span_model

    from elma_utils.export.bundle import write_bundle
    from elma_utils.model.multi_exit import MultiExitQAModel

    base = tmp_path_factory.mktemp("emu-bundles")
    multi = MultiExitQAModel.from_span_model(tiny_span_model(0))
    return {
        p: write_bundle(
            multi,
            minilm_tokenizer,
            base / p,
            seq_len=TINY_WINDOWS["max_seq_len"],
            precision=p,
            thresholds={"policy": "entropy", "E_T": 0.5, "rule": "max"},
            model_version=f"tiny-edge-0-{p}",
            doc_stride=TINY_WINDOWS["doc_stride"],
            max_query_len=TINY_WINDOWS["max_query_len"],
        )
        for p in PRECISIONS
    }


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """verify_edge.SPOKEN said by espeak-ng, as 16 kHz mono (what the device's recognisers take)."""
    work = tmp_path_factory.mktemp("emu-clip")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(work / "raw.wav"), verify_edge.SPOKEN], check=True
    )
    subprocess.run(
        ["sox", str(work / "raw.wav"), "-r", "16000", "-c", "1", str(work / "q16k.wav")], check=True
    )
    return work / "q16k.wav"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An SSHEndpoint on x86 in front of a line echo service; the device key and known_hosts."""
    from elma_utils.edge.ssh_keys import (
        add_known_host,
        fingerprint,
        generate_ed25519_key,
        write_authorized_keys,
    )
    from elma_utils.server.ssh_endpoint import SSHEndpoint

    class Echo(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    keys = tmp_path_factory.mktemp("emu-keys")
    host_key = generate_ed25519_key(keys / "host")
    write_authorized_keys(keys / "authorized_keys", [generate_ed25519_key(keys / "device")])
    service = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    service.daemon_threads = True
    threading.Thread(target=service.serve_forever, daemon=True).start()
    endpoint = SSHEndpoint(keys / "host", keys / "authorized_keys", service.server_address).start()
    add_known_host(keys / "known_hosts", "127.0.0.1", endpoint.port, host_key)
    args = [
        "--ssh-endpoint", f"127.0.0.1:{endpoint.port}", "--ssh-key", str(keys / "device"),
        "--known-hosts", str(keys / "known_hosts"), "--ssh-target", "{}:{}".format(*service.server_address),
    ]  # fmt: skip
    yield {"args": args, "fingerprint": fingerprint(host_key), "endpoint": endpoint}
    endpoint.close()
    service.shutdown()
    service.server_close()


def _verify_args(bundles: dict[str, Path], clip: Path, server: dict) -> list[str]:
    args = ["--self-test", "--steps", STEPS, "--clip", str(clip), *server["args"]]
    for p in PRECISIONS:
        args += ["--qa", str(bundles[p])]
    return args


@pytest.fixture(scope="module")
def x86(bundles, clip, server) -> dict:
    done = subprocess.run(
        [sys.executable, str(SETUP / "verify_edge.py"), *_verify_args(bundles, clip, server)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _json_objects(done.stdout)


@pytest.fixture(scope="module")
def emulated(root, bundles, clip, server, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("emu-home")
    args = [
        "--versions",
        "--pins",
        str(SETUP / "environment.yml"),
        "--imports",
        *_verify_args(bundles, clip, server),
    ]
    done = subprocess.run(
        emulation.python_command(root, str(SETUP / "verify_edge.py"), *args),
        env=emulation.environment(root, home=str(home)),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _json_objects(done.stdout)


@pytest.mark.slow
def test_emulated_board_has_exactly_the_pinned_stack(emulated) -> None:
    versions = emulated["versions"]
    assert versions["machine"] == "aarch64" and versions["python"].startswith("3.11.")
    assert versions["tflite-runtime"] == build_tflite_runtime.VERSION
    assert versions["ai-edge-litert"] is None and versions["tensorflow"] is None
    assert emulated["pins_checked"] == len(emulation.pins()) and emulated["mismatches"] == []


@pytest.mark.slow
def test_every_device_module_and_library_imports_emulated(emulated) -> None:
    imports = emulated["imports"]
    assert imports["failed"] == {}, imports["failed"]
    assert imports["interpreter"] == "tflite_runtime.interpreter.Interpreter"
    assert imports["heavy_frameworks_loaded"] == []
    for module in (
        "elma_utils.edge.device",
        "elma_utils.edge.ssh_client",
        "faster_whisper",
        "onnxruntime",
        "av",
    ):
        assert module in imports["ok"]
    # sounddevice finds PortAudio with ctypes.util.find_library, which runs ldconfig: an aarch64
    # program qemu-user cannot start without binfmt. The library itself is in the root.
    assert set(imports["optional_failed"]) <= {"sounddevice"}
    assert Path(imports["whisper_model"], "model.bin").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_emulated_answers_equal_x86(precision: str, emulated, x86, bundles) -> None:
    qa_emu, qa_x86 = emulated["self_test"]["steps"]["qa"], x86["self_test"]["steps"]["qa"]
    assert qa_emu["ok"] and qa_x86["ok"]
    assert qa_emu["interpreter"] == "tflite_runtime.interpreter.Interpreter"
    assert qa_x86["interpreter"] == "ai_edge_litert.interpreter.Interpreter"
    emu = qa_emu["bundles"][str(bundles[precision])]["answers"]
    ref = qa_x86["bundles"][str(bundles[precision])]["answers"]
    assert len(emu) == len(ref) == len(verify_edge.SAMPLES)
    for a, b in zip(emu, ref, strict=True):
        assert (a["answer"], a["span"], a["exit_layer"], a["solved"]) == (
            b["answer"],
            b["span"],
            b["exit_layer"],
            b["solved"],
        ), a["question"]
        assert len(a["entropies"]) == len(b["entropies"]) == a["exit_layer"]
        for ea, eb in zip(a["entropies"], b["entropies"], strict=True):
            assert abs(ea - eb) <= ENTROPY_TOLERANCE[precision], (a["question"], ea, eb)
    assert any(a["answer"] for a in emu)


@pytest.mark.slow
def test_emulated_speech_front_end_equals_x86(emulated, x86) -> None:
    emu, ref = emulated["self_test"]["steps"], x86["self_test"]["steps"]
    assert emu["vad"]["ok"] and ref["vad"]["ok"]
    assert len(emu["vad"]["segments"]) == len(ref["vad"]["segments"]) >= 1
    for (s0, e0), (s1, e1) in zip(emu["vad"]["segments"], ref["vad"]["segments"], strict=True):
        assert abs(s0 - s1) <= VAD_TOLERANCE_S and abs(e0 - e1) <= VAD_TOLERANCE_S
    assert emu["sphinx"]["ok"], emu["sphinx"]
    assert emu["sphinx"]["transcript"] == ref["sphinx"]["transcript"] == verify_edge.SPOKEN
    assert emu["sphinx"]["raw"] == ref["sphinx"]["raw"]
    assert emu["whisper_load"]["ok"], emu["whisper_load"]


@pytest.mark.slow
@pytest.mark.network
def test_emulated_device_opens_an_ssh_connection_to_the_x86_endpoint(emulated, server) -> None:
    ssh = emulated["self_test"]["steps"]["ssh"]
    assert ssh["ok"], ssh
    assert ssh["reply_matches"] and ssh["reply"].startswith("elma self-test ")
    assert ssh["server_fingerprint"] == server["fingerprint"]
    assert emulated["self_test"]["failed"] == []


@pytest.mark.slow
def test_04_verify_passes_on_the_emulated_board(root, bundles, clip, tmp_path) -> None:
    """jetson_setup/04_verify.sh as on the board, its --python the emulated one: every pin at
    its version, every module imported, the self-test (its own loopback SSH endpoint, inside
    the emulation), the sample question answered; exit status 0."""
    wrapper = emulation.python_wrapper(root, tmp_path / "python")
    env = {**emulation.environment(root, home=str(tmp_path)), "ELMA_LOG_DIR": str(tmp_path / "logs")}
    done = subprocess.run(
        ["bash", str(SETUP / "04_verify.sh"), "--python", str(wrapper), "--bundle", str(bundles["int8"]),
         "--repeat", "1", "--clip", str(clip), "--steps", "qa,vad,sphinx,whisper_load,ssh"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    assert "verify: all checks passed" in out
    found = _json_objects(out)
    assert found["mismatches"] == [] and found["versions"]["machine"] == "aarch64"
    assert found["imports"]["failed"] == {} and found["self_test"]["failed"] == []
    assert found["self_test"]["steps"]["ssh"]["server"] == "SSHEndpoint on loopback (started here)"
    answer = found["edge_answer"]
    assert answer["interpreter"] == "tflite_runtime.interpreter.Interpreter" and answer["precision"] == "int8"
    assert (
        answer["answer"]
        == found["self_test"]["steps"]["qa"]["bundles"][str(bundles["int8"])]["answers"][0]["answer"]
    )


# ---------------------------------------------- the interpreter wheel, without emulation
@pytest.mark.slow
def test_tflite_runtime_cut_from_tensorflow_answers_like_ai_edge_litert(bundles, tmp_path) -> None:
    """build_tflite_runtime.py on the venv's own TensorFlow 2.21 (x86_64): the wheel installs,
    imports as tflite_runtime without TensorFlow, and answers exactly as ai-edge-litert does."""
    import tensorflow as tf

    wheel = build_tflite_runtime.build(out=tmp_path / "wheels", from_installed=Path(tf.__file__).parent)
    again = build_tflite_runtime.build(out=tmp_path / "again", from_installed=Path(tf.__file__).parent)
    assert build_tflite_runtime.sha256_of(wheel) == build_tflite_runtime.sha256_of(again)  # reproducible
    assert wheel.name == f"tflite_runtime-2.21.0+elma-cp311-cp311-linux_{os.uname().machine}.whl"
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    files = sorted(p.name for p in (site / "tflite_runtime").iterdir() if p.name != "__pycache__")
    assert files == sorted([*build_tflite_runtime.MEMBERS, "__init__.py"])
    script = (
        "import sys, json\n"
        "sys.modules['ai_edge_litert'] = None  # as on the TX2: no ai-edge-litert\n"
        "from elma_utils.edge.runtime import EdgeModel, interpreter_class\n"
        "import verify_edge\n"
        "out = {'interpreter': interpreter_class().__module__, 'answers': [], 'tf': 'tensorflow' in sys.modules}\n"
        "model = EdgeModel.load(sys.argv[1])\n"
        "for q, c in verify_edge.SAMPLES:\n"
        "    a = model.answer(q, c)\n"
        "    out['answers'].append([a.text, a.char_start, a.exit_layer, [round(e, 6) for e in a.entropies]])\n"
        "print(json.dumps(out))\n"
    )

    def answers(*path: Path, block: bool) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*path, PROJECT_ROOT, SETUP]))}
        code = script if block else script.replace("sys.modules['ai_edge_litert'] = None", "pass")
        done = subprocess.run(
            [sys.executable, "-c", code, str(bundles["float32"])],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cut, litert = answers(site, block=True), answers(block=False)
    assert cut["interpreter"] == "tflite_runtime.interpreter" and not cut["tf"]
    assert litert["interpreter"] == "ai_edge_litert.interpreter"
    assert cut["answers"] == litert["answers"]


def test_tflite_runtime_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path) -> None:
    fake = tmp_path / build_tflite_runtime.TF_WHEELS["aarch64"][0]
    fake.write_bytes(b"not a wheel")
    with pytest.raises(build_tflite_runtime.BuildError, match="sha256 differs"):
        build_tflite_runtime.build(out=tmp_path / "out", tensorflow_wheel=fake)
    with pytest.raises(build_tflite_runtime.BuildError, match=r"sha256 .*, PyPI publishes 4b24aca1"):
        build_tflite_runtime.fetch_tensorflow_wheel("aarch64", tmp_path)  # found in the cache, wrong bytes
    wrong = tmp_path / "site" / "tensorflow"
    wrong.mkdir(parents=True)
    (tmp_path / "site" / "tensorflow-2.20.0.dist-info").mkdir()
    with pytest.raises(build_tflite_runtime.BuildError, match="is TensorFlow 2.20.0, not 2.21.0"):
        build_tflite_runtime.build(out=tmp_path / "out", from_installed=wrong)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_emulated_root_recipe_names_a_tx2(monkeypatch) -> None:
    """The fake /proc/cpuinfo: six cores, 0 and 3-5 Cortex-A57, 1-2 Denver 2; the cache key
    changes with the pins."""
    info = emulation.tx2_cpuinfo()
    parts = [line.split(":")[1].strip() for line in info.splitlines() if line.startswith("CPU part")]
    assert parts == ["0xd07", "0x003", "0x003", "0xd07", "0xd07", "0xd07"]
    assert info.count("processor\t:") == 6 and "asimd" in info
    assert emulation.QEMU_CPU == "cortex-a57"
    key = emulation.cache_key()
    assert len(key) == 12 and key == emulation.cache_key()
    pinned = emulation.pins()
    monkeypatch.setattr(emulation, "pins", lambda: [*pinned, ("extra", "1.0")])
    assert emulation.cache_key() != key
