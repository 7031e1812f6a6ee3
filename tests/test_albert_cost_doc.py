"""The ALBERT cost blocks of docs/ALBERT.md and the README come from the committed record."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from elma_utils.bench import albert_cost_doc as doc

ROOT = Path(__file__).resolve().parents[1]


def _record() -> dict:
    return json.loads((ROOT / doc.METRICS).read_text(encoding="utf-8"))


def test_committed_blocks_match_the_committed_record():
    for path, text in doc.rendered(ROOT).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: run python -m elma_utils.bench.albert_cost_doc"
        )


def test_blocks_follow_the_numbers():
    record = copy.deepcopy(_record())
    seq = next(iter(record["ratio_albert_to_minilm"]))
    record["albert_base_int8"]["bundle_bytes"] = 98_700_000
    record["albert_base_int8"]["per_seq_len"][seq]["all_layers_ms"] = 1234.0
    for r in record["ratio_albert_to_minilm"].values():
        r["all_layers_ms"] = 9.87
    readme = doc.readme_block(record)
    assert "**98.7 MB**" in readme
    assert "**9.9× MiniLM-L6's time**" in readme
    assert "1234 ms against" in readme
    table = doc.doc_block(record)
    assert "| whole bundle | 98.7 MB |" in table
    assert "9.9×" in table and "1234 (" in table
    assert table.startswith(doc.DOC_MARKERS[0]) and table.endswith(doc.DOC_MARKERS[1])


def test_check_fails_on_a_stale_copy_and_write_mends_it(tmp_path, capsys):
    for rel in (doc.METRICS, doc.DOC, doc.README):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    record = _record()
    record["minilm_l6_int8"]["bundle_bytes"] = 55_500_000
    (tmp_path / doc.METRICS).write_text(json.dumps(record), encoding="utf-8")
    assert doc.main(["--check", "--root", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().out
    assert doc.main(["--root", str(tmp_path)]) == 0
    assert "MiniLM-L6's 55.5 MB" in (tmp_path / doc.README).read_text(encoding="utf-8")
    assert doc.main(["--check", "--root", str(tmp_path)]) == 0


def test_missing_markers_say_what_to_add(tmp_path):
    with pytest.raises(ValueError, match="albert-summary:begin"):
        doc.splice("no block here", doc.README_MARKERS, "x", "README.md")


def test_missing_record_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        doc.main(["--root", str(tmp_path)])
    assert e.value.code == 2
    assert "run `python -m elma_utils.bench.albert_cost` first" in capsys.readouterr().err
