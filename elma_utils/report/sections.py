"""One REPORT.md section per notebook: 3–5 headline numbers, a sentence on what they mean, its
figures once each with a caption.

A section gathers the metrics files and figures whose names start with the notebook's number
(``04_edge_export_and_benchmark.json`` and ``04_device_benchmark.json`` are both notebook 04's);
files named ``bench_adaptive*`` / ``bench_skim*`` form the adaptive-compute section and the
other ``bench_*`` files the benchmarks section. A notebook without a :class:`SectionSpec`
(a new notebook, a test's throwaway one) gets a plain table of its scalar values instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from elma_utils.report.headline import NOT_MEASURED, Metrics, lookup


@dataclasses.dataclass(frozen=True)
class Number:
    """A headline number: label, metrics file, dotted key(s) tried in order, how to write it."""

    label: str
    source: str
    paths: tuple[str, ...]
    fmt: Callable[[Any], str] = str

    def text(self, metrics: Metrics) -> str:
        value = lookup(metrics, self.source, *self.paths)
        if value is None:
            return NOT_MEASURED
        try:
            return self.fmt(value)
        except (TypeError, ValueError):
            return str(value)


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    title: str
    meaning: str
    numbers: tuple[Number, ...]
    captions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tables: tuple[str, ...] = ()  # metrics/<name>.md written beside a benchmark's json, shown as they are


def _f1(v: Any) -> str:
    return f"{float(v):.2f}"


def _pct(v: Any) -> str:
    return f"{float(v) * 100:.1f} %"


def _signed_f1(v: Any) -> str:
    return f"{float(v):+.2f}".replace("-", "−")


def _ms(v: Any) -> str:
    return f"{float(v):.1f} ms"


def _x(v: Any) -> str:
    return f"{float(v):.2f}×"


def _count(v: Any) -> str:
    return f"{int(v):,}"


def _mb(v: Any) -> str:
    return f"{float(v) / 1e6:.1f} MB"


def _minutes(v: Any) -> str:
    return f"{float(v) / 60:.1f} min"


def _points(v: Any) -> str:
    return f"{float(v):+.1f} points".replace("-", "−")


def _speed_at_loss(m: Mapping[str, Any]) -> str:
    """A measured configuration: speed-up, F1 loss, average layers, kept tokens."""
    text = f"{float(m['speedup']):.2f}× at F1 {_signed_f1(-float(m['f1_loss']))}"
    return text + f" ({float(m['avg_layers']):.2f} layers, {_pct(m['kept_token_share'])} of the tokens)"


def _device_effect(c: Mapping[str, Any]) -> str:
    """Edge and CPU time, then end to end, which also counts the offloads each setting sends."""
    text = f"edge {_x(c['speedup_edge_p50'])}, CPU time {_x(c['cpu_ratio'])}, end to end {_x(c['speedup_end_to_end_p50'])}"
    shares = [c.get(k, {}).get("share_offloaded") for k in ("adaptive", "full")]
    if all(isinstance(v, (int, float)) for v in shares):
        text += f" (offloaded: {_pct(shares[0])} against {_pct(shares[1])})"
    where = f" on {int(c['passages'])} dev-v1.1 passages of {min(c['context_words'])}–{max(c['context_words'])} words" if (
        c.get("passages", 1) > 1) else ""  # fmt: skip
    return text + f"; {int(c['questions'])} questions{where}"


def _oracle(o: Mapping[str, Any]) -> str:
    return f"{float(o['speedup']):.2f}× at F1 {_f1(o['f1'])} ({float(o['avg_layers']):.2f} layers)"


def _oracles(o: Mapping[str, Any]) -> str:
    """The zero-loss oracle, and the bound within the budget once the benchmark records it."""
    text = _oracle(o["depth_width"])
    if "depth_width_within_budget" in o:
        text += f"; {_budget_bound(o['depth_width_within_budget'])}"
    return text


def _budget_bound(b: Mapping[str, Any]) -> str:
    if not b.get("reachable"):
        return f"the budget is out of reach (best F1 {_f1(b['best_f1'])})"
    return (f"≤ {float(b['speedup_upper_bound']):.2f}× (an assignment reaching {float(b['speedup_achieved']):.2f}× "
            f"at F1 {_f1(b['f1'])})")  # fmt: skip


def _recipes(recipes: list[Mapping[str, Any]]) -> str:
    """Per exits recipe: its full depth against the reference, the calibrated depth + width point
    and the oracle within the budget, all against the reference (the first recipe)."""
    parts = []
    for r in recipes:
        name = r["name"]
        both, bound = r["calibrated"]["both"], r["oracle_vs_reference"]["depth_width_within_budget"]
        parts.append(
            f"{r['mode']} ({name}): full depth {_signed_f1(r['full_f1_minus_reference'])}, depth + width "
            f"{float(both['speedup_cost_model']):.2f}× at {_signed_f1(-both['f1_loss_vs_reference'])}, bound "
            + (f"≤ {float(bound['speedup_upper_bound']):.2f}×" if bound.get("reachable") else "unreachable")
        )
    return "; ".join(parts)


def _per_target(fmt: Callable[[Mapping[str, Any]], str]) -> Callable[[Any], str]:
    """A number of each retraining target's summary (``growth_rounds.summary``), as ``target: …``."""

    def text(summary: Any) -> str:
        return "; ".join(f"{target}: {fmt(s)}" for target, s in summary.items())

    return text


SECTIONS: dict[str, SectionSpec] = {
    "00": SectionSpec(
        "00 · Environment",
        "Numbers below compare only with numbers from the same kind of machine and energy source.",
        (
            Number("CPU cores", "00_environment", ("machine.cores",)),
            Number("memory", "00_environment", ("machine.memory_gib",), lambda v: f"{v} GiB"),
            Number("a Jetson", "00_environment", ("jetson.is_jetson",), lambda v: "yes" if v else "no"),
            Number("edge runtime", "00_environment", ("interpreters.edge_runtime_uses",)),
            Number("energy source", "00_environment", ("energy_sources.auto_source",)),
        ),
    ),
    "01": SectionSpec(
        "01 · SQuAD data",
        "An answer span the tokenizer cannot give back, or a passage window that misses it, caps F1 "
        "before any training.",
        (
            Number("dev-v1.1 questions", "01_squad_data", ("datasets.dev-v1.1.questions",), _count),
            Number(
                "dev-v2.0 questions (unanswerable)", "01_squad_data", ("datasets.dev-v2.0.questions",), _count
            ),
            Number("train questions fitted on", "01_squad_data", ("split.fit_questions",), _count),
            Number(
                "answer spans recovered, WordPiece", "01_squad_data", ("span_recovery.wordpiece.rate",), _pct
            ),
            Number(
                "dev-v1.1 answers inside a window",
                "01_squad_data",
                ("window_coverage.dev-v1.1 WordPiece",),
                _pct,
            ),
        ),
        {"01_context_lengths": "Passage lengths in tokens against the model's window (tokens, questions)."},
    ),
    "02": SectionSpec(
        "02 · Full model",
        "The full model is the server's model and the reference every edge number is measured against.",
        (
            Number("dev-v1.1 F1", "02_finetune_full_model", ("dev_v1_1.scores.f1",), _f1),
            Number("dev-v1.1 EM", "02_finetune_full_model", ("dev_v1_1.scores.exact_match",), _f1),
            Number(
                "dev-v2.0 F1 (no-answer threshold cross-fitted)",
                "02_finetune_full_model",
                ("dev_v2_0.scores.f1",),
                _f1,
            ),  # fmt: skip
            Number("training time", "02_finetune_full_model", ("train.seconds_this_run",), _minutes),
            Number("parameters", "02_finetune_full_model", ("train.parameters",), _count),
        ),
        {"02_training_loss": "Training loss per optimizer step (loss, steps)."},
    ),
    "03": SectionSpec(
        "03 · Early exit",
        "How many layers a question needs before its answer is sure enough, and what that saves at "
        "batch 1 against the same model at full depth.",
        (
            Number("dev-v1.1 early-exit F1", "03_early_exit", ("dev_v1_1.f1",), _f1),
            Number("dev-v1.1 F1 loss vs full depth", "03_early_exit", ("dev_v1_1.f1_loss",), _f1),
            Number("average exit layer (of 6)", "03_early_exit", ("dev_v1_1.avg_exit_layer",), _f1),
            Number("measured batch-1 speed-up", "03_early_exit", ("runtime_speedup.speedup",), _x),
            Number("dev-v2.0 early-exit F1", "03_early_exit", ("dev_v2_0.f1",), _f1),
        ),
        {
            "03_exit_histogram": "Where questions leave: share of dev-v1.1 questions per exit layer at the "
            "chosen E_T.",
            "03_f1_vs_exit_layer": "F1 against the average exit layer as E_T varies; the marked point is "
            "the chosen E_T.",
            "03_f1_vs_latency": "F1 against expected latency per question (ms) as E_T varies; the marked "
            "point is the chosen E_T.",
            "03_exit_f1_per_layer_by_mode": "F1 of each layer's exit, per way of training the exits.",
            "03_edge_depth": "Expected time per question (ms) against the number of layers kept on the "
            "edge, unsettled questions offloaded.",
        },
    ),
    "04": SectionSpec(
        "04 · Edge export and device benchmark",
        "What the device runs: the model in LiteRT parts, one per layer; int8 is worth shipping when its "
        "F1 stays within a point of float32.",
        (
            Number(
                "int8 F1, all of dev-v1.1", "04_edge_export_and_benchmark", ("whole_dev_v1_1.int8.f1",), _f1
            ),
            Number("int8 bundle size", "04_edge_export_and_benchmark", ("edge.int8.tflite_bytes",), _mb),
            Number(
                "int8 time per question, p50",
                "04_edge_export_and_benchmark",
                ("whole_dev_v1_1.int8.question_ms_p50",),
                _ms,
            ),  # fmt: skip
            Number(
                "settled on the edge (int8)",
                "04_edge_export_and_benchmark",
                ("whole_dev_v1_1.int8.share_solved_on_edge",),
                _pct,
            ),  # fmt: skip
            Number(
                "spoken question to answer, p50 (int8, early exit)",
                "04_device_benchmark",
                ("bundles.int8.modes.early_exit.end_to_end.p50_ms",),
                _ms,
            ),  # fmt: skip
        ),
        {
            "04_size_and_latency_per_precision": "Bundle size (MB) and time per question (ms) per precision.",
            "04_latency_per_exit_layer": "Time per question (ms) by the layer it left at.",
            "04_device_stage_latency": "Time per stage of a spoken question (ms, p50): ASR, tokenising, "
            "each layer, offload.",
        },
    ),
    "05": SectionSpec(
        "05 · Encrypted offload",
        "The edge + server system against the full model alone: what the device settles itself, and "
        "what sending the rest over SSH costs.",
        (
            Number("answered on the edge", "05_encrypted_offload", ("end_to_end.share.edge",), _pct),
            Number("system F1", "05_encrypted_offload", ("end_to_end.f1",), _f1),
            Number(
                "F1 vs the full model",
                "05_encrypted_offload",
                ("end_to_end.f1_minus_full_model",),
                _signed_f1,
            ),
            Number(
                "SSH overhead p50 (ELMA's endpoint)",
                "05_encrypted_offload",
                ("ssh_overhead_ms_p50.endpoint",),
                lambda v: f"{v:.2f} ms",
            ),  # fmt: skip
            Number(
                "offload p50 (link + server model)",
                "05_encrypted_offload",
                ("end_to_end.offload_ms.p50",),
                _ms,
            ),  # fmt: skip
        ),
        {
            "05_f1_vs_offload_share": "System F1 against the share offloaded as E_T varies; the marked point is "
            "the E_T in use."
        },  # fmt: skip
    ),
    "06": SectionSpec(
        "06 · Speech to answer",
        "How much a spoken question loses against the same question typed, and whether the recogniser "
        "keeps up with speech.",
        (
            Number("held-out WER", "06_speech_benchmark", ("heldout.wer",), _pct),
            Number("held-out F1 drop, spoken vs typed", "06_speech_benchmark", ("heldout.f1_drop",), _f1),
            Number("held-out real-time factor", "06_speech_benchmark", ("heldout.rtf",), _f1),
            Number(
                "WER, the two test voices (tuned on them)",
                "06_speech_to_answer",
                ("runs.whisper_context.wer",),
                _pct,
            ),  # fmt: skip
            Number(
                "spoken-question F1, the two test voices",
                "06_speech_to_answer",
                ("runs.whisper_context.spoken_f1",),
                _f1,
            ),  # fmt: skip
        ),
        {
            "06_wer_and_f1": "Word error rate (%) and F1 spoken vs typed per recogniser set-up.",
            "06_real_time_factor": "Real-time factor (seconds of computing per second of audio) per "
            "recogniser set-up.",
            "06_worked_examples": "Worked examples: what was said, what was heard, the answer.",
        },
    ),
    "07": SectionSpec(
        "07 · Data set growth and sync",
        "Whether the questions the device could not settle teach the edge model anything, and whether "
        "the gate lets only a better model through to the device.",
        (
            Number(
                "questions asked on the device",
                "07_dataset_growth_and_sync",
                ("growth_rounds.domain.asked",),
                _count,
            ),
            Number(
                "candidates published, of the rounds",
                "07_dataset_growth_and_sync",
                ("growth_rounds.summary",),
                _per_target(lambda s: f"{s['published']} of {s['rounds']}"),
            ),  # fmt: skip
            Number(
                "deployment articles: settled on the device, first round to last",
                "07_dataset_growth_and_sync",
                ("growth_rounds.summary",),
                _per_target(lambda s: _points(s["targets"]["deployment_change"]["share_on_device"])),
            ),  # fmt: skip
            Number(
                "deployment articles: whole-system F1, first round to last",
                "07_dataset_growth_and_sync",
                ("growth_rounds.summary",),
                _per_target(lambda s: _signed_f1(s["targets"]["deployment_change"]["system_f1"])),
            ),  # fmt: skip
            Number(
                "other articles: whole-system F1, first round to last (forgetting)",
                "07_dataset_growth_and_sync",
                ("growth_rounds.summary",),
                _per_target(lambda s: _signed_f1(s["targets"]["other_change"]["system_f1"])),
            ),  # fmt: skip
        ),
        {
            "07_growth_rounds": "Share of the questions settled on the device and F1 per growth round "
            "(0: before growth), the deployment articles' never-asked questions and other articles, for "
            "every retraining target."
        },
    ),
    "adaptive": SectionSpec(
        "Adaptive compute on the edge: depth and width",
        "Early exit (depth) and skimming the passage after an early layer (width), tuned on one half of the "
        "articles and measured on the other, with the int8 bundle at batch 1 on every question of both dev sets, "
        "the configurations interleaved; the target is ≥ 2× at ≤ 1 F1 loss, and the oracle rows say how far "
        "perfect decisions would go with these layers (at zero loss, and within the 1-F1 budget).",
        (
            Number("depth + width, dev-v1.1", "bench_adaptive", ("dev_sets.dev-v1.1",), _speed_at_loss),
            Number("depth + width, dev-v2.0", "bench_adaptive", ("dev_sets.dev-v2.0",), _speed_at_loss),
            Number(
                "oracle bound, depth + width, dev-v1.1: at zero loss; within 1 F1",
                "bench_adaptive",
                ("dev_sets.dev-v1.1.oracle",),
                _oracles,
            ),
            Number(
                "exits recipes, skim after layer 3, against the frozen-backbone exits (dev-v1.1 sample, cost model)",
                "bench_exits_recipes",
                ("recipes",),
                _recipes,
            ),
            Number(
                "device program, adaptive bundle against its full-compute copy (typed, p50)",
                "bench_adaptive_device",
                ("adaptive_vs_full_squad", "adaptive_vs_full"),
                _device_effect,
            ),
        ),
        {
            "bench_adaptive_dev-v1.1": "F1 against measured batch-1 speed-up on dev-v1.1 (int8 edge): the full "
            "model, depth only, width only and the chosen depth + width point as measured, with the E_T sweeps of "
            "depth only and depth + width; dashed: the full model's F1 − 1 (the budget). Left the whole sweep, "
            "right zoomed on the budget region. The oracle bounds are in the table above.",
            "bench_adaptive_dev-v2.0": "The same on dev-v2.0 (no-answer questions included).",
            "bench_skim_diagnosis": "Adaptive width: F1 against the share of tokens kept past the skim layer "
            "(dev-v1.1), for the skim head, the head plus the answer's blocks (perfect recall) and random blocks "
            "with the answer kept; dashed: the full model, grey: within 1 F1.",
        },
        tables=("bench_adaptive",),
    ),
    "bench": SectionSpec(
        "Benchmarks outside the notebooks",
        "Measured by commands run beside the pipeline (each file's `produced_by` names the command).",
        (
            Number(
                "device program, warm typed answer p50", "bench_device", ("warm_ms.typed_total.p50",), _ms
            ),
            Number(
                "device program, warm spoken answer p50", "bench_device", ("warm_ms.spoken_total.p50",), _ms
            ),
            Number("full model, batch 1 p50 (seq 384)", "bench_inference", ("batch1_latency.p50_ms",), _ms),
            Number(
                "pipeline, spoken question p50 (int8, early exit)",
                "bench_pipeline",
                ("bundles.int8.modes.early_exit.end_to_end.p50_ms",),
                _ms,
            ),  # fmt: skip
        ),
        {
            "bench_pipeline_stage_latency": "Time per stage of a spoken question (ms, p50), early exit against "
            "all layers.",
        },  # fmt: skip
    ),
}


ADAPTIVE_STEMS = (
    "bench_adaptive",
    "bench_skim",
    "bench_exits_recipes",
)  # issue 16's benchmarks: their own section


def group_key(stem: str) -> str:
    """The section a metrics file or figure belongs to: its number ("03"), "adaptive" (depth and
    width benchmarks), "bench" (the other benchmarks), or "" (none)."""
    m = re.match(r"^(\d+)_", stem)
    if m:
        return m.group(1)
    if stem.startswith(ADAPTIVE_STEMS):
        return "adaptive"
    return "bench" if stem.startswith("bench_") else ""


def caption_for(stem: str, spec: SectionSpec | None) -> str:
    if spec and stem in spec.captions:
        return spec.captions[stem]
    words = re.sub(r"^(\d+|bench)_", "", stem).replace("_", " ")
    return words[:1].upper() + words[1:] + "."


def figure_lines(figures: list[Path], root: Path, spec: SectionSpec | None) -> list[str]:
    lines: list[str] = []
    for fig in figures:
        caption = caption_for(fig.stem, spec)
        lines += ["", f"![{fig.stem}]({fig.relative_to(root).as_posix()})", "", f"_{caption}_"]
    return lines


def numbers_table(spec: SectionSpec, metrics: Metrics) -> list[str]:
    lines = ["| number | value |", "|---|---|"]
    for n in spec.numbers:
        lines.append(f"| {n.label} | {n.text(metrics)} |")
    return lines
