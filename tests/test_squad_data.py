"""SQuAD loading and validation, downloads, article splits and made-up unanswerable questions."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from elma_utils.squad import data
from elma_utils.squad.data import (
    SQUAD_SHA256,
    SQUAD_URLS,
    Answer,
    SquadDataset,
    SquadExample,
    examples_to_squad_json,
    load_squad,
    load_squad_file,
    make_unanswerable,
    split_by_article,
    squad_filename,
    squad_path,
)


@functools.cache
def _real(version: str, split: str = "dev") -> SquadDataset:
    return load_squad(version, split, download=False)


def real(version: str, split: str = "dev") -> SquadDataset:
    """The shared SQuAD file (loaded once per session), or a skip where it is absent."""
    try:
        return _real(version, split)
    except FileNotFoundError as exc:
        pytest.skip(f"SQuAD {split}-v{version} not available: {exc}")


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _assert_answers_at_start(examples: list[SquadExample]) -> None:
    for ex in examples:
        for a in ex.answers:
            assert ex.context[a.start : a.start + len(a.text)] == a.text, ex.qas_id


# ---------------------------------------------------------------- the real files


def test_dev_v1_counts_and_offsets() -> None:
    dev = real("1.1")
    assert (dev.version, dev.split) == ("1.1", "dev")
    assert len(dev.examples) == 10570
    r = dev.report
    assert (r.n_articles, r.n_paragraphs, r.n_questions, r.n_unanswerable, r.n_bad) == (48, 2067, 10570, 0, 0)
    assert len({ex.title for ex in dev.examples}) == 48
    assert len({ex.context_id for ex in dev.examples}) == 2067
    assert len({ex.qas_id for ex in dev.examples}) == 10570
    _assert_answers_at_start(dev.examples)
    assert dev.raw["version"] == "1.1" and len(dev.raw["data"]) == 48
    first = dev.examples[0]
    assert first.context_id == "Super_Bowl_50#0"
    assert first.answers[0] == Answer("Denver Broncos", 177)


def test_dev_v2_counts_and_offsets() -> None:
    dev = real("2.0")
    assert dev.version == "2.0"
    assert len(dev.examples) == 11873
    assert dev.report.n_unanswerable == 5945
    assert sum(ex.is_impossible for ex in dev.examples) == 5945
    assert (dev.report.n_articles, dev.report.n_paragraphs, dev.report.n_bad) == (35, 1204, 0)
    assert all(not ex.answers for ex in dev.examples if ex.is_impossible)
    assert all(ex.answers for ex in dev.examples if not ex.is_impossible)
    _assert_answers_at_start(dev.examples)


@pytest.mark.slow
def test_train_v1_counts() -> None:
    train = real("1.1", "train")
    assert train.split == "train"
    r = train.report
    assert (r.n_articles, r.n_paragraphs, r.n_questions, len(train.examples)) == (442, 18896, 87599, 87599)
    _assert_answers_at_start(train.examples)


def test_limit_keeps_first_questions_and_cuts_raw() -> None:
    full = real("1.1")
    small = load_squad("1.1", "dev", download=False, limit=100)
    assert small.examples == full.examples[:100]
    assert small.report.n_questions == 100
    assert sum(len(p["qas"]) for a in small.raw["data"] for p in a["paragraphs"]) == 100
    assert sum(len(p["qas"]) for a in full.raw["data"] for p in a["paragraphs"]) == 10570  # untouched


def test_version_mismatch_is_an_error() -> None:
    dev2 = real("2.0")
    with pytest.raises(ValueError, match="declares SQuAD version"):
        load_squad_file(dev2.path, version="1.1")


def test_names_and_urls() -> None:
    assert squad_filename("1.1", "train") == "train-v1.1.json"
    assert squad_filename("v2.0", "dev") == "dev-v2.0.json"
    assert (
        SQUAD_URLS[("1.1", "train")] == "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json"
    )
    assert set(SQUAD_URLS) == {("1.1", "train"), ("1.1", "dev"), ("2.0", "train"), ("2.0", "dev")}
    assert SQUAD_SHA256[("1.1", "dev")] == "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
    with pytest.raises(ValueError, match="version"):
        squad_filename("3.0", "dev")
    with pytest.raises(ValueError, match="split"):
        squad_filename("1.1", "test")


def test_shared_dev_v1_matches_official_hash() -> None:
    path = real("1.1").path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SQUAD_SHA256[("1.1", "dev")]


# ---------------------------------------------------------------- validation of crafted files

CONTEXT = "The quick brown fox jumps over the lazy dog. The fox runs."  # 'fox' at 16 and 49


def _qa(qid: str, answers: list[tuple[str, object]], **extra: object) -> dict:
    return {
        "id": qid,
        "question": f"question {qid}?",
        "answers": [{"text": t, "answer_start": s} for t, s in answers],
        **extra,
    }


def _crafted() -> dict:
    missing_question = _qa("missing", [("fox", 16)])
    del missing_question["question"]
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Animals",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            _qa("good", [("quick brown fox", 4)]),
                            _qa("fixable", [("fox", 45)]),  # nearest 'fox' is at 49
                            _qa("unfixable", [("cat", 3)]),
                            missing_question,
                            _qa("partly", [("lazy dog", 35), ("zebra", 0)]),
                            _qa("good", [("dog", 40)]),  # duplicate id
                            _qa("nostart", [("runs", "x")]),
                        ],
                    },
                    {"qas": [_qa("nocontext", [("a", 0)])]},
                ],
            },
            {"paragraphs": [{"context": "x", "qas": [_qa("notitle1", []), _qa("notitle2", [])]}]},
            "not an article",
        ],
    }


def test_crafted_file_counts_problems_without_crashing(tmp_path: Path) -> None:
    ds = load_squad_file(_write_json(tmp_path / "tiny.json", _crafted()))
    kept = {ex.qas_id: ex for ex in ds.examples}
    assert list(kept) == ["good", "fixable", "partly", "nostart"]
    assert kept["fixable"].answers == (Answer("fox", 49),)
    assert kept["partly"].answers == (Answer("lazy dog", 35),)
    assert kept["nostart"].answers == (Answer("runs", 53),)
    _assert_answers_at_start(ds.examples)
    r = ds.report
    assert (r.n_articles, r.n_paragraphs, r.n_questions) == (3, 2, 10)  # paragraphs of good articles
    # flagged: fixable, partly, nostart; dropped: unfixable, missing, duplicate, nocontext, notitle1+2
    assert r.n_bad == 9
    text = "\n".join(r.problems)
    assert "qid fixable answer 0: answer 'fox' not at 45, moved to 49" in text
    assert "qid unfixable" in text and "not in the context" in text
    assert "missing field 'question'" in text
    assert "duplicate" in text and "missing field 'context'" in text and "missing field 'title'" in text
    assert ds.version == "1.1" and ds.split == "dev"


def test_v2_requires_is_impossible(tmp_path: Path) -> None:
    raw = {
        "version": "v2.0",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            _qa("ok", [], is_impossible=True),
                            _qa("no_flag", [("fox", 16)]),
                            _qa("answerable_without_answer", [], is_impossible=False),
                            _qa("impossible_with_answer", [("fox", 16)], is_impossible=True),
                        ],
                    }
                ],
            }
        ],
    }
    ds = load_squad_file(_write_json(tmp_path / "train-v2.0.json", raw))
    assert (ds.version, ds.split) == ("2.0", "train")
    assert [ex.qas_id for ex in ds.examples] == ["ok", "impossible_with_answer"]
    assert all(ex.is_impossible and ex.answers == () for ex in ds.examples)
    assert ds.report.n_unanswerable == 2
    assert ds.report.n_bad == 3
    assert "missing field 'is_impossible'" in "\n".join(ds.report.problems)


def test_problem_list_is_capped(tmp_path: Path) -> None:
    qas = [_qa(f"q{i}", [("cat", 0)]) for i in range(120)]
    raw = {"data": [{"title": "T", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}
    ds = load_squad_file(_write_json(tmp_path / "bad.json", raw))
    assert ds.examples == []
    assert ds.report.n_bad == 120
    assert len(ds.report.problems) == data.MAX_PROBLEMS


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"data": [', "not valid JSON"),
        (b"hello", "not valid JSON"),
        (b"", "not valid JSON"),
        ('{"data": [], "title": "caf\u00e9"}'.encode("latin-1"), "not UTF-8"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),
        (b"[1, 2]", "not a SQuAD file"),
        (b'{"version": "1.1"}', "not a SQuAD file"),
        (b'{"data": {"title": "x"}}', "not a SQuAD file"),
    ],
)
def test_unreadable_files_raise_value_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_squad_file(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- missing files and downloads


def test_missing_file_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_squad("2.0", "train", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "train-v2.0.json") in message
    assert "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v2.0.json" in message


def test_unreachable_download_names_path_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:9/dev-v1.1.json"
    monkeypatch.setitem(SQUAD_URLS, ("1.1", "dev"), url)
    target = tmp_path / "squad"
    with pytest.raises(FileNotFoundError) as info:
        squad_path("1.1", "dev", data_dir=target, timeout=5)
    message = str(info.value)
    assert str(target / "dev-v1.1.json") in message and url in message
    assert list(target.iterdir()) == []


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1 from a thread: (directory, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve_tiny(root: Path, base: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    body = json.dumps({"version": "1.1", "data": [_crafted()["data"][0]]}).encode()
    (root / "dev-v1.1.json").write_bytes(body)
    monkeypatch.setitem(SQUAD_URLS, ("1.1", "dev"), f"{base}/dev-v1.1.json")
    return body


def test_download_with_right_sha256(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _serve_tiny(*http_root, monkeypatch)
    monkeypatch.setitem(SQUAD_SHA256, ("1.1", "dev"), hashlib.sha256(body).hexdigest())
    target = tmp_path / "data"
    ds = load_squad("1.1", "dev", data_dir=target)
    assert ds.path == target / "dev-v1.1.json"
    assert ds.path.read_bytes() == body
    assert [p.name for p in target.iterdir()] == ["dev-v1.1.json"]  # no temporary file left
    assert [ex.qas_id for ex in ds.examples] == ["good", "fixable", "partly", "nostart"]


def test_download_with_wrong_sha256_leaves_nothing(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _serve_tiny(*http_root, monkeypatch)
    monkeypatch.setitem(SQUAD_SHA256, ("1.1", "dev"), "0" * 64)
    target = tmp_path / "data"
    with pytest.raises(FileNotFoundError) as info:
        squad_path("1.1", "dev", data_dir=target)
    message = str(info.value)
    assert hashlib.sha256(body).hexdigest() in message and "0" * 64 in message
    assert str(target / "dev-v1.1.json") in message
    assert list(target.iterdir()) == []


def test_http_error_is_reported(
    tmp_path: Path, http_root: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, base = http_root
    monkeypatch.setitem(SQUAD_URLS, ("2.0", "dev"), f"{base}/nothing-here.json")
    with pytest.raises(FileNotFoundError, match="404"):
        squad_path("2.0", "dev", data_dir=tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


# ---------------------------------------------------------------- splits


def test_split_by_article_is_disjoint_and_deterministic() -> None:
    examples = real("1.1").examples
    kept, held = split_by_article(examples, 0.2, seed=3)
    kept_titles, held_titles = {ex.title for ex in kept}, {ex.title for ex in held}
    assert not kept_titles & held_titles
    assert not {ex.context for ex in kept} & {ex.context for ex in held}
    assert len(held_titles) == round(0.2 * 48)
    assert len(kept) + len(held) == len(examples)
    assert kept == [ex for ex in examples if ex.title in kept_titles]  # order kept
    assert split_by_article(examples, 0.2, seed=3) == (kept, held)
    assert {ex.title for ex in split_by_article(examples[::-1], 0.2, seed=3)[1]} == held_titles  # order-free
    assert {ex.title for ex in split_by_article(examples, 0.2, seed=4)[1]} != held_titles


def test_split_by_article_edges() -> None:
    examples = real("1.1").examples
    assert split_by_article(examples, 0.0) == (examples, [])
    assert split_by_article(examples, 1.0) == ([], examples)
    assert len({ex.title for ex in split_by_article(examples, 0.001)[1]}) == 1
    with pytest.raises(ValueError):
        split_by_article(examples, 1.5)


# ---------------------------------------------------------------- made-up unanswerable questions


def test_make_unanswerable_on_dev() -> None:
    examples = real("1.1").examples
    by_id = {ex.qas_id: ex for ex in examples}
    negatives = make_unanswerable(examples, 0.5, seed=1)
    assert len(negatives) == round(0.5 * len(examples))
    assert len({n.qas_id for n in negatives}) == len(negatives)
    for neg in negatives:
        assert neg.qas_id.endswith("_neg")
        original = by_id[neg.qas_id.removesuffix("_neg")]
        assert (neg.is_impossible, neg.synthetic, neg.answers) == (True, True, ())
        assert neg.question == original.question
        assert neg.title == original.title
        assert neg.context_id != original.context_id and neg.context != original.context
        assert neg.context_id.startswith(f"{original.title}#")
        assert not any(a.text.lower() in neg.context.lower() for a in original.answers)
    assert make_unanswerable(examples, 0.5, seed=1) == negatives
    assert make_unanswerable(examples, 0.5, seed=2) != negatives


def _example(qid: str, title: str, index: int, context: str, answer: str) -> SquadExample:
    return SquadExample(
        qid, f"q {qid}?", context, (Answer(answer, context.index(answer)),), False, title, f"{title}#{index}"
    )


def test_make_unanswerable_skips_single_paragraph_articles_and_answer_contexts() -> None:
    examples = [
        _example("solo", "Solo", 0, "Only one paragraph here.", "one"),
        _example("a0", "Pair", 0, "Paris is the capital of France.", "Paris"),
        _example("a1", "Pair", 1, "Paris has many museums.", "museums"),  # a0's answer is here
        _example("b0", "Trio", 0, "Red is a colour.", "Red"),
        _example("b1", "Trio", 1, "Blue is another colour.", "Blue"),
        _example("b2", "Trio", 2, "Green grass; red roses.", "Green"),  # contains 'red' (b0)
    ]
    negatives = make_unanswerable(examples, 1.0, seed=0)
    made = {n.qas_id: n.context_id for n in negatives}
    assert "solo_neg" not in made and "a0_neg" not in made
    assert made["a1_neg"] == "Pair#0"
    assert made["b0_neg"] == "Trio#1"
    assert set(made) == {"a1_neg", "b0_neg", "b1_neg", "b2_neg"}  # 4 of the 6 asked are possible
    assert len(make_unanswerable(examples, 0.5, seed=0)) == 3
    assert make_unanswerable(examples, 0.0) == []


# ---------------------------------------------------------------- back to json


def test_examples_to_squad_json_round_trips(tmp_path: Path) -> None:
    dev = real("1.1")
    raw = examples_to_squad_json(dev.examples)
    assert raw == dev.raw  # dev-v1.1 has nothing the examples do not keep
    path = _write_json(tmp_path / "dev-copy.json", raw)
    assert load_squad_file(path, "1.1").examples == dev.examples


def test_examples_to_squad_json_round_trips_subsets_and_negatives(tmp_path: Path) -> None:
    dev = real("1.1")
    subset = [ex for ex in dev.examples if ex.context_id.endswith(("#3", "#7"))]
    mixed = subset + make_unanswerable(subset, 0.5, seed=0)
    raw = examples_to_squad_json(mixed, "2.0")
    assert raw["version"] == "v2.0"
    loaded = load_squad_file(_write_json(tmp_path / "train-mixed.json", raw))
    assert loaded.version == "2.0" and loaded.report.n_bad == 0
    assert sorted(loaded.examples, key=lambda e: e.qas_id) == sorted(mixed, key=lambda e: e.qas_id)
    with pytest.raises(ValueError, match="2.0"):
        examples_to_squad_json(mixed, "1.1")


def test_file_missing_from_shared_dir_is_looked_for_in_project_data(tmp_path, monkeypatch):
    from elma_utils import config

    shared, project = tmp_path / "shared", tmp_path / "project"
    shared.mkdir()
    (project / "data" / "squad").mkdir(parents=True)
    (project / "data" / "squad" / "train-v2.0.json").write_text("{}")
    monkeypatch.delenv("ELMA_DATA_DIR", raising=False)
    monkeypatch.setattr(config, "data_dir", lambda: shared)
    monkeypatch.setattr(config, "PROJECT_ROOT", project)
    assert squad_path("2.0", "train", download=False) == project / "data" / "squad" / "train-v2.0.json"
    with pytest.raises(FileNotFoundError, match="dev-v2.0.json"):
        squad_path("2.0", "dev", download=False)


def test_held_back_examples_are_never_training_examples():
    import dataclasses

    from elma_utils import config
    from elma_utils.model.finetune import held_back_examples, training_examples

    profile = dataclasses.replace(config.get_profile("smoke"), v2_unanswerable_ratio=0.0)
    train_ids = {e.qas_id for e in training_examples(profile)}
    held = held_back_examples(profile, 50, seed=1)
    assert len(held) == 50 and not train_ids & {e.qas_id for e in held}
    assert held == held_back_examples(profile, 50, seed=1)
    with pytest.raises(ValueError, match="none is held back"):
        held_back_examples(dataclasses.replace(profile, train_examples=None), 5)


def test_training_examples_add_hard_negatives_when_the_profile_asks():
    import dataclasses

    from elma_utils import config
    from elma_utils.model.finetune import training_examples

    base = dataclasses.replace(config.get_profile("smoke"), v2_unanswerable_ratio=0.0, train_examples=200)
    plain = training_examples(base)
    hard = training_examples(dataclasses.replace(base, hard_negative_ratio=0.5))
    added = hard[len(plain) :]
    assert hard[: len(plain)] == plain and 60 <= len(added) <= 100
    assert all(e.is_impossible and e.qas_id.endswith("_cut") for e in added)


def test_profiles_can_train_on_squad_v2_with_its_real_unanswerable_questions(tmp_path):
    """``train_version="2.0"`` (profile ``full-v2``) reads train-v2.0.json: its crowd-written
    unanswerable questions are trained on as they are, made-up negatives come from the
    answerable ones, and held-back questions come from the same file."""
    import dataclasses

    from elma_utils import config
    from elma_utils.model.finetune import held_back_examples, training_examples
    from elma_utils.squad.data import examples_to_squad_json, load_squad

    assert config.get_profile("full-v2").train_version == "2.0"
    assert config.get_profile("full").train_version == config.get_profile("cpu").train_version == "1.1"
    source = load_squad("2.0", "dev", download=False).examples[
        :300
    ]  # stands in for train-v2.0.json (not available offline here)
    (tmp_path / "train-v2.0.json").write_text(json.dumps(examples_to_squad_json(source, version="2.0")))
    n_impossible = sum(e.is_impossible for e in source)
    assert 0 < n_impossible < len(source)

    profile = dataclasses.replace(
        config.get_profile("smoke"), train_version="2.0", train_examples=None, v2_unanswerable_ratio=0.0
    )
    examples = training_examples(profile, tmp_path)
    assert [e.qas_id for e in examples] == [e.qas_id for e in source]
    assert sum(e.is_impossible for e in examples) == n_impossible

    made = training_examples(dataclasses.replace(profile, v2_unanswerable_ratio=0.5), tmp_path)[len(source) :]
    assert len(made) == round(0.5 * (len(source) - n_impossible))  # half of the answerable ones
    assert all(e.is_impossible and not e.answers for e in made)

    subset = dataclasses.replace(profile, train_examples=200)
    held = held_back_examples(subset, 50, tmp_path, seed=1)
    assert len(held) == 50 and {e.qas_id for e in held} <= {e.qas_id for e in source}
    assert not {e.qas_id for e in held} & {e.qas_id for e in training_examples(subset, tmp_path)}


def test_fresh_questions_for_profiles_that_train_on_everything():
    """Notebook 07 asks questions no model trained on: held-back train questions for subset
    profiles; for ``full`` (every train question) dev-v1.1 questions from other articles than
    the held-out evaluation questions."""
    import dataclasses

    from elma_utils import config
    from elma_utils.model.finetune import fresh_questions, held_back_examples
    from elma_utils.squad.data import load_squad

    smoke = dataclasses.replace(config.get_profile("smoke"), v2_unanswerable_ratio=0.0)
    assert fresh_questions(smoke, 30, seed=2) == held_back_examples(smoke, 30, seed=2)

    full = config.get_profile("full")
    dev = load_squad("1.1", "dev", download=False).examples
    asked = fresh_questions(full, 300, dev_held_out=500, seed=2)
    assert len(asked) == 300 and asked == fresh_questions(full, 300, dev_held_out=500, seed=2)
    held_out_titles = {e.title for e in dev[:500]}
    assert held_out_titles and not held_out_titles & {e.title for e in asked}
    dev_ids = {e.qas_id for e in dev}
    assert {e.qas_id for e in asked} <= dev_ids and len({e.qas_id for e in asked}) == 300
