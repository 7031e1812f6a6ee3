"""`elma ask` and `elma device` do not answer a transcript the recogniser's guard doubts:
they say it is unreliable, why, and ask for the question again (real espeak-ng audio)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from qa_fixtures import write_tiny_bundle

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
CONTEXT = (
    "France is a country in Western Europe. Paris is the capital and most populous city of France, "
    "with more than two million residents. The Seine flows through the city."
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ask-repeat")
    subprocess.run(["espeak-ng", "-w", str(d / "please.wav"), ", ".join(["please"] * 9)], check=True)
    return d


@pytest.fixture(scope="module")
def bundle(work, minilm_tokenizer):
    return write_tiny_bundle(work / "bundle", minilm_tokenizer, 1.0)


def _ask_args(audio, bundle, work, monkeypatch) -> list[str]:
    """`elma ask` arguments for `audio` on the tiny bundle, no LM; the cache under `work`."""
    monkeypatch.setenv("ELMA_CACHE_DIR", str(work / "cache"))
    return ["ask", "--audio", str(audio), "--context", CONTEXT, "--bundle", str(bundle), "--lm", "none"]


def test_elma_ask_says_the_transcript_is_unreliable_and_asks_to_repeat(work, bundle, capsys, monkeypatch):
    pytest.importorskip("faster_whisper")
    from elma_utils.cli import main

    args = _ask_args(work / "please.wav", bundle, work, monkeypatch)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "heard:" in out and "please" in out.lower()
    assert "(not answered) the transcript looks unreliable: repeats itself" in out
    assert "please repeat the question" in out
    assert "from:" not in out  # no answer was given

    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["source"] == "ask-repeat" and record["answer"] == "" and record["no_answer"] is True
    assert "repeats itself" in record["unreliable"]
    assert record["where"].startswith("not answered: the transcript looks unreliable")


def test_a_clear_spoken_question_is_still_answered(work, bundle, capsys, monkeypatch):
    pytest.importorskip("faster_whisper")
    from elma_utils.cli import main

    subprocess.run(["espeak-ng", "-w", str(work / "q.wav"), "What is the capital of France?"], check=True)
    args = [*_ask_args(work / "q.wav", bundle, work, monkeypatch), "--json"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["source"] == "edge" and record["unreliable"] is None


def test_elma_device_asks_to_repeat_instead_of_answering(work):
    """The device's answer step with the real recogniser on the repeating clip: status
    ask_repeat, the reason in the record and the printed line, nothing sent to the model."""
    pytest.importorskip("faster_whisper")
    import io
    import threading
    from types import SimpleNamespace

    from elma_utils.edge.device import DeviceProgram
    from elma_utils.edge.question_sources import Question
    from elma_utils.speech.recognizers import WhisperRecognizer

    class NoModel:
        model_version = "v-test"

        def answer(self, question, context):
            raise AssertionError("an unreliable transcript must not be answered")

    program = DeviceProgram.__new__(DeviceProgram)
    program.cfg = SimpleNamespace(device_id="board-1")
    program.context, program.qa, program.answer_lock = CONTEXT, NoModel(), threading.Lock()
    program.recognizer = WhisperRecognizer(lm=None)
    program.json_lines, program.out = False, io.StringIO()
    record = program.answer(Question("folder", "please.wav", path=work / "please.wav"))
    assert record["status"] == "ask_repeat" and record["source"] == "none" and record["answer"] == ""
    assert record["transcript_unreliable"] and "repeats itself" in record["unreliable_reason"]
    assert record["error"].startswith("please repeat the question (unreliable: repeats itself")
    program.emit(record)
    line = program.out.getvalue()
    assert "(unreliable: repeats itself" in line and "not answered: please repeat the question" in line
