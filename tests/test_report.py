"""REPORT.md and the README's results block: headline judged on hand-worked values, missing results
shown as such, sections built from the committed metrics, provenance of every metrics file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from elma_utils import config, reporting
from elma_utils.report import document, headline, provenance, sections

COMMITTED = config.PROJECT_ROOT / "reports"


def _row(metrics: dict, what: str) -> tuple[str, ...]:
    rows = {r[0]: r for r in headline.headline_rows(metrics)}
    return rows[what]


ADAPTIVE_V11 = "Adaptive depth + width, int8 edge, dev-v1.1"
ADAPTIVE_V20 = "Adaptive depth + width, int8 edge, dev-v2.0"


def test_every_headline_reads_not_measured_yet_without_metrics() -> None:
    for what, measured, target, anchors, met in headline.headline_rows({}):
        assert measured == met == headline.NOT_MEASURED, what
        assert target and anchors


def test_headline_judges_targets_on_hand_worked_values() -> None:
    def met(metrics: dict, what: str) -> str:
        return _row(metrics, what)[4]

    f1 = "Full model, SQuAD dev-v1.1"
    assert met({"02_finetune_full_model": {"dev_v1_1": {"scores": {"f1": 70.0}}}}, f1) == "yes"
    assert met({"02_finetune_full_model": {"dev_v1_1": {"scores": {"f1": 69.99}}}}, f1) == "**no**"

    # bench_adaptive, written by another part of the project: either key layout is read
    ok = {"bench_adaptive": {"dev_v1_1": {"speedup": 2.0, "f1_loss": 1.0}}}
    assert _row(ok, ADAPTIVE_V11)[1:] == (
        "2.00× at F1 −1.00",
        "≥ 2× at ≤ 1 F1 loss",
        _row(ok, ADAPTIVE_V11)[3],
        "yes",
    )
    lossy = {"bench_adaptive": {"dev_sets": {"dev-v2.0": {"speedup": 2.5, "f1_loss": 1.01}}}}
    assert met(lossy, ADAPTIVE_V20) == "**no**"
    assert met({"bench_adaptive": {"dev_v1_1": {"speedup": "fast"}}}, ADAPTIVE_V11) == headline.NOT_MEASURED

    share = "Share settled on the edge (edge + server system, all of dev-v1.1)"
    edge = {"05_encrypted_offload": {"end_to_end": {"share": {"edge": 0.6}, "f1_minus_full_model": -0.5}}}
    assert met(edge, share) == "yes"
    edge["05_encrypted_offload"]["end_to_end"]["share"]["edge"] = 0.599
    assert met(edge, share) == "**no**"

    wer = "Speech, held-out conditions: word error rate"
    assert _row({"06_speech_benchmark": {"heldout": {"wer": 0.15}}}, wer)[1::3] == ("WER 15.0 %", "yes")
    assert met({"06_speech_benchmark": {"heldout": {"wer": 0.151}}}, wer) == "**no**"

    growth = "Growth loop, deployment articles' unseen questions"
    rounds = [
        {"deployment": {"share_on_device": 0.60, "system_f1": 75.0}},
        {"deployment": {"share_on_device": 0.62, "system_f1": 75.0}},
        {"deployment": {"share_on_device": 0.66, "system_f1": 74.7}},
    ]
    row = _row({"07_dataset_growth_and_sync": {"rounds": rounds}}, growth)
    assert row[1] == "+6.00 points settled on the device after 2 round(s), whole-system F1 −0.30"
    assert row[4] == "yes"
    rounds[-1]["deployment"]["system_f1"] = 74.69
    assert met({"07_dataset_growth_and_sync": {"rounds": rounds}}, growth) == "**no**"
    assert met({"07_dataset_growth_and_sync": {"rounds": []}}, growth) == headline.NOT_MEASURED


def test_keys_with_dots_are_looked_up() -> None:
    m = {
        "01_squad_data": {"window_coverage": {"dev-v1.1 WordPiece": 0.98}, "datasets": {"dev-v1.1": {"n": 3}}}
    }
    assert headline.lookup(m, "01_squad_data", "window_coverage.dev-v1.1 WordPiece") == 0.98
    assert headline.lookup(m, "01_squad_data", "missing.key", "datasets.dev-v1.1.n") == 3
    assert headline.lookup(m, "nothing", "a") is None


@pytest.mark.parametrize("profile", ["smoke", "smoke-albert"])
def test_a_smoke_report_says_first_that_its_numbers_come_from_a_random_model(
    tmp_path: Path, profile: str
) -> None:
    reporting.save_metrics("02_finetune_full_model", {"dev_v1_1": {"scores": {"f1": 5.9}}}, tmp_path)
    text = reporting.write_report(tmp_path, profile=profile).read_text()
    first = text[: text.index("## Headline results")]
    assert "**Every number in this report comes from a random tiny model**" in first
    assert f"profile `{profile}`" in first
    cpu = reporting.write_report(tmp_path, profile="cpu").read_text()
    assert "random tiny model" not in cpu


def _config(speedup: float, f1_loss: float, layers: float, kept: float) -> dict:
    return {"speedup": speedup, "f1": 76.0 - f1_loss, "f1_loss": f1_loss, "avg_layers": layers,
            "kept_token_share": kept}  # fmt: skip


def test_adaptive_compute_has_its_own_section_with_the_paper_table(tmp_path: Path) -> None:
    dev = {**_config(1.31, 0.8, 5.1, 0.9), "depth_only": _config(1.15, 0.9, 5.4, 1.0),
           "oracle": {"depth_width": {"speedup": 2.6, "f1": 76.0, "avg_layers": 3.1}}}  # fmt: skip
    reporting.save_metrics(
        "bench_adaptive", {"dev_sets": {"dev-v1.1": dev, "dev-v2.0": _config(1.2, 0.5, 5.6, 0.95)}}, tmp_path
    )
    table = "| method | dev set | speed-up |\n|---|---|---|\n| Block-Skim | SQuAD | 3× (paper) |\n"
    (tmp_path / reporting.METRICS_DIR / "bench_adaptive.md").write_text(table)
    reporting.save_metrics("bench_device", {"warm_ms": {"typed_total": {"p50": 33.1}}}, tmp_path)
    device = {"speedup_edge_p50": 1.25, "speedup_end_to_end_p50": 1.1, "cpu_ratio": 1.2, "questions": 40,
              "adaptive": {"share_offloaded": 0.1}, "full": {"share_offloaded": 1.0}}  # fmt: skip
    reporting.save_metrics("bench_adaptive_device", {"adaptive_vs_full": device}, tmp_path)
    spec = sections.SECTIONS["adaptive"]

    def section() -> str:
        text = reporting.write_report(tmp_path, profile="cpu").read_text()
        body = text[text.index(f"## {spec.title}") :]
        return text, body[: body.index("\n## ", 1)]

    # measured on SQuAD passages too: that comparison is the one shown
    squad = {
        **device,
        "speedup_edge_p50": 1.4,
        "questions": 46,
        "passages": 8,
        "context_words": [69, 120, 206],
    }
    reporting.save_metrics("bench_adaptive_device", {"adaptive_vs_full": device, "adaptive_vs_full_squad": squad},
                           tmp_path)  # fmt: skip
    assert (
        "| device program, adaptive bundle against its full-compute copy (typed, p50) | edge 1.40×, CPU time "
        "1.20×, end to end 1.10× (offloaded: 10.0 % against 100.0 %); 46 questions on 8 dev-v1.1 passages of "
        "69–206 words |" in section()[1]
    )
    reporting.save_metrics("bench_adaptive_device", {"adaptive_vs_full": device}, tmp_path)
    text, body = section()
    assert "| depth + width, dev-v1.1 | 1.31× at F1 −0.80 (5.10 layers, 90.0 % of the tokens) |" in body
    assert "| depth + width, dev-v2.0 | 1.20× at F1 −0.50 (5.60 layers, 95.0 % of the tokens) |" in body
    assert (
        "| device program, adaptive bundle against its full-compute copy (typed, p50) | edge 1.25×, CPU time "
        "1.20×, end to end 1.10× (offloaded: 10.0 % against 100.0 %); 40 questions |" in body
    )
    assert (
        "| oracle bound, depth + width, dev-v1.1: at zero loss; within 1 F1 | 2.60× at F1 76.00 (3.10 layers) |"
        in body
    )
    recipes = [{"name": name, "mode": mode, "full_f1_minus_reference": delta, "calibrated": {"both": {
        "speedup_cost_model": speed, "f1_loss_vs_reference": loss}}, "oracle_vs_reference": {
        "depth_width_within_budget": {"reachable": True, "speedup_upper_bound": bound}}}
        for name, mode, delta, speed, loss, bound in (("ref", "distill", 0.0, 1.17, 1.51, 2.15),
                                                      ("joint", "joint_distill", -1.57, 1.35, 3.1, 2.29))]  # fmt: skip
    reporting.save_metrics("bench_exits_recipes", {"recipes": recipes}, tmp_path)
    dev["oracle"]["depth_width_within_budget"] = {
        "reachable": True,
        "speedup_upper_bound": 2.9,
        "speedup_achieved": 2.8,
        "f1": 75.0,
    }
    reporting.save_metrics(
        "bench_adaptive", {"dev_sets": {"dev-v1.1": dev, "dev-v2.0": _config(1.2, 0.5, 5.6, 0.95)}}, tmp_path
    )
    text, body = section()
    assert (
        "| oracle bound, depth + width, dev-v1.1: at zero loss; within 1 F1 | 2.60× at F1 76.00 (3.10 layers); "
        "≤ 2.90× (an assignment reaching 2.80× at F1 75.00) |" in body
    )
    assert (
        "distill (ref): full depth +0.00, depth + width 1.17× at −1.51, bound ≤ 2.15×; joint_distill (joint): "
        "full depth −1.57, depth + width 1.35× at −3.10, bound ≤ 2.29× |" in body
    )
    assert sections.group_key("bench_exits_recipes") == "adaptive"
    assert "| Block-Skim | SQuAD | 3× (paper) |" in body and "(metrics/bench_adaptive.md)" in body
    assert (
        "bench_device" not in body and "## Benchmarks outside the notebooks" in text
    )  # the others stay apart
    assert text.index(f"## {spec.title}") < text.index("## Benchmarks outside the notebooks")
    assert sections.group_key("bench_skim_diagnosis") == sections.group_key("bench_adaptive") == "adaptive"
    assert (
        sections.group_key("bench_adaptive_dev-v1.1") == "adaptive"
        and sections.group_key("bench_device") == "bench"
    )


@pytest.mark.skipif(not (COMMITTED / "metrics").is_dir(), reason="no committed reports/metrics")
def test_the_report_of_the_committed_results_reads_as_intended() -> None:
    text = document.build_report(COMMITTED, "cpu")
    assert text.index("## Headline results") < text.index("## 00 · Environment") < text.index("## Appendix A")
    assert "| packages.tensorflow |" in text[text.index("## Appendix A") :]
    assert "| packages.tensorflow |" not in text[: text.index("## Appendix A")]
    for spec in sections.SECTIONS.values():
        if not any((COMMITTED / "metrics" / f"{n.source}.json").is_file() for n in spec.numbers):
            continue
        body = text[text.index(f"## {spec.title}") :]
        body = body[: body.index("\n## ", 1)]
        assert spec.meaning in body
        table = body[body.index("| number | value |") :].split("\n\n")[0].splitlines()
        numbers = [ln for ln in table if ln.startswith("| ") and not ln.startswith("| number")]
        assert 3 <= len(numbers) <= 5, spec.title
    figures = sorted((COMMITTED / "figures").glob("*.png"))
    assert figures
    lines = text.splitlines()
    for fig in figures:
        link = f"(figures/{fig.name})"
        assert text.count(link) == 1, fig.name
        at = next(i for i, ln in enumerate(lines) if link in ln)
        assert lines[at + 2].startswith("_") and lines[at + 2].endswith("_"), f"{fig.name} has no caption"
    assert "best_f1_at_2x_modelled.index" not in text  # no key dumps for the project's own notebooks


# ---------------------------------------------------------------- the README's results block


@pytest.mark.skipif(not (COMMITTED / "metrics").is_dir(), reason="no committed reports/metrics")
def test_the_readme_results_block_is_what_the_committed_metrics_give() -> None:
    readme = (config.PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    block = headline.readme_block(reporting.load_all_metrics(COMMITTED))
    assert block in readme, (
        "README.md's results block differs from reports/metrics: run `python -m elma_utils.report` "
        "(numbers in it are generated, not typed)"
    )
    assert headline.headline_table(reporting.load_all_metrics(COMMITTED))[2] in block  # same code as REPORT


def test_a_hand_edit_of_the_readme_block_is_caught_and_regenerating_fixes_it(tmp_path: Path) -> None:
    reporting.save_metrics("02_finetune_full_model", {"dev_v1_1": {"scores": {"f1": 75.79}}}, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{headline.README_BEGIN}\nold\n{headline.README_END}\n\nafter\n")
    assert reporting.update_readme(tmp_path, readme) is True
    text = readme.read_text()
    assert "| Full model, SQuAD dev-v1.1 | F1 75.79 |" in text and text.endswith("\n\nafter\n")
    assert reporting.update_readme(tmp_path, readme) is False  # idempotent
    edited = text.replace("F1 75.79", "F1 79.75")
    block = headline.readme_block(reporting.load_all_metrics(tmp_path))
    assert headline.replace_readme_block(edited, block) != edited
    with pytest.raises(ValueError, match="no results block"):
        headline.replace_readme_block("# no markers\n", block)


def test_report_check_command_passes_on_the_committed_readme() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "elma_utils.report", "--check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- provenance


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_provenance_names_the_commit_and_a_changed_work_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "reports" / "r.json").write_text("{}")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout
    p = provenance.provenance(root=repo)
    assert (p["commit"], p["dirty"]) == (head.strip(), False)
    (repo / "reports" / "r.json").write_text('{"new": 1}')  # a run rewriting reports/ is not a change
    assert provenance.provenance(root=repo)["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.provenance(root=repo)["dirty"] is True
    assert provenance.provenance(root=tmp_path / "not-a-repo")["commit"] is None


def test_provenance_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(provenance.COMMAND_ENV, raising=False)
    root = config.PROJECT_ROOT
    monkeypatch.setattr(sys, "argv", [str(root / "elma_utils" / "bench" / "harness.py"), "--out", "x"])
    assert provenance.command_line() == "python -m elma_utils.bench.harness --out x"
    monkeypatch.setattr(sys, "argv", [str(root / ".venv" / "bin" / "elma"), "bench", str(root / "artifacts")])
    assert provenance.command_line() == ".venv/bin/elma bench artifacts"
    monkeypatch.setattr(sys, "argv", ["/x/site-packages/ipykernel_launcher.py", "-f", "/tmp/k.json"])
    monkeypatch.setenv("ELMA_PROFILE", "smoke")
    assert provenance.command_line("03_early_exit") == (
        "notebooks/03_early_exit.ipynb in a Jupyter kernel (ELMA_PROFILE=smoke)"
    )
    monkeypatch.setenv(provenance.COMMAND_ENV, "elma pipeline --profile cpu --only 03")
    assert provenance.command_line("03_early_exit") == "elma pipeline --profile cpu --only 03"


def test_every_metrics_file_written_by_save_metrics_records_its_provenance(tmp_path: Path) -> None:
    path = reporting.save_metrics("01_x", {"a": 1}, tmp_path)
    produced = json.loads(path.read_text())["produced_by"]
    assert set(produced) == {"commit", "dirty", "command"}
    assert produced["command"].startswith("python -m pytest")
