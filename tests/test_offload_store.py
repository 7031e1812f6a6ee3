"""The server's hard-question store: real SQLite files, retries, repeats, export, kill -9, threads."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from offload_helpers import CONTEXTS, make_answer, make_ask, run_until_killed

from elma_utils.edge.outbox import Outbox
from elma_utils.edge.protocol import AnswerReply, ProtocolError, context_ref
from elma_utils.server.store import HardQuestionStore, question_key
from elma_utils.squad.data import load_squad_file, split_by_article


@pytest.fixture
def store(tmp_path):
    with HardQuestionStore(tmp_path / "hard.db") as s:
        yield s


def test_file_is_wal_with_full_sync_and_marked_as_a_store(tmp_path):
    path = tmp_path / "sub" / "hard.db"
    store = HardQuestionStore(path)
    assert store.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    with pytest.raises(ValueError, match="something else"):
        Outbox(path)  # a store is not an outbox
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="junk.db"):
        HardQuestionStore(tmp_path / "junk.db")


def test_record_stores_every_field(store):
    ask = make_ask(1, device_id="jetson-7", exit_layer=None)
    reply = make_answer(ask, "Paris", score=0.875)
    result = store.record(ask, reply, received_at=1000.0)
    assert (result.duplicate, result.times_asked, result.repeated_question) == (False, 1, False)
    row = store.offload(result.row_id)
    assert row["device_id"] == "jetson-7" and row["request_id"] == "r1"
    assert row["question"] == ask.question and row["context_sha256"] == context_ref(CONTEXTS[0])
    assert (row["edge_text"], row["edge_start"], row["edge_end"], row["edge_exit_layer"]) == (
        "Paris",
        0,
        5,
        None,
    )
    assert row["edge_entropies"] == [0.9, 0.8, 0.7] and row["edge_model_version"] == "edge-test-1"
    assert (row["server_text"], row["server_start"], row["server_end"]) == ("Paris", 0, 5)
    assert (row["server_score"], row["no_answer"], row["server_model_version"]) == (
        0.875,
        False,
        "server-test-1",
    )
    assert (row["server_ms"], row["received_at"], row["retries"]) == (12.5, 1000.0, 0)
    assert store.get_context(context_ref(CONTEXTS[0])) == CONTEXTS[0]
    assert store.offload(result.row_id + 1) is None


def test_a_client_retry_is_not_stored_twice(store):
    ask = make_ask(1)
    first = store.record(ask, make_answer(ask))
    again = store.record(ask, make_answer(ask, "capital"))  # same device and request id
    assert again.duplicate and again.row_id == first.row_id and again.times_asked == 1
    assert store.offload(first.row_id)["server_text"] == "Paris"  # the first record is kept
    stats = store.stats()
    assert (stats.offloads, stats.questions, stats.retries, stats.repeated) == (1, 1, 1, 0)
    other_device = store.record(make_ask(1, device_id="edge-2"), make_answer(ask))  # same id, other device
    assert not other_device.duplicate and other_device.row_id != first.row_id


def test_the_same_question_from_other_devices_is_counted_once(store):
    a = store.record(make_ask(1, question="Where is Paris?"), make_answer(make_ask(1)))
    b = store.record(make_ask(2, device_id="edge-2", question="  where is  PARIS "), make_answer(make_ask(2)))
    c = store.record(make_ask(3, device_id="edge-3", question="Where is Paris?", context=CONTEXTS[1]),
                     make_answer(make_ask(3, context=CONTEXTS[1]), "Amazon"))  # fmt: skip
    assert (b.question_id, b.times_asked, b.repeated_question, b.duplicate) == (a.question_id, 2, True, False)
    assert c.question_id != a.question_id and c.times_asked == 1  # another context: another question
    stats = store.stats()
    assert (stats.offloads, stats.questions, stats.contexts, stats.repeated) == (3, 2, 2, 1)
    assert stats.per_device == {"edge-1": 1, "edge-2": 1, "edge-3": 1}
    assert question_key(" Où  est-ce ?? ") == question_key("OÙ EST-CE") == "où est-ce"


def test_contexts_are_stored_once_and_can_be_referenced(store):
    ref = context_ref(CONTEXTS[1])
    assert not store.has_context(ref) and store.get_context(ref) is None
    with pytest.raises(ProtocolError) as info:
        store.record(make_ask(1, by_ref=ref), make_answer(make_ask(1), context=CONTEXTS[1]))
    assert (info.value.code, info.value.request_id) == ("unknown_context", "r1")
    assert store.stats().offloads == 0  # nothing half-written
    assert store.add_context(CONTEXTS[1]) == ref and store.has_context(ref)
    result = store.record(make_ask(1, by_ref=ref), make_answer(make_ask(1), "Amazon", context=CONTEXTS[1]))
    store.record(make_ask(2, context=CONTEXTS[1]), make_answer(make_ask(2, context=CONTEXTS[1])))
    assert store.offload(result.row_id)["context_sha256"] == ref
    assert store.stats().contexts == 1
    n_rows = store.db.conn.execute("SELECT count(*) FROM contexts").fetchone()[0]
    assert n_rows == 1


def test_record_refuses_mismatched_pairs(store):
    with pytest.raises(ValueError, match="does not answer"):
        store.record(make_ask(1), make_answer(make_ask(2)))
    with pytest.raises(TypeError):
        store.record(make_ask(1), {"text": "Paris"})


def test_stats_per_exit_layer_and_no_answer(store):
    for i, layer in enumerate([1, 1, 3, None]):
        ask = make_ask(i, exit_layer=layer)
        store.record(ask, make_answer(ask) if i else AnswerReply(ask.id, "", -2.0, True, "s", 1.0))
    stats = store.stats()
    assert stats.per_exit_layer == {None: 1, 1: 2, 3: 1} and stats.no_answer == 1


# ---------------------------------------------------------------- export


def _export_context(c: int) -> str:
    return f"Context {c}: the answer is Paris, and the other one is Lyon {c}."


def _fill_for_export(store) -> None:
    """Ten contexts, three questions each; one no-answer, one unfindable answer, one repeat."""
    for c in range(10):
        for q in range(3):
            ask = make_ask(c * 10 + q, context=_export_context(c), question=f"Question {q} about {c}?")
            if (c, q) == (0, 0):
                reply = AnswerReply(ask.id, "", -1.0, True, "server-2", 3.0)
            elif (c, q) == (0, 1):
                reply = make_answer(ask, "Marseille")  # not in the context: no SQuAD label possible
            else:
                reply = make_answer(ask, "Lyon" if q == 2 else "Paris", score=0.5 + q / 10)
            store.record(ask, reply)
    repeat = make_ask(999, device_id="edge-9", question="question 1 about 5", context=_export_context(5))
    store.record(repeat, make_answer(repeat, "Lyon", score=0.99))  # the latest label wins


def test_export_writes_loadable_squad_split_by_context(store, tmp_path):
    _fill_for_export(store)
    train_path, eval_path = tmp_path / "out" / "train.json", tmp_path / "out" / "eval.json"
    summary = store.export_squad(train_path, eval_path, eval_fraction=0.2, seed=3)
    assert (summary.train_contexts, summary.eval_contexts) == (8, 2)
    assert summary.train_questions + summary.eval_questions == 29  # 30 distinct, one unlabelled
    assert summary.skipped == {"answer not in its context": 1}
    train, dev = load_squad_file(train_path), load_squad_file(eval_path)
    assert train.version == dev.version == "2.0" and train.report.n_bad == dev.report.n_bad == 0
    assert (len(train.examples), len(dev.examples)) == (summary.train_questions, summary.eval_questions)
    train_ctx = {ex.context_id for ex in train.examples}
    eval_ctx = {ex.context_id for ex in dev.examples}
    assert len(train_ctx) == 8 and len(eval_ctx) == 2 and not train_ctx & eval_ctx
    assert not {ex.context for ex in train.examples} & {ex.context for ex in dev.examples}
    examples = {ex.question: ex for ex in train.examples + dev.examples}
    assert examples["Question 0 about 0?"].is_impossible and examples["Question 0 about 0?"].answers == ()
    lyon = examples["Question 2 about 4?"].answers[0]
    assert (lyon.text, examples["Question 2 about 4?"].context[lyon.start : lyon.start + 4]) == (
        "Lyon",
        "Lyon",
    )
    assert examples["Question 1 about 5?"].answers[0].text == "Lyon"  # the repeat's newer label
    qas = [qa for f in (train_path, eval_path) for a in json.loads(f.read_text())["data"]
           for p in a["paragraphs"] for qa in p["qas"]]  # fmt: skip
    assert all(qa["pseudo_label"] is True and isinstance(qa["server_score"], float) for qa in qas)
    assert {qa["times_asked"] for qa in qas} == {1, 2}
    # split_by_article keeps the split too: one title per context
    kept, held = split_by_article(train.examples, 0.5, seed=0)
    assert not {ex.context_id for ex in kept} & {ex.context_id for ex in held}


def test_export_split_depends_on_the_seed_and_is_stable(store, tmp_path):
    _fill_for_export(store)

    def eval_contexts(seed):
        store.export_squad(tmp_path / "t.json", tmp_path / "e.json", eval_fraction=0.3, seed=seed)
        return {ex.context_id for ex in load_squad_file(tmp_path / "e.json").examples}

    assert eval_contexts(1) == eval_contexts(1) and len(eval_contexts(1)) == 3
    assert any(eval_contexts(s) != eval_contexts(1) for s in (2, 3, 4))


def test_export_uses_the_stored_span_and_finds_the_text_without_it(store, tmp_path):
    context = "Lyon, then Lyon again, and Lyon."
    first = make_ask(1, context=context, question="Second Lyon?")
    store.record(first, make_answer(first, "Lyon", start=11, end=15))
    second = make_ask(2, context=context, question="Any Lyon?")
    store.record(second, AnswerReply("r2", "Lyon", 0.3, False, "s", 1.0))  # no span: first occurrence
    third = make_ask(3, context=context, question="Wrong span?")
    store.record(third, AnswerReply("r3", "Lyon", 0.3, False, "s", 1.0, start=25, end=29))  # nearest match
    store.export_squad(tmp_path / "t.json", tmp_path / "e.json", eval_fraction=0.0)
    starts = {ex.question: ex.answers[0].start for ex in load_squad_file(tmp_path / "t.json").examples}
    assert starts == {"Second Lyon?": 11, "Any Lyon?": 0, "Wrong span?": 27}


def test_export_v11_leaves_out_no_answer_and_empty_store_exports_empty_files(store, tmp_path):
    store.export_squad(tmp_path / "t0.json", tmp_path / "e0.json")
    assert load_squad_file(tmp_path / "t0.json").examples == []
    _fill_for_export(store)
    summary = store.export_squad(tmp_path / "t.json", tmp_path / "e.json", version="1.1")
    assert summary.skipped == {"answer not in its context": 1, "no answer (not in SQuAD 1.1)": 1}
    loaded = load_squad_file(tmp_path / "t.json")
    assert loaded.version == "1.1" and not any(ex.is_impossible for ex in loaded.examples)
    with pytest.raises(ValueError):
        store.export_squad(tmp_path / "t.json", tmp_path / "e.json", eval_fraction=1.5)


# ---------------------------------------------------------------- crashes and threads

_WRITER = """
import sys
from offload_helpers import make_answer, make_ask
from elma_utils.server.store import HardQuestionStore
store = HardQuestionStore(sys.argv[1])
for i in range(100_000):
    ask = make_ask(i, question=f"Killed question {i}?")
    result = store.record(ask, make_answer(ask))
    print(result.row_id, ask.id, flush=True)
"""


def test_acknowledged_records_survive_kill_9(tmp_path):
    path = tmp_path / "hard.db"
    acked = [line.split() for line in run_until_killed(_WRITER, [str(path)], kill_after=40)]
    assert len(acked) >= 40
    with HardQuestionStore(path) as store:
        assert store.db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for row_id, request_id in acked:
            row = store.offload(int(row_id))
            assert row is not None and row["request_id"] == request_id
        assert store.stats().offloads in (len(acked), len(acked) + 1)  # at most one unacknowledged commit
        assert not store.record(make_ask(10**6), make_answer(make_ask(10**6))).duplicate  # still writable


def test_threads_record_concurrently_without_loss_or_duplicates(store):
    n_threads, per_thread = 8, 200
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            start.wait()
            out = []
            for i in range(per_thread):
                ask = make_ask(i, device_id=f"edge-{t}", question=f"Shared question {i % 50}?")
                out.append(store.record(ask, make_answer(ask)))
                if i % 20 == 0:  # a retry now and then
                    assert store.record(ask, make_answer(ask)).duplicate
            results[t] = out
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ids = [r.row_id for out in results.values() for r in out]
    assert len(ids) == len(set(ids)) == n_threads * per_thread
    stats = store.stats()
    assert stats.offloads == n_threads * per_thread and stats.questions == 50
    assert stats.retries == n_threads * (per_thread // 20)
    assert stats.repeated == n_threads * per_thread - 50
    assert stats.per_device == {f"edge-{t}": per_thread for t in range(n_threads)}
    times = store.db.conn.execute("SELECT min(times_asked), max(times_asked) FROM questions").fetchone()
    assert times == (n_threads * per_thread // 50,) * 2
