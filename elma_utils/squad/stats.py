"""Numbers and plots that describe a SQuAD set (notebook 01)."""

from __future__ import annotations

import numpy as np

from elma_utils.squad.data import SquadDataset, SquadExample


def dataset_summary(ds: SquadDataset) -> dict:
    """Counts and lengths (in characters and words) of one loaded SQuAD file."""
    ex = ds.examples
    contexts = list(dict.fromkeys(e.context for e in ex))
    return {
        "articles": ds.report.n_articles,
        "paragraphs": ds.report.n_paragraphs,
        "questions": ds.report.n_questions,
        "unanswerable": sum(e.is_impossible for e in ex),
        "bad_examples": ds.report.n_bad,
        "mean_context_words": round(float(np.mean([len(c.split()) for c in contexts])), 1)
        if contexts
        else 0.0,
        "mean_question_words": round(float(np.mean([len(e.question.split()) for e in ex])), 1) if ex else 0.0,
        "mean_answer_words": round(
            float(np.mean([len(e.answers[0].text.split()) for e in ex if e.answers])), 2
        )
        if any(e.answers for e in ex)
        else 0.0,
    }


def question_token_lengths(examples: list[SquadExample], tokenizer) -> np.ndarray:
    return np.array([len(ids) for ids, _ in tokenizer.encode_with_offsets([e.question for e in examples])])


def context_token_lengths(examples: list[SquadExample], tokenizer) -> np.ndarray:
    """Length in tokens of every distinct context."""
    contexts = list(dict.fromkeys(e.context for e in examples))
    return np.array([len(ids) for ids, _ in tokenizer.encode_with_offsets(contexts)])


def window_coverage(context_lengths: np.ndarray, max_seq_len: int, question_len: int = 16) -> float:
    """Share of contexts that fit in one window next to a typical question."""
    room = max_seq_len - question_len - 3
    return float(np.mean(context_lengths <= room)) if len(context_lengths) else 1.0


def plot_context_lengths(lengths_by_name: dict[str, np.ndarray], max_seq_len: int, question_len: int = 16):
    """Histogram of context lengths against the room a window leaves for the context."""
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes, tag_histogram

    fig, ax = plt.subplots(figsize=(7, 3.6))
    top = max(int(max((v.max() for v in lengths_by_name.values() if len(v)), default=1)), max_seq_len) + 20
    bins = np.arange(0, top + 20, 20)
    for name, lengths in lengths_by_name.items():
        share = window_coverage(np.asarray(lengths), max_seq_len, question_len)
        _, _, patches = ax.hist(
            lengths,
            bins=bins,
            alpha=0.55,
            label=f"{name} ({len(lengths)} contexts, {share:.0%} fit one window)",
        )
        tag_histogram(patches)
    room = max_seq_len - question_len - 3
    ax.axvline(room, color="k", ls="--", lw=1)
    ax.text(room, ax.get_ylim()[1] * 0.9, f" room in a {max_seq_len}-token window", fontsize=8)
    finish_axes(ax, "SQuAD context lengths against one window", "context length (tokens)", "contexts (count)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training_curve(log_csv_rows: list[dict]):
    """Loss per checkpoint chunk from a Keras CSVLogger file."""
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = [int(r["epoch"]) + 1 for r in log_csv_rows]
    for key in ("loss", "start_logits_loss", "end_logits_loss"):
        ax.plot(x, [float(r[key]) for r in log_csv_rows], marker="o", ms=3, label=key)
    finish_axes(
        ax,
        "Fine-tuning loss of the full model",
        "training progress (checkpoint chunks of steps)",
        "training loss (cross-entropy, nats)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
