"""What one round of the growth experiment changed, measured on questions the device never asked.

The measuring questions are answered offline by the same edge runtime the device runs
(``publish.evaluate_bundle``) with the server's full-model answers computed once
(``publish.server_answers_for``): sent through the device they would be offloaded and
*stored*, and the next round would train on the questions that measure it.

Per group (``deployment``: the later questions of the deployment articles, ``other``: other
articles), in percent and layers:

- ``share_on_device``: questions the edge settles (the rest are offloaded);
- ``avg_layers``: layers the edge computes per question;
- ``device_f1``: the edge's answer to every question (unsettled ones: its last layer's);
- ``settled_f1``: the edge's answers to the questions it settles;
- ``system_f1``: what the user gets, the edge's answer where it settles, the server's where it
  offloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from elma_utils.server.publish import EvalSet, evaluate_bundle, server_answers_for

GROUPS = ("deployment", "other")
MEASURES = (
    "questions",
    "share_on_device",
    "avg_layers",
    "device_f1",
    "settled_f1",
    "system_f1",
    "system_exact",
)


def measure_sets(
    groups: Mapping[str, Sequence], full_model_dir: str | Path, cache_dir: str | Path | None = None
) -> list[EvalSet]:
    """One ``EvalSet`` per group (SQuAD v1.1 examples) with the server's answers."""
    from elma_utils.squad.data import examples_to_squad_json

    return [
        EvalSet(
            name,
            list(ex),
            examples_to_squad_json(ex),
            "1.1",
            server_answers_for(full_model_dir, ex, cache_dir),
        )
        for name, ex in groups.items()
    ]


def measure(bundle: str | Path, sets: Sequence[EvalSet]) -> dict[str, dict[str, Any]]:
    """group -> the measures of the module note for ``bundle`` with its own exit policy."""
    result = evaluate_bundle(bundle, sets)
    out = {}
    for name, s in result["sets"].items():
        out[name] = {
            "questions": s["questions"],
            "share_on_device": s["share_solved"],
            "avg_layers": s["avg_exit_layer"],
            "device_f1": s["f1"],
            "settled_f1": s["settled_f1"],
            "system_f1": s.get("system_f1"),
            "system_exact": s.get("system_exact"),
        }
    out["model_version"] = result["model_version"]
    return out


def change(now: Mapping[str, Any], start: Mapping[str, Any]) -> dict[str, float]:
    """``now`` minus ``start`` for the numbers of one group."""
    return {
        k: float(now[k]) - float(start[k])
        for k in ("share_on_device", "avg_layers", "device_f1", "system_f1")
        if now.get(k) is not None and start.get(k) is not None
    }


def targets_met(
    first: Mapping[str, Any],
    last: Mapping[str, Any],
    *,
    min_share_gain: float = 5.0,
    max_system_f1_loss: float = 0.3,
    forgetting_tolerance: float = 0.5,
) -> dict[str, Any]:
    """The issue's targets, judged between the round-0 and the final measures: on the deployment
    articles' later questions ≥ ``min_share_gain`` points more settled on the device with
    whole-system F1 no lower (within ``max_system_f1_loss``), and on other articles no more than
    ``forgetting_tolerance`` F1 lost (whole-system and device F1)."""
    dep, oth = change(last["deployment"], first["deployment"]), change(last["other"], first["other"])
    checks = {
        "share_gain": dep["share_on_device"] >= min_share_gain - 1e-9,
        "system_f1_kept": dep["system_f1"] >= -max_system_f1_loss - 1e-9,
        "no_forgetting": min(oth["system_f1"], oth["device_f1"]) >= -forgetting_tolerance - 1e-9,
    }
    return {
        "deployment_change": dep,
        "other_change": oth,
        "min_share_gain": min_share_gain,
        "max_system_f1_loss": max_system_f1_loss,
        "forgetting_tolerance": forgetting_tolerance,
        "checks": checks,
        "all_met": all(checks.values()),
    }
