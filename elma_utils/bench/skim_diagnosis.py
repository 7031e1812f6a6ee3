"""Where adaptive width loses F1: the skim head's recall, or the later layers on a shorter passage.

    python -m elma_utils.bench.skim_diagnosis --exits artifacts/minilm-cpu-exits-distill \\
        [--layers 2,3] [--taus 0.6,0.7,0.8,0.85] [--questions 1000] [--out-dir reports]

Per skim layer s (its head from ``bench.adaptive_run``: ``<exits>/adaptive/L<s>/skim.npz``)
and tau, the last exit answers dev-v1.1 questions (spread over every article) under three
keep rules that keep about the same share of the tokens:

- ``head``: the head's keep rule, what the edge runs;
- ``head_and_answer``: the head's blocks plus the blocks holding the full model's own best
  start and end token — a head with perfect recall of the answer, the best any head can do;
- ``random``: as many tokens as the head keeps, dropping random blocks other than the
  answer's — what a shorter passage alone costs the later layers, the answer kept.

If the head's loss vanishes once the answer's blocks are kept, and random drops cost little,
width needs a head with better recall, not later layers retrained on skimmed input
(``early_exit.skim_finetune``). F1 against the gold answers (official scoring) and the share
of answers equal to the full model's. Writes ``metrics/bench_skim_diagnosis.json`` and a
figure (F1 against kept share, per layer). Keras on the training machine; minutes on 2 cores
for 1,000 questions.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from elma_utils.early_exit.skim import (
    SKIM_FILE,
    SkimHead,
    context_mask,
    gather_rows,
    pad_positions,
    scatter_logits,
)

RULES = ("head", "head_and_answer", "random")
RULE_LABELS = {
    "head": "skim head (what the edge runs)",
    "head_and_answer": "head + the answer's blocks (perfect recall)",
    "random": "random blocks, answer kept (same share)",
}
FIGURE = "bench_skim_diagnosis"  # reports/figures/<FIGURE>.png
METRICS = "bench_skim_diagnosis"  # reports/metrics/<METRICS>.json

KeepRule = Callable[[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def context_blocks(offsets: np.ndarray, length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(context positions < ``length``, their block numbers), as the keep rule counts blocks."""
    ctx = np.nonzero(context_mask(offsets))[0]
    ctx = ctx[ctx < length]
    return ctx, (ctx - ctx[0]) // int(block) if ctx.size else ctx


def answer_blocks(
    ctx: np.ndarray, blocks: np.ndarray, start_logits: np.ndarray, end_logits: np.ndarray
) -> set:
    """Blocks holding the window's best start and best end token (of the full model)."""
    where = {int(p): int(b) for p, b in zip(ctx, blocks, strict=True)}
    return {where[t] for t in (int(np.argmax(start_logits)), int(np.argmax(end_logits))) if t in where}


def keep_rules(head: SkimHead) -> dict[str, KeepRule]:
    """The three rules: (hidden [L, H], offsets, length, full start, full end, rng) → kept positions."""

    def by_head(hidden, offsets, length, start, end, rng):
        return head.kept_positions(hidden, offsets, length)

    def with_answer(hidden, offsets, length, start, end, rng):
        ctx, blocks = context_blocks(offsets, length, head.block)
        wanted = answer_blocks(ctx, blocks, start, end)
        extra = ctx[np.isin(blocks, list(wanted))]
        return np.union1d(by_head(hidden, offsets, length, start, end, rng), extra).astype(np.int64)

    def random_blocks(hidden, offsets, length, start, end, rng):
        to_drop = length - by_head(hidden, offsets, length, start, end, rng).size
        ctx, blocks = context_blocks(offsets, length, head.block)
        wanted = answer_blocks(ctx, blocks, start, end)
        sizes = np.bincount(blocks) if blocks.size else np.zeros(0, int)
        dropped, count = [], 0
        for b in rng.permutation(sizes.size):
            if b not in wanted and count + sizes[b] <= to_drop:
                dropped.append(b)
                count += int(sizes[b])
        keep = np.ones(length, bool)
        keep[ctx[np.isin(blocks, dropped)]] = False
        return np.nonzero(keep)[0]

    return {"head": by_head, "head_and_answer": with_answer, "random": random_blocks}


def last_exit_with(multi, features, layer: int, rule: KeepRule, full_start, full_end, *, batch_size: int = 16,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """Last-exit start/end logits [N, L] with positions after ``layer`` kept by ``rule``, and the
    kept share of all real tokens."""
    from elma_utils.early_exit.skim_model import SkimmedForward
    from elma_utils.model.batching import batch_arrays, plan_batches

    fwd = SkimmedForward(multi, layer)
    rng = np.random.default_rng(seed)
    n, seq = len(features), features.max_seq_len
    start = np.full((n, seq), -1e4, np.float32)
    end = np.full((n, seq), -1e4, np.float32)
    kept = 0
    for b in plan_batches(features.lengths, batch_size, seq, shuffle=False):
        x = batch_arrays(features, b, with_labels=False)
        hidden = np.asarray(fwd.front(x["token_ids"], x["segment_ids"], x["padding_mask"])[0], np.float32)
        positions = pad_positions([
            rule(hidden[j], features.offsets[r, : b.length], int(features.lengths[r]), full_start[r, : b.length],
                 full_end[r, : b.length], rng)
            for j, r in enumerate(b.rows)
        ])  # fmt: skip
        pad = (positions >= 0).astype(np.int32)
        s1, e1 = fwd.back(
            gather_rows(hidden, positions, 0.0), pad, gather_rows(x["segment_ids"], positions, 0)
        )
        start[b.rows, : b.length] = scatter_logits(np.asarray(s1)[:, -1], positions, b.length)
        end[b.rows, : b.length] = scatter_logits(np.asarray(e1)[:, -1], positions, b.length)
        kept += int(pad.sum())
    return start, end, kept / max(int(features.lengths.sum()), 1)


def diagnose(exits_dir: Path, layers: list[int], taus: list[float], questions: int | None,
             data_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Every (layer, tau, rule): F1, F1 loss, answers equal to the full model's, kept share."""
    from elma_utils.early_exit.experiment import dev_questions, load_exits
    from elma_utils.model.exit_training import predict_exit_logits
    from elma_utils.squad.features import build_features
    from elma_utils.squad.metrics import per_question_scores
    from elma_utils.squad.postprocess import predict_answers

    heads = {s: SkimHead.load(Path(exits_dir) / "adaptive" / f"L{s}" / SKIM_FILE) for s in layers}
    multi, tokenizer, config, _ = load_exits(exits_dir)
    ds, examples = dev_questions("1.1", questions, data_dir)
    feats = build_features(examples, tokenizer, config["max_seq_len"], config["doc_stride"],
                           config["max_query_len"], progress=False)  # fmt: skip
    start, end = predict_exit_logits(multi, feats, progress=progress)
    full_start, full_end = start[:, -1], end[:, -1]

    def score(s_logits, e_logits) -> tuple[float, list[str]]:
        texts = [p.text for p in predict_answers(examples, feats, s_logits, e_logits)]
        scores = per_question_scores(
            ds.raw, {e.qas_id: t for e, t in zip(examples, texts, strict=True)}, "1.1"
        )
        return 100.0 * float(np.mean([scores[e.qas_id][1] for e in examples])), texts

    full_f1, full_texts = score(full_start, full_end)
    result: dict[str, Any] = {"dev_set": "dev-v1.1", "questions": len(examples), "windows": len(feats),
                              "full_f1": full_f1, "layers": {}}  # fmt: skip
    jobs = [(s, t, r) for s in layers for t in taus for r in RULES]
    for s, tau, rule_name in tqdm(jobs, desc="skim diagnosis", disable=not progress, unit="run"):
        rule = keep_rules(heads[s].with_settings(tau=tau))[rule_name]
        s_logits, e_logits, share = last_exit_with(multi, feats, s, rule, full_start, full_end)
        f1, texts = score(s_logits, e_logits)
        result["layers"].setdefault(str(s), {}).setdefault(f"{tau:g}", {})[rule_name] = {
            "f1": f1,
            "f1_loss": full_f1 - f1,
            "same_answer_as_full": float(np.mean([a == b for a, b in zip(texts, full_texts, strict=True)])),
            "kept_share": share,
        }
    return result


def findings(result: dict[str, Any]) -> list[str]:
    """Sentences for the report, per layer at the tau where the head keeps closest to half the
    tokens: what the head loses, and what perfect recall and random blocks lose there."""
    out = []
    for s, per_tau in sorted(result["layers"].items(), key=lambda kv: int(kv[0])):
        tau, rules = min(per_tau.items(), key=lambda kv: abs(kv[1]["head"]["kept_share"] - 0.5))
        h, o, r = (rules[k] for k in RULES)
        out.append(
            f"Skim after layer {s}, tau {tau} ({result['questions']} dev-v1.1 questions): the head keeps "
            f"{h['kept_share']:.0%} of the tokens and loses {h['f1_loss']:.1f} F1; with the answer's blocks also "
            f"kept ({o['kept_share']:.0%}) the loss is {o['f1_loss']:.1f}, and dropping random blocks other than "
            f"the answer's ({r['kept_share']:.0%} kept) loses {r['f1_loss']:.1f}."
        )
    return out


def plot(result: dict[str, Any]):
    """F1 against kept share per layer: the three rules, the full model and the 1-F1 budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes

    layers = sorted(result["layers"], key=int)
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 4), squeeze=False)
    for ax, s in zip(axes[0], layers, strict=True):
        per_tau = result["layers"][s]
        for i, rule in enumerate(RULES):
            pts = sorted((100 * v[rule]["kept_share"], v[rule]["f1"], t) for t, v in per_tau.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=RULE_LABELS[rule])
            if rule == "head":
                for x, y, t in pts:
                    ax.annotate(f"τ {t}", (x, y), xytext=(4, -10), textcoords="offset points", fontsize=7)
        ax.axhline(
            result["full_f1"], color="k", lw=0.8, ls="--", label=f"full model ({result['full_f1']:.1f})"
        )
        ax.axhspan(result["full_f1"] - 1.0, result["full_f1"], color="0.85", label="within 1 F1")
        finish_axes(ax, f"Skim after layer {s}: {result['questions']} dev-v1.1 questions",
                    "tokens kept past the skim layer (%)", "F1 (%, official scoring)")  # fmt: skip
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    from elma_utils.report import provenance
    from elma_utils.reporting import save_figure, save_metrics

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--exits", type=Path, required=True, help="exits artifact with adaptive/L<s>/skim.npz heads"
    )
    p.add_argument("--layers", default="2,3", help="skim layers whose heads to diagnose")
    p.add_argument("--taus", default="0.6,0.7,0.8,0.85", help="keep thresholds")
    p.add_argument(
        "--questions", type=int, default=1000, help="dev-v1.1 questions, spread over every article"
    )
    p.add_argument(
        "--out-dir", type=Path, default=Path("reports"), help="reports directory (metrics/, figures/)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",")]
        taus = [float(x) for x in args.taus.split(",")]
    except ValueError:
        p.error("--layers and --taus are comma-separated numbers, e.g. --layers 2,3 --taus 0.7,0.8")
    missing = [s for s in layers if not (args.exits / "adaptive" / f"L{s}" / SKIM_FILE).is_file()]
    if missing:
        p.error(f"no skim head for layer(s) {missing} in {args.exits / 'adaptive'}: run "
                f"python -m elma_utils.bench.adaptive_run --exits {args.exits} --layers {args.layers} first")  # fmt: skip
    result = diagnose(args.exits, layers, taus, args.questions, args.data_dir)
    argv_used = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "elma_utils.bench.skim_diagnosis", *argv_used])
    result[provenance.KEY] = {**provenance.provenance(), "command": command}
    result["exits"] = str(args.exits)
    result["findings"] = findings(result)
    result["figure"] = str(save_figure(plot(result), FIGURE, args.out_dir))
    save_metrics(METRICS, result, args.out_dir)
    for s, per_tau in result["layers"].items():
        for t, rules in per_tau.items():
            print(f"layer {s} tau {t}: " + "; ".join(
                f"{r} F1 {v['f1']:.2f} (-{v['f1_loss']:.2f}) kept {v['kept_share']:.2f}" for r, v in rules.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
