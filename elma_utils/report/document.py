"""REPORT.md: what a person reads after a run.

Order: a line that says a report's numbers come from a random tiny model (profiles with random
weights only), the headline table (``headline``), one section per notebook (``sections``), figures no
section claims, then the appendices: the environment (package versions, machine), where each
metrics file came from (commit, command), and the prediction files.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from elma_utils import config, reporting
from elma_utils.report import headline, provenance, sections

MAX_TABLE_ROWS = 80  # a notebook without a section spec: its first scalar values, the rest in the json
ENVIRONMENT_SOURCE = "00_environment"
ENVIRONMENT_PARTS = ("machine", "packages", "interpreters", "apt", "ready")  # the rest stays in the json


def is_random_model_profile(profile: str | None) -> bool:
    """True for profiles whose model is random and tiny (``Profile.random_weights``: smoke,
    smoke-albert); False for a name that is no profile."""
    known = config.PROFILES.get(profile) if profile else None
    return known is not None and known.random_weights


def build_report(root: Path, profile: str | None) -> str:
    files = reporting._metrics_files(root)
    metrics: dict[str, dict] = {}
    unreadable: dict[str, str] = {}
    for path in files:
        try:
            metrics[path.stem] = reporting.load_metrics(path)
        except (OSError, ValueError) as exc:
            unreadable[path.stem] = str(exc)

    lines = _header(profile)
    if not files:
        lines += ["", "_No metrics yet: run the pipeline (`elma pipeline`) or the notebooks._"]
    else:
        lines += ["", "## Headline results", "", *headline.headline_table(metrics)]

    groups: dict[str, list[str]] = {}
    for path in files:
        groups.setdefault(sections.group_key(path.stem), []).append(path.stem)
    figures = reporting._all_figures(root)
    shown: set[Path] = set()
    for key in sorted(groups, key=lambda k: (k == "bench", k == "", k)):
        stems = groups[key]
        spec = sections.SECTIONS.get(key) if _spec_applies(key, stems) else None
        own = [f for f in figures if key and sections.group_key(f.stem) == key]
        shown.update(own)
        for stem in stems if spec is None else [stems[0]]:
            lines += _section(root, key, stem, spec, metrics, unreadable, stems, own)

    others = [f for f in figures if f not in shown]
    if others:
        lines += ["", "## Other figures", *sections.figure_lines(others, root, None)]
    lines += _appendices(root, metrics)
    return "\n".join(lines).rstrip() + "\n"


def _spec_applies(key: str, stems: list[str]) -> bool:
    """A section spec describes ELMA's own notebooks: use it only when one of its files is there."""
    spec = sections.SECTIONS.get(key)
    return spec is not None and any(n.source in stems for n in spec.numbers)


def _section(
    root: Path,
    key: str,
    stem: str,
    spec: sections.SectionSpec | None,
    metrics: Mapping[str, Mapping[str, Any]],
    unreadable: Mapping[str, str],
    stems: list[str],
    figures: list[Path],
) -> list[str]:
    lines = ["", f"## {spec.title if spec else stem}", ""]
    if spec is not None:
        lines += [spec.meaning, "", *sections.numbers_table(spec, metrics)]
        sources = ", ".join(f"[`metrics/{s}.json`](metrics/{s}.json)" for s in stems)
        lines += ["", f"All numbers: {sources}."]
        for s in stems:
            if s in unreadable:
                lines += ["", f"_Could not read `metrics/{s}.json`: {unreadable[s]}_"]
        for s in stems:
            lines += _findings(metrics.get(s, {}))
        lines += _tables(root, spec, stems)
        return lines + sections.figure_lines(figures, root, spec)
    if stem in unreadable:
        lines += [f"_Could not read `metrics/{stem}.json`: {unreadable[stem]}_"]
    else:
        data = metrics[stem]
        lines += _findings(data, trailing_blank=True)
        lines += _metrics_table(data, f"metrics/{stem}.json")
    if stem == stems[-1]:
        lines += sections.figure_lines(figures, root, None)
    return lines


def _tables(root: Path, spec: sections.SectionSpec, stems: list[str]) -> list[str]:
    """The markdown tables a benchmark wrote beside its json (only beside a json that is there)."""
    lines: list[str] = []
    for name in spec.tables:
        path = root / reporting.METRICS_DIR / f"{name}.md"
        if name in stems and path.is_file():
            lines += [
                "",
                path.read_text(encoding="utf-8").rstrip(),
                "",
                f"_Table: [`metrics/{name}.md`](metrics/{name}.md)._",
            ]
    return lines


def _findings(data: Mapping[str, Any], trailing_blank: bool = False) -> list[str]:
    findings = data.get("findings")
    if not (isinstance(findings, list) and findings):  # sentences a notebook or benchmark concluded
        return []
    lines = [f"- {reporting._md_cell(str(t))}" for t in findings]
    return lines + [""] if trailing_blank else [""] + lines


def _metrics_table(metrics: Mapping[str, Any], source: str) -> list[str]:
    rows, left_out = [], 0
    shown = {k: v for k, v in metrics.items() if k not in (provenance.KEY, "findings")}
    for key, value in reporting.flatten(shown).items():
        text = reporting.format_value(value)
        if text is None:
            left_out += 1
        else:
            rows.append(f"| {reporting._md_cell(key)} | {reporting._md_cell(text)} |")
    hidden = max(0, len(rows) - MAX_TABLE_ROWS)
    rows = rows[:MAX_TABLE_ROWS]
    lines = ["| metric | value |", "|---|---|", *rows] if rows else ["_No scalar metrics._"]
    if hidden:
        lines += ["", f"_{hidden} more value(s) not shown; see `{source}`._"]
    if left_out:
        lines += ["", f"_{left_out} list or long text value(s) not shown; see `{source}`._"]
    return lines


def _header(profile: str | None) -> list[str]:
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
    lines = ["# ELMA report", ""]
    if is_random_model_profile(profile):
        lines += [
            f"> **Every number in this report comes from a random tiny model** (profile `{profile}`): it "
            "shows that the code runs end to end, not how well ELMA answers. The real results are in "
            "`reports/REPORT.md` (profile `cpu`).",
            "",
        ]
    lines += [
        "Generated by `elma_utils.reporting.write_report` from `metrics/*.json`, `figures/` and "
        "`predictions/`; do not edit by hand.",
        "",
        f"- profile: `{profile or 'not given'}`",
        f"- date: {now.isoformat().replace('+00:00', 'Z')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, {reporting._ram_text()} RAM, "
        f"Python {platform.python_version()}",
    ]
    head = provenance.provenance()
    if head["commit"]:
        dirty = " (the work tree differs from it)" if head["dirty"] else ""
        lines.append(f"- commit when the report was written: `{head['commit'][:10]}`{dirty}")
    return lines


def _appendices(root: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["", "## Appendix A · Environment", ""]
    env = metrics.get(ENVIRONMENT_SOURCE)
    if env:
        shown = {k: v for k, v in env.items() if k in ENVIRONMENT_PARTS} or env
        lines += _metrics_table(shown, f"metrics/{ENVIRONMENT_SOURCE}.json")
    else:
        lines += [f"_Not recorded: run notebooks/{ENVIRONMENT_SOURCE}.ipynb._"]
    lines += ["", "## Appendix B · Where each metrics file came from", ""]
    if metrics:
        lines += ["| file | commit | command |", "|---|---|---|"]
        for stem, data in metrics.items():
            p = data.get(provenance.KEY) if isinstance(data.get(provenance.KEY), Mapping) else {}
            commit = f"`{str(p['commit'])[:10]}`" if p.get("commit") else "not recorded"
            if p.get("dirty"):
                commit += " + changes"
            command = f"`{reporting._md_cell(str(p['command']))}`" if p.get("command") else "not recorded"
            lines.append(f"| [`{stem}.json`](metrics/{stem}.json) | {commit} | {command} |")
    else:
        lines += ["_None._"]
    lines += ["", "## Appendix C · Prediction files", ""]
    lines += reporting._prediction_lines(root)
    return lines
