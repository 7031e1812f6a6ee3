"""Spoken question -> answer with real parts: espeak-ng speech, Whisper tiny.en, tiny real QA models
(full-model artifact, edge bundle), the loopback offload server; and the CLI's context lookup."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import soundfile as sf
from qa_fixtures import save_tiny_artifact, write_tiny_bundle
from speech_helpers import spoken

from elma_utils.edge.client import EdgeQA
from elma_utils.edge.runtime import EdgeModel
from elma_utils.model.inference import QAModel
from elma_utils.server.service import ModelAnswerer, OffloadServer
from elma_utils.speech.audio import AudioError
from elma_utils.speech.recognizers import RecognitionError, get_recognizer
from elma_utils.speech.spoken_qa import ContextError, SpokenQA, resolve_context
from elma_utils.speech.wer import word_error_rate

QUESTION = "What is the capital of France?"
CONTEXT = (
    "France is a country in Western Europe. Paris is the capital and most populous city of France, "
    "with more than two million residents. The Seine flows through the city."
)
V11_ID = "57111428b654c5140001fb00"  # "What group killed thousands of Huguenots?"


@pytest.fixture(scope="module")
def whisper():
    return get_recognizer("whisper")


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    sf.write(path, spoken(QUESTION), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer):
    return save_tiny_artifact(tmp_path_factory.mktemp("full") / "tiny", minilm_tokenizer)


@pytest.fixture(scope="module")
def settling_bundle(tmp_path_factory, minilm_tokenizer):
    """E_T = 1: every entropy (normalised to [0, 1]) is below it, so layer 1 settles."""
    return write_tiny_bundle(tmp_path_factory.mktemp("edge1") / "b", minilm_tokenizer, 1.0)


@pytest.fixture(scope="module")
def unsettled_bundle(tmp_path_factory, minilm_tokenizer):
    """E_T below any entropy: no layer settles, the question runs to the last layer."""
    return write_tiny_bundle(tmp_path_factory.mktemp("edge0") / "b", minilm_tokenizer, -1.0)


def _check_common(result, context=CONTEXT):
    assert word_error_rate(QUESTION, result.transcript) <= 0.2, result.transcript
    assert result.engine == "whisper"
    assert result.audio_seconds == pytest.approx(spoken(QUESTION).size / 16000, abs=0.3)  # silence trimmed
    assert result.answer and result.answer in context
    assert context[result.char_start : result.char_end] == result.answer
    timings = result.timings_ms
    assert all(v > 0 for k, v in timings.items() if k != "server"), timings
    stages = sum(v for k, v in timings.items() if k not in ("total", "server"))
    assert timings["total"] >= stages * 0.99  # the stages happen inside the total
    assert list(timings)[:2] == ["load_audio", "asr"] and list(timings)[-1] == "total"
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["transcript"] == result.transcript and as_json["where"] == result.where
    assert as_json["timings_ms"]["asr"] == pytest.approx(timings["asr"], abs=1e-3)


def test_full_model_answers_a_spoken_question(whisper, wav, model_dir):
    qa = QAModel.load(model_dir)
    result = SpokenQA(whisper, qa).ask(wav, CONTEXT, reference=QUESTION)
    _check_common(result)
    assert (result.source, result.where, result.exit_layer) == ("full-model", "full model", None)
    assert set(result.timings_ms) == {"load_audio", "asr", "full_model", "total"}
    assert result.answer == qa.answer(result.transcript, CONTEXT).text  # the same as typing the transcript
    assert result.wer == pytest.approx(word_error_rate(QUESTION, result.transcript))
    assert 0 < result.real_time_factor < 5


def test_edge_model_exits_at_layer_one(whisper, wav, settling_bundle):
    edge = EdgeModel.load(settling_bundle)
    result = SpokenQA(whisper, edge).ask(wav, CONTEXT)
    _check_common(result)
    assert (result.source, result.exit_layer, result.num_layers, result.edge_solved) == ("edge", 1, 2, True)
    assert result.where == "edge layer 1 of 2"
    assert [k for k in result.timings_ms if k.startswith("edge_layer")] == ["edge_layer_1"]
    assert {"tokenise", "embeddings"} <= set(result.timings_ms)
    assert result.answer == edge.answer(result.transcript, CONTEXT).text


def test_samples_in_memory_are_accepted_and_resampled(whisper, unsettled_bundle):
    samples = spoken(QUESTION, sample_rate=22050)
    result = SpokenQA(whisper, EdgeModel.load(unsettled_bundle)).ask(samples, CONTEXT, sr=22050)
    _check_common(result)
    assert (result.exit_layer, result.edge_solved) == (2, False)
    assert result.where == "edge layer 2 of 2, no exit settled it"
    assert [k for k in result.timings_ms if k.startswith("edge_layer")] == ["edge_layer_1", "edge_layer_2"]


class _LoopbackLines:
    """The tunnel interface EdgeQA uses (request_line), over a plain loopback TCP connection."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")

    def request_line(self, payload: bytes, timeout: float | None = None) -> bytes:
        self.sock.sendall(payload if payload.endswith(b"\n") else payload + b"\n")
        return self.reader.readline().rstrip(b"\n")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def test_edge_qa_offloads_to_the_server_and_falls_back_without_one(
    whisper, wav, unsettled_bundle, model_dir, tmp_path
):
    edge_model = EdgeModel.load(unsettled_bundle)
    with OffloadServer(ModelAnswerer.load(model_dir), tmp_path / "hard.sqlite3") as server:
        tunnel = _LoopbackLines(server.port)
        try:
            edge_qa = EdgeQA(edge_model, tunnel, device_id="spoken-test")
            result = SpokenQA(whisper, edge_qa).ask(wav, CONTEXT)
        finally:
            tunnel.close()
    _check_common(result)
    assert result.source == "server" and result.where == "server (edge stopped after layer 2 of 2)"
    assert result.answer == QAModel.load(model_dir).answer(result.transcript, CONTEXT).text
    timings = result.timings_ms
    assert {"edge_layer_1", "edge_layer_2", "offload", "server"} <= set(timings)
    assert timings["offload"] >= timings["server"] > 0
    assert edge_qa.edge is edge_model  # SpokenQA wrapped a copy, not the caller's EdgeQA

    offline = SpokenQA(whisper, EdgeQA(edge_model, tunnel=None)).ask(wav, CONTEXT)
    assert offline.source == "edge-fallback" and "no server configured" in offline.error
    assert offline.where.startswith("edge layer 2 of 2, server unreachable")
    assert "offload" in offline.timings_ms and "server" not in offline.timings_ms


def test_errors_are_clear(whisper, model_dir, tmp_path):
    qa = SpokenQA(whisper, QAModel.load(model_dir))
    tone = tmp_path / "tone.wav"
    t = np.arange(16000) / 16000
    sf.write(tone, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    with pytest.raises(RecognitionError, match=r"nothing was recognised in .*tone\.wav"):
        qa.ask(tone, CONTEXT)
    with pytest.raises(AudioError, match="does not exist"):
        qa.ask(tmp_path / "missing.wav", CONTEXT)
    with pytest.raises(ContextError, match="context is empty"):
        qa.ask(tone, "  ")
    with pytest.raises(TypeError, match="answerer must have"):
        SpokenQA(whisper, object())


# ---------------------------------------------------------------- resolve_context


def test_context_from_text_or_file(tmp_path):
    assert resolve_context(context=CONTEXT) == (CONTEXT, None)
    path = tmp_path / "ctx.txt"
    path.write_text(f"\n{CONTEXT}\n", encoding="utf-8")
    assert resolve_context(context_file=path) == (CONTEXT, None)
    assert resolve_context(context_file=str(path)) == (CONTEXT, None)
    with pytest.raises(ContextError, match="exactly one.*none was given"):
        resolve_context()
    with pytest.raises(ContextError, match="got --context and --squad-id"):
        resolve_context(context=CONTEXT, squad_id=V11_ID)
    with pytest.raises(ContextError, match="--context is empty"):
        resolve_context(context=" \n")
    with pytest.raises(ContextError, match=r"context file .*nope\.txt does not exist"):
        resolve_context(context_file=tmp_path / "nope.txt")
    with pytest.raises(ContextError, match="is not a file"):
        resolve_context(context_file=tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ContextError, match="empty"):
        resolve_context(context_file=tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("Beyonc\xe9".encode("latin-1"))
    with pytest.raises(ContextError, match="not UTF-8"):
        resolve_context(context_file=tmp_path / "latin1.txt")


def test_context_from_squad_ids(dev_v11):
    from elma_utils.squad.data import load_squad

    context, question = resolve_context(squad_id=V11_ID)
    example = next(e for e in dev_v11.examples if e.qas_id == V11_ID)
    assert (context, question) == (example.context, example.question)
    v11_ids = {e.qas_id for e in dev_v11.examples}
    only_v2 = next(e for e in load_squad("2.0", "dev", download=False).examples if e.qas_id not in v11_ids)
    assert resolve_context(squad_id=only_v2.qas_id) == (only_v2.context, only_v2.question)
    with pytest.raises(
        ContextError, match=r"no question with id 'nope-123' in dev-v1\.1\.json or dev-v2\.0\.json"
    ):
        resolve_context(squad_id="nope-123")


def test_squad_id_without_data_files_says_where_to_put_them(tmp_path):
    with pytest.raises(ContextError, match=r"cannot look up --squad-id x.*dev-v1\.1\.json"):
        resolve_context(squad_id="x", data_dir=tmp_path)


# ---------------------------------------------------------------- spoken vs typed F1


def test_spoken_vs_typed_f1(whisper, model_dir, dev_v11, tmp_path):
    from elma_utils.speech.qa_benchmark import format_table, spoken_vs_typed_f1, subset, targets_met
    from elma_utils.speech.spoken_data import generate_spoken_questions
    from elma_utils.squad.metrics import per_question_scores

    examples = [
        e for e in dev_v11.examples if e.qas_id in ("57111428b654c5140001fb00", "5729276c1d046914007790da")
    ]
    manifest = generate_spoken_questions(examples, tmp_path, voices=("en-us", "en-gb"), progress=False)
    qa = QAModel.load(model_dir)
    result = spoken_vs_typed_f1(manifest, qa, dev_v11, "1.1", whisper, True, progress=False)
    rows = result["rows"]
    assert (result["questions"], result["utterances"], result["engine"]) == (2, 4, "whisper")
    typed = {e.qas_id: qa.answer(e.question, e.context).text for e in examples}
    contexts = {e.qas_id: e.context for e in examples}
    scores = per_question_scores(dev_v11, typed, "1.1")
    for row in rows:
        assert row["typed_answer"] == typed[row["qas_id"]]
        assert row["typed_f1"] == scores[row["qas_id"]][1]
        assert row["spoken_answer"] == qa.answer(row["transcript"], contexts[row["qas_id"]]).text
        assert 0.0 <= row["spoken_f1"] <= 1.0
    assert result["typed_f1"] == pytest.approx(100 * np.mean([r["typed_f1"] for r in rows]), abs=0.01)
    assert result["spoken_f1"] == pytest.approx(100 * np.mean([r["spoken_f1"] for r in rows]), abs=0.01)
    assert result["f1_drop"] == pytest.approx(result["typed_f1"] - result["spoken_f1"], abs=0.02)
    assert result["wer"] <= 0.1  # names fixed by the context (see test_speech_recognition)
    assert set(result["by_voice"]) == {"en-us", "en-gb"} and result["by_voice"]["en-gb"]["utterances"] == 2
    exact = result["by_transcript"]["exact"]
    assert exact["utterances"] == sum(r["exact"] for r in rows)
    if exact["utterances"]:
        assert exact["f1_drop"] == pytest.approx(0.0, abs=0.01)  # same words, same answer
    one = subset(result, {"5729276c1d046914007790da"})
    assert one["utterances"] == 2 and one["questions"] == 1
    assert set(targets_met(result)) == {"wer", "rtf", "f1_drop"}
    assert "whisper" in format_table({"whisper": result})


# -- the command line: elma ask ------------------------------------------------------------------------
def test_elma_ask_spoken_and_typed(wav, model_dir, settling_bundle, capsys, tmp_path):
    from elma_utils.cli import main

    context_file = tmp_path / "context.txt"
    context_file.write_text(CONTEXT)
    assert main(["ask", "--audio", str(wav), "--context-file", str(context_file), "--model", str(model_dir),
                 "--json"]) == 0  # fmt: skip
    spoken_answer = json.loads(capsys.readouterr().out)
    assert word_error_rate([QUESTION], [spoken_answer["transcript"]]) <= 0.3
    assert spoken_answer["source"] == "full-model" and spoken_answer["answer"] in CONTEXT
    assert {"load_audio", "asr", "full_model", "total"} <= set(spoken_answer["timings_ms"])

    assert main(["ask", "--question", QUESTION, "--context", CONTEXT, "--bundle", str(settling_bundle)]) == 0
    out = capsys.readouterr().out
    assert "from:   edge layer 1 of 2" in out and "answer: " in out and "heard:" not in out

    assert main(["ask", "--context", CONTEXT, "--model", str(model_dir)]) == 2  # no question at all
    assert "--audio FILE, --mic or --question TEXT" in capsys.readouterr().err


def test_elma_ask_from_a_missing_microphone_says_what_to_do(wav, model_dir, capsys):
    """No microphone on this machine (or no PyAudio): a clear error naming the fix, exit status 2,
    before any model is loaded; --mic with --audio is refused."""
    from elma_utils.cli import main

    assert (
        main(["ask", "--mic", "--mic-timeout", "0.5", "--context", CONTEXT, "--model", str(model_dir)]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("elma ask: error: ")
    # no PyAudio (CI), no device, or (a machine with a microphone, in silence) nobody spoke
    assert "pip install PyAudio" in err or "no usable microphone" in err or "nobody spoke" in err
    if "nobody spoke" not in err:
        assert "--audio FILE" in err
    assert main(["ask", "--mic", "--audio", str(wav), "--context", CONTEXT, "--model", str(model_dir)]) == 2
    assert "not both" in capsys.readouterr().err
