"""Metrics files, figures and the generated REPORT.md."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from elma_utils import reporting
from elma_utils.reporting import (
    flatten,
    format_number,
    load_all_metrics,
    save_figure,
    save_metrics,
    write_report,
)


def test_save_metrics_converts_numpy_sorts_keys_and_leaves_no_temp_files(tmp_path: Path) -> None:
    metrics = {
        "f1": np.float64(88.5),
        "em": np.float32(81.234567),
        "n": np.int64(10570),
        "ok": np.bool_(True),
        "per_layer": np.array([0.5, 0.25]),
        "shape": (2, 3),
        "path": Path("/x/y"),
        "bad": float("nan"),
        "nested": {"b": 1, "a": {3: np.float16(0.5)}},
    }
    path = save_metrics("02_finetune_full_model.ipynb", metrics, reports_dir=tmp_path)
    assert path == tmp_path / "metrics" / "02_finetune_full_model.json"
    text = path.read_text()
    data = json.loads(text)
    assert set(data.pop("produced_by")) == {"commit", "dirty", "command"}
    assert data == {
        "bad": None,
        "em": 81.234566,  # float32 shortest repr, not 81.23456573486328
        "f1": 88.5,
        "n": 10570,
        "nested": {"a": {"3": 0.5}, "b": 1},
        "ok": True,
        "path": "/x/y",
        "per_layer": [0.5, 0.25],
        "shape": [2, 3],
    }
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert "NaN" not in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["02_finetune_full_model.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644

    # overwriting replaces the whole file
    save_metrics("02_finetune_full_model", {"f1": 1.0, "produced_by": {"command": "x"}}, reports_dir=tmp_path)
    assert json.loads(path.read_text()) == {"f1": 1.0, "produced_by": {"command": "x"}}  # its own kept


def test_paths_inside_the_project_are_stored_relative_to_it(tmp_path: Path) -> None:
    from elma_utils.config import PROJECT_ROOT

    inside = PROJECT_ROOT / "reports" / "predictions" / "end-to-end-predictions-dev-v1.1.json"
    path = save_metrics(
        "05_demo",
        {"files": {"predictions": str(inside), "bundle": inside.parent}, "elsewhere": ["/usr/bin/ssh"]},
        tmp_path,
    )
    stored = json.loads(path.read_text())
    assert stored["files"] == {
        "predictions": "reports/predictions/end-to-end-predictions-dev-v1.1.json",
        "bundle": "reports/predictions",
    }
    assert stored["elsewhere"] == ["/usr/bin/ssh"]  # outside the project: left as it is


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x y"])
def test_bad_notebook_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad notebook"):
        save_metrics(name, {"a": 1}, reports_dir=tmp_path)


def test_unstorable_values_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot store a object"):
        save_metrics("01_x", {"a": object()}, reports_dir=tmp_path)
    with pytest.raises(TypeError, match="must be a dict"):
        save_metrics("01_x", [1, 2], reports_dir=tmp_path)  # type: ignore[arg-type]
    assert not (tmp_path / "metrics" / "01_x.json").exists()


def test_reports_dir_defaults_to_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELMA_REPORTS_DIR", str(tmp_path / "r"))
    path = save_metrics("01_x", {"a": 1})
    assert path == tmp_path / "r" / "metrics" / "01_x.json"
    assert load_all_metrics()["01_x"]["a"] == 1


def test_load_all_metrics_orders_by_number_and_names_a_corrupt_file(tmp_path: Path) -> None:
    for name in ["10_late", "02_b", "01_a"]:
        save_metrics(name, {"name": name}, reports_dir=tmp_path)
    assert list(load_all_metrics(tmp_path)) == ["01_a", "02_b", "10_late"]
    assert load_all_metrics(tmp_path / "nothing-here") == {}
    (tmp_path / "metrics" / "03_bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="03_bad.json is not valid json"):
        load_all_metrics(tmp_path)


def test_save_figure_png_at_dpi_110(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, "03_loss.png", reports_dir=tmp_path)
    plt.close(fig)
    assert path == tmp_path / "figures" / "03_loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["03_loss.png"]
    with pytest.raises(ValueError, match="bad figure name"):
        save_figure(fig, "../x", reports_dir=tmp_path)


def test_flatten_and_number_format() -> None:
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    assert format_number(88.91234) == "88.91"
    assert format_number(0.333333) == "0.3333"
    assert format_number(12345.678) == "12346"
    assert format_number(1.5e-7) == "1.50e-07"
    assert format_number(0.0) == "0"
    assert reporting.format_value(None) == "–"
    assert reporting.format_value(True) == "yes"
    assert reporting.format_value([1, 2]) is None
    assert reporting.format_value("x" * 200) is None


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")


def test_write_report_sections_tables_figures_and_predictions(tmp_path: Path) -> None:
    """Notebooks the report has no section spec for (a new one, a test's) get a plain table."""
    save_metrics(
        "02_train_demo",
        {"squad_v1.1": {"em": 71.2345, "f1": 80.98765}, "train_examples": 38000, "curve": [1, 2, 3]},
        reports_dir=tmp_path,
    )
    save_metrics("00_environment", {"python": "3.11.7", "cores": 2}, reports_dir=tmp_path)
    (tmp_path / "metrics" / "05_broken.json").write_text("[1, 2]")
    _png(tmp_path / "figures" / "02_training_loss.png")
    _png(tmp_path / "figures" / "00_versions.png")
    _png(tmp_path / "figures" / "20_unrelated.png")
    _png(tmp_path / "figures" / "zz_orphan.png")
    (tmp_path / "predictions" / "v1.1").mkdir(parents=True)
    (tmp_path / "predictions" / "v1.1" / "dev.json").write_text("{}" * 1000)

    path = write_report(tmp_path, profile="cpu")
    assert path == tmp_path / "REPORT.md"
    text = path.read_text()
    lines = text.splitlines()

    assert lines[0] == "# ELMA report"
    assert "- profile: `cpu`" in lines
    machine = next(line for line in lines if line.startswith("- machine:"))
    assert "CPU cores" in machine and "GiB RAM" in machine
    assert any(line.startswith("- date: ") and line.endswith("Z") for line in lines)
    assert "random tiny model" not in text  # only smoke reports say so

    # the headline table first, then one section per notebook, in notebook order, then appendices
    order = [
        text.index(h)
        for h in (
            "## Headline results",
            "## 00 · Environment",
            "## 02_train_demo",
            "## 05_broken",
            "## Appendix A",
        )
    ]
    assert order == sorted(order)
    assert "| squad_v1.1.em | 71.23 |" in lines
    assert "| squad_v1.1.f1 | 80.99 |" in lines
    assert "| train_examples | 38000 |" in lines
    assert "produced_by" not in text[: text.index("## Appendix")]  # provenance has its own appendix
    assert "| python | 3.11.7 |" in text[text.index("## Appendix A · Environment") :].splitlines()
    assert "1 list or long text value(s) not shown" in text
    assert "holds a list, not a json object" in text

    # figures by number prefix, relative links, once each, in the right section; others at the end
    section_02 = text[text.index("## 02_train_demo") : text.index("## 05_broken")]
    assert "![02_training_loss](figures/02_training_loss.png)" in section_02
    assert "_Training loss._" in section_02  # a caption, made from the name when none is written
    assert "20_unrelated" not in section_02
    assert "![00_versions](figures/00_versions.png)" in text[: text.index("## 02_train_demo")]
    others = text[text.index("## Other figures") :]
    assert "figures/zz_orphan.png" in others and "figures/20_unrelated.png" in others
    for fig in ("02_training_loss", "00_versions", "20_unrelated", "zz_orphan"):
        assert text.count(f"(figures/{fig}.png)") == 1

    assert "[`predictions/v1.1/dev.json`](predictions/v1.1/dev.json) (2.0 KiB)" in text
    provenance = text[text.index("## Appendix B") :]
    assert "| [`02_train_demo.json`](metrics/02_train_demo.json) | `" in provenance

    # regenerating replaces it (no duplicate sections)
    write_report(tmp_path, profile="cpu")
    assert (tmp_path / "REPORT.md").read_text().count("## 02_train_demo") == 1


def test_write_report_without_metrics(tmp_path: Path) -> None:
    text = write_report(tmp_path / "fresh").read_text()
    assert "No metrics yet" in text
    assert "- profile: `not given`" in text
    assert "## Appendix C · Prediction files\n\n_None._" in text


def test_earlier_metrics_names_the_notebook_to_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run notebooks/03_early_exit\.ipynb first"):
        reporting.earlier_metrics("03_early_exit", tmp_path)
    reporting.save_metrics("03_early_exit", {"best_mode": "distill", "E_T": 0.5}, tmp_path)
    earlier = reporting.earlier_metrics("03_early_exit", tmp_path)
    assert (earlier["best_mode"], earlier["E_T"]) == ("distill", 0.5)
    with pytest.raises(ValueError, match="bad notebook"):
        reporting.earlier_metrics("../secrets", tmp_path)


def test_findings_are_written_as_sentences_above_the_table(tmp_path: Path) -> None:
    save_metrics(
        "04_device_benchmark",
        {"findings": ["int8: edge time x0.89.", "Prior numbers: 16 % less energy."], "e_t": 0.61},
        reports_dir=tmp_path,
    )
    save_metrics("09_new_notebook", {"findings": ["a sentence."], "e_t": 0.61}, reports_dir=tmp_path)
    text = write_report(tmp_path).read_text()
    section = text[text.index("## 04 · Edge export and device benchmark") : text.index("## 09_new_notebook")]
    assert "- int8: edge time x0.89." in section and "- Prior numbers: 16 % less energy." in section
    new_one = text[text.index("## 09_new_notebook") :]
    assert new_one.index("- a sentence.") < new_one.index("| e_t | 0.61 |")
