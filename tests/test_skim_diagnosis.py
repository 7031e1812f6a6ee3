"""``bench.skim_diagnosis``: the answer's blocks found by hand, and the command on a tiny
exits artifact — the oracle rule keeps at least the head's tokens, the random rule drops no
more than the head does, and the numbers are consistent with each other."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qa_fixtures import save_tiny_exits

from elma_utils.bench import skim_diagnosis as sd
from elma_utils.early_exit.skim import SkimHead


def test_answer_blocks_are_the_blocks_of_the_best_start_and_end():
    offsets = np.array([-1, -1, -1] + list(range(10)) + [-1])  # [CLS] q q | 10 context | [SEP]
    ctx, blocks = sd.context_blocks(offsets, length=14, block=4)
    assert ctx.tolist() == list(range(3, 13)) and blocks.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    start = np.zeros(14)
    end = np.zeros(14)
    start[4], end[8] = 5.0, 5.0  # start in block 0, end in block 1
    assert sd.answer_blocks(ctx, blocks, start, end) == {0, 1}
    start[4], start[0] = 0.0, 9.0  # best start is [CLS]: not a context block
    assert sd.answer_blocks(ctx, blocks, start, end) == {1}


def test_the_rules_keep_what_they_promise():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(14, 4)).astype(np.float32)
    offsets = np.array([-1, -1, -1] + list(range(10)) + [-1])
    head = SkimHead(np.ones(4, np.float32), 0.0, layer=1, block=4, tau=0.99)  # keeps only the best block
    rules = sd.keep_rules(head)
    start, end = np.zeros(14), np.zeros(14)
    start[11], end[12] = 5.0, 5.0  # the answer lies in block 2
    by_head = rules["head"](hidden, offsets, 14, start, end, rng)
    oracle = rules["head_and_answer"](hidden, offsets, 14, start, end, rng)
    assert set(by_head) <= set(oracle) and {11, 12} <= set(oracle)
    assert {0, 1, 2, 13} <= set(by_head)  # [CLS], question and [SEP] always go on
    randomly = rules["random"](hidden, offsets, 14, start, end, rng)
    assert {11, 12} <= set(randomly) and len(randomly) >= len(by_head)


def test_the_command_on_a_tiny_model(minilm_tokenizer, tmp_path, capsys):
    exits = save_tiny_exits(tmp_path / "models", minilm_tokenizer)
    out = tmp_path / "reports"
    with pytest.raises(SystemExit):
        sd.main(["--exits", str(exits), "--layers", "1", "--out-dir", str(out)])
    assert "no skim head for layer(s) [1]" in capsys.readouterr().err
    head = SkimHead(np.random.default_rng(1).normal(size=64).astype(np.float32), 0.0, layer=1, block=8)
    head.save(exits / "adaptive" / "L1" / "skim.npz")
    assert sd.main(["--exits", str(exits), "--layers", "1", "--taus", "0.3,0.7", "--questions", "12",
                    "--out-dir", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "metrics" / f"{sd.METRICS}.json").read_text())
    produced = result["produced_by"]
    assert produced["command"].startswith("python -m elma_utils.bench.skim_diagnosis --exits")
    assert "commit" in produced and result["questions"] >= 12 and 0 <= result["full_f1"] <= 100
    runs = result["layers"]["1"]
    assert set(runs) == {"0.3", "0.7"}
    for rules in runs.values():
        assert set(rules) == set(sd.RULES)
        for v in rules.values():
            assert v["f1_loss"] == pytest.approx(result["full_f1"] - v["f1"])
            assert 0 <= v["same_answer_as_full"] <= 1 and 0 < v["kept_share"] <= 1
        assert rules["head_and_answer"]["kept_share"] >= rules["head"]["kept_share"]
        assert rules["random"]["kept_share"] >= rules["head"]["kept_share"]
    assert runs["0.7"]["head"]["kept_share"] <= runs["0.3"]["head"]["kept_share"]
    assert (out / "figures" / f"{sd.FIGURE}.png").stat().st_size > 1000
    [finding] = result["findings"]
    assert finding.startswith("Skim after layer 1, tau ") and "loses" in finding
    assert "layer 1 tau 0.3: head F1" in capsys.readouterr().out
