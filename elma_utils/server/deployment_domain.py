"""The deployment domain of the growth experiment: texts the edge never trained on, asked over time.

A device is used on its own texts (a course's readings, a manual, a museum's panels). Here
those texts are SQuAD articles no model trained on (dev-v1.1 articles: the full model trained
on train-v1.1 questions only), split **by article**:

- *deployment articles*: the device's texts. Each article's questions arrive over time; the
  first part (``asked_fraction`` of them) is asked on the device, round by round, and the
  later part is never asked: it only measures what the growth loop changed.
- *other articles*: every other article, for three disjoint jobs, each on its own articles:
  ``other`` measures forgetting, ``calibration`` chooses a retrained edge's E_T, ``guard``
  is the gate's held-out set with real labels; the articles left over (``offload_pool``,
  none shared with the others; the last one cut at ``offload_pool_questions``, 0 or more; None:
  all of them) are labelled questions the server holds for
  pricing an offload: few questions lie in the uncertain region above E_T (5 % of them), so
  learning what a disagreement there is worth needs many.

Time order inside a deployment article (``order``): ``"interleaved"`` (default) takes the
first question of every paragraph, then the second of every paragraph, and so on, so the
asked part touches every paragraph and the later questions are new questions about texts the
device has been asked about; ``"document"`` takes the questions in document order, so the
later questions are mostly about paragraphs never asked about.

    domain = split_domain(load_squad("1.1", "dev").examples, DomainSizes(articles=12), seed=0)
    domain.asked_rounds[0]      # the questions the device asks in round 1
    domain.later                # measured after every round, never asked
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elma_utils.config import Profile

ORDERS = ("interleaved", "document")


@dataclass(frozen=True)
class DomainSizes:
    """How big the experiment's data is (``from_profile`` reads the ``growth_*`` profile knobs;
    the defaults here are the smoke profile's)."""

    articles: int = 2  # deployment articles
    paragraphs_per_article: int | None = 3  # None: every paragraph of a deployment article
    asked_fraction: float = 0.6  # of each article's questions, asked on the device
    rounds: int = 2  # the asked part is cut into this many rounds
    other_questions: int = 16  # forgetting: questions of other articles, measured every round
    calibration_questions: int = 16  # other articles: a retrained edge's E_T is chosen on them
    guard_questions: int = 16  # other articles: the gate's held-out questions with real labels
    order: str = "interleaved"
    # other articles' questions for pricing an offload (server.offload_threshold); None: every
    # question of the articles the other three groups leave over
    offload_pool_questions: int | None = 16

    def __post_init__(self) -> None:
        if self.articles < 1:
            raise ValueError(f"articles must be at least 1, got {self.articles}")
        if self.paragraphs_per_article is not None and self.paragraphs_per_article < 1:
            raise ValueError(f"paragraphs_per_article must be at least 1, got {self.paragraphs_per_article}")
        if not 0.0 < self.asked_fraction < 1.0:
            raise ValueError(f"asked_fraction must be between 0 and 1, got {self.asked_fraction}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        for name in ("other_questions", "calibration_questions", "guard_questions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.offload_pool_questions is not None and self.offload_pool_questions < 0:
            raise ValueError(f"offload_pool_questions must be at least 0, got {self.offload_pool_questions}")

    @classmethod
    def from_profile(cls, profile: Profile, **overrides: Any) -> DomainSizes:
        """The profile's ``growth_*`` knobs (``growth_articles`` …), then ``overrides`` (None: the
        profile's)."""
        sizes = cls(
            articles=profile.growth_articles,
            paragraphs_per_article=profile.growth_paragraphs_per_article,
            asked_fraction=profile.growth_asked_fraction,
            rounds=profile.growth_rounds,
            other_questions=profile.growth_other_questions,
            calibration_questions=profile.growth_calibration_questions,
            guard_questions=profile.growth_guard_questions,
            order=profile.growth_order,
            offload_pool_questions=profile.growth_offload_pool_questions,
        )
        return replace(sizes, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class DeploymentDomain:
    """The split (see the module note); every list holds ``SquadExample``s."""

    sizes: DomainSizes
    deployment_articles: list[str]
    asked_rounds: list[list]
    later: list
    other: list
    calibration: list
    guard: list
    other_articles: dict[str, list[str]] = field(default_factory=dict)  # job -> its articles
    offload_pool: list = field(default_factory=list)  # labelled, for pricing an offload

    @property
    def gain_questions(self) -> list:
        """Every labelled other-article question the server may price an offload on: the
        calibration questions and the offload pool (never the guard, which judges the result)."""
        return self.calibration + self.offload_pool

    @property
    def asked(self) -> list:
        return [e for r in self.asked_rounds for e in r]

    def describe(self) -> dict[str, Any]:
        """Counts and article titles, for the metrics file."""
        return {
            "sizes": asdict(self.sizes),
            "deployment_articles": list(self.deployment_articles),
            "asked_per_round": [len(r) for r in self.asked_rounds],
            "asked": len(self.asked),
            "later": len(self.later),
            "deployment_paragraphs": len({e.context_id for e in self.asked + self.later}),
            "other": len(self.other),
            "calibration": len(self.calibration),
            "guard": len(self.guard),
            "offload_pool": len(self.offload_pool),
            "other_articles": {k: list(v) for k, v in self.other_articles.items()},
        }


def _by_key(examples: Sequence, key) -> dict[str, list]:
    out: dict[str, list] = {}
    for e in examples:
        out.setdefault(key(e), []).append(e)
    return out


def article_timeline(
    article: Sequence, asked_fraction: float, order: str = "interleaved"
) -> tuple[list, list]:
    """One article's questions (in document order) → (asked, later), each in time order.

    ``interleaved``: in every paragraph of n ≥ 2 questions the first ``round(asked_fraction *
    n)`` (at least 1, at most n - 1) are asked and the rest come later; a paragraph with one
    question is asked. The asked questions are ordered by their rank in their paragraph, then
    by paragraph, so the device meets every paragraph early. ``document``: the first
    ``round(asked_fraction * N)`` of the article's N questions (at least 1, at most N - 1)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    article = list(article)
    if order == "document":
        k = min(max(round(asked_fraction * len(article)), 1), max(len(article) - 1, 1))
        return article[:k], article[k:]
    asked, later = [], []
    for p_index, questions in enumerate(_by_key(article, lambda e: e.context_id).values()):
        n = len(questions)
        k = n if n < 2 else min(max(round(asked_fraction * n), 1), n - 1)
        asked += [(rank, p_index, q) for rank, q in enumerate(questions[:k])]
        later += [(rank, p_index, q) for rank, q in enumerate(questions[k:], start=k)]
    return [q for *_, q in sorted(asked, key=lambda t: t[:2])], [
        q for *_, q in sorted(later, key=lambda t: t[:2])
    ]


def _chunks(items: list, n: int) -> list[list]:
    """``items`` cut into ``n`` consecutive parts whose sizes differ by at most one."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def split_domain(examples: Sequence, sizes: DomainSizes, seed: int = 0) -> DeploymentDomain:
    """Split SQuAD examples (one file, document order) by article (see the module note).

    Deployment articles are a seeded sample of the articles; the other articles, in a seeded
    order, fill ``other``, then ``calibration``, then ``guard``, whole articles each (the last
    one cut at the quota); the articles left after them fill ``offload_pool`` (up to
    ``offload_pool_questions``, the last article cut there). Raises ValueError when there are too few articles."""
    articles = _by_key([e for e in examples if not getattr(e, "synthetic", False)], lambda e: e.title)
    titles = sorted(articles)
    rng = random.Random(seed)
    if len(titles) < sizes.articles + 3:
        raise ValueError(
            f"{len(titles)} articles: {sizes.articles} deployment articles and 3 groups of other "
            "articles need more"
        )
    deployment = sorted(rng.sample(titles, sizes.articles))
    asked_all: list[tuple[int, int, Any]] = []
    later: list = []
    for a_index, title in enumerate(deployment):
        questions = articles[title]
        if sizes.paragraphs_per_article is not None:
            keep = list(dict.fromkeys(e.context_id for e in questions))[: sizes.paragraphs_per_article]
            questions = [e for e in questions if e.context_id in set(keep)]
        asked, late = article_timeline(questions, sizes.asked_fraction, sizes.order)
        asked_all += [(i, a_index, q) for i, q in enumerate(asked)]  # articles interleaved in time
        later += late
    timeline = [q for *_, q in sorted(asked_all, key=lambda t: t[:2])]
    if len(timeline) < sizes.rounds:
        raise ValueError(f"{len(timeline)} asked questions cannot fill {sizes.rounds} rounds")
    rest = [t for t in titles if t not in set(deployment)]
    rng.shuffle(rest)
    groups: dict[str, list] = {"other": [], "calibration": [], "guard": [], "offload_pool": []}
    used: dict[str, list[str]] = {k: [] for k in groups}
    pool_quota = len(examples) if sizes.offload_pool_questions is None else sizes.offload_pool_questions
    quota = {"other": sizes.other_questions, "calibration": sizes.calibration_questions,
             "guard": sizes.guard_questions, "offload_pool": pool_quota}  # fmt: skip
    names = iter(groups)
    job = next(names)
    for title in rest:
        while job is not None and len(groups[job]) >= quota[job]:
            job = next(names, None)
        if job is None:
            break
        groups[job] += articles[title][: quota[job] - len(groups[job])]
        used[job].append(title)
    short = [k for k in ("other", "calibration", "guard") if len(groups[k]) < quota[k]]
    if short:
        raise ValueError(f"the other articles cannot fill {', '.join(short)}: ask for fewer questions")
    return DeploymentDomain(
        sizes, deployment, _chunks(timeline, sizes.rounds), later, groups["other"], groups["calibration"],
        groups["guard"], used, groups["offload_pool"],
    )  # fmt: skip
