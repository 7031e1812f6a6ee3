"""Hard made-up unanswerable questions: the paragraph with its answer sentence cut out.

No SQuAD 2.0 *train* set exists here, and the easy negatives of ``make_unanswerable`` (the
question against another paragraph of its article) teach little: the paragraph is often
plainly off-topic. SQuAD 2.0's real negatives are on-topic: the paragraph talks about the
question's subject but does not say the answer. Cutting every sentence that holds an answer
out of the question's own paragraph gives that: same topic, same names, most of the words
the question shares with the text — and no answer (checked: no answer text survives,
case-insensitively).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from elma_utils.squad.data import SquadExample

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s+)(?=[A-Z0-9\"'(\[])")
MIN_CONTEXT_CHARS = 120  # what is left must still read as a paragraph


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence: split after . ! ? (and closing quotes) before a capital."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start(1)))
        start = m.end(1)
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def without_answer_sentences(example: SquadExample) -> str | None:
    """The context minus every sentence that overlaps an answer, or None when that leaves too
    little text or an answer still appears in it."""
    if example.is_impossible or not example.answers:
        return None
    answer_spans = [(a.start, a.start + len(a.text)) for a in example.answers]
    kept = [
        example.context[s:e]
        for s, e in sentence_spans(example.context)
        if not any(a0 < e and s < a1 for a0, a1 in answer_spans)
    ]
    rest = " ".join(kept).strip()
    lowered = rest.lower()
    if len(rest) < MIN_CONTEXT_CHARS or any(a.text.lower() in lowered for a in example.answers):
        return None
    return rest


def make_hard_unanswerable(
    examples: Sequence[SquadExample], ratio: float, seed: int = 0
) -> list[SquadExample]:
    """round(ratio × answerable) hard negatives (fewer when not enough paragraphs qualify),
    at most one per question, in the order of ``examples``. Each gets its own context id
    (``<context_id>-cut<k>``) so that article/paragraph splits still work."""
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    answerable = [i for i, ex in enumerate(examples) if not ex.is_impossible and ex.answers]
    target = round(ratio * len(answerable))
    order = answerable.copy()
    random.Random(seed).shuffle(order)
    made: dict[int, SquadExample] = {}
    for i in order:
        if len(made) >= target:
            break
        ex = examples[i]
        rest = without_answer_sentences(ex)
        if rest is None:
            continue
        made[i] = SquadExample(
            qas_id=f"{ex.qas_id}_cut",
            question=ex.question,
            context=rest,
            answers=(),
            is_impossible=True,
            title=ex.title,
            context_id=f"{ex.context_id}-cut{len(made)}",
            synthetic=True,
        )
    return [made[i] for i in sorted(made)]
