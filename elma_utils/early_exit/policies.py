"""Exit policies: after each layer, answer now or go on (and after the last edge layer, offload).

A policy is any object with ``decide(layer_outputs) -> ExitDecision | None``; the runtime
calls it after every layer with the outputs so far (layer 1 first) and stops computing at
the first decision. If no layer decides, the question goes to the server (or, on a model
without one, is answered by its last layer).

The built-in policies also provide ``exit_conditions`` (a bool [K, N] "would exit at layer
k" table) so that ``simulate_exits`` can replay thousands of held-out questions at once for
a threshold sweep; a test checks that both paths give the same exits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from elma_utils.early_exit.entropy import SPAN_RULES, best_span, exit_confidence, span_entropy

NO_SPAN = (-1, -1)  # the best "span" of a question predicted unanswerable

NullThreshold = float | Sequence[float] | None  # one for every layer, or one per layer (SQuAD 2.0)


def null_threshold_at(value: NullThreshold, layer: int) -> float | None:
    """Layer ``layer``'s (1-based) no-answer threshold: exits are calibrated one by one, so a
    per-layer list is the norm on SQuAD 2.0; a single number applies to every layer."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    if not 1 <= layer <= len(value):
        raise ValueError(f"no null threshold for layer {layer}: {len(value)} per-layer values given")
    return float(value[layer - 1])


@dataclass
class LayerOutput:
    """What one exit head said about one question (all of its windows).

    ``best_span`` identifies the answer for patience: character offsets in the context when
    known (comparable across windows), else token indices; ``NO_SPAN`` for "no answer".
    ``entropy`` was computed with ``rule``; with ``mask`` and the logits present, a policy
    that wants another rule recomputes it.
    """

    layer: int  # 1-based
    start_logits: np.ndarray | None  # [W, L] for the question's W windows
    end_logits: np.ndarray | None
    entropy: float  # normalised span entropy, max over windows
    best_span: tuple[int, int]
    text: str | None = None
    null_diff: float | None = None  # null − best span score (SQuAD 2.0)
    rule: str = "max"
    mask: np.ndarray | None = None  # [W, L] answer space

    def entropy_for(self, rule: str) -> float:
        """The span entropy under ``rule`` (recomputed from the logits when it differs)."""
        if rule == self.rule:
            return float(self.entropy)
        if self.mask is None or self.start_logits is None or self.end_logits is None:
            raise ValueError(
                f"layer {self.layer}: entropy was computed with rule {self.rule!r}; "
                f"rule {rule!r} needs the logits and the mask"
            )
        return float(np.max(span_entropy(self.start_logits, self.end_logits, self.mask, rule)))

    @classmethod
    def from_logits(
        cls,
        layer: int,
        start_logits: np.ndarray,
        end_logits: np.ndarray,
        mask: np.ndarray,
        offsets: np.ndarray | None = None,
        context: str | None = None,
        rule: str = "max",
        null_threshold: NullThreshold = None,
        n_best: int = 20,
        max_answer_len: int = 30,
    ) -> LayerOutput:
        """Entropy (max over windows), best span and no-answer margin of one question.

        ``offsets`` ([W, L, 2], from ``QAFeatures``) make the span character offsets and,
        with ``context``, give its text. With ``null_threshold`` set (SQuAD 2.0), a margin
        above it makes the answer ``NO_SPAN`` / "" as the post-processing would (a per-layer
        list: this layer's entry).
        """
        null_threshold = null_threshold_at(null_threshold, layer)
        start, end = np.atleast_2d(start_logits), np.atleast_2d(end_logits)
        mask = np.broadcast_to(np.atleast_2d(np.asarray(mask, dtype=bool)), start.shape)
        entropy = float(np.max(span_entropy(start, end, mask, rule)))
        s, e, score, null = best_span(start, end, mask, n_best, max_answer_len)
        w = int(np.argmax(score))
        diff = float(np.min(null) - score[w])
        if not np.isfinite(score[w]) or (null_threshold is not None and diff > null_threshold):
            return cls(layer, start, end, entropy, NO_SPAN, "", diff, rule, mask)
        if offsets is None:
            seq = start.shape[1]
            return cls(
                layer, start, end, entropy, (w * seq + int(s[w]), w * seq + int(e[w])), None, diff, rule, mask
            )
        c0, c1 = int(offsets[w, s[w], 0]), int(offsets[w, e[w], 1])
        text = context[c0:c1] if context is not None else None
        return cls(layer, start, end, entropy, (c0, c1), text, diff, rule, mask)


@dataclass
class EarlyExitAnswer:
    """A question's answer from a layer-by-layer runtime (Keras or the LiteRT edge)."""

    text: str
    char_start: int
    char_end: int
    exit_layer: int  # 1-based layer that answered; the last layer computed when unsolved
    solved: bool  # False: no layer was confident enough → offload
    entropy: float
    null_diff: float
    entropies: list[float] = field(default_factory=list)  # per computed layer


@dataclass
class ExitDecision:
    """Answer with this layer's output."""

    layer: int
    reason: str
    output: LayerOutput | None = field(default=None, repr=False)


@runtime_checkable
class ExitPolicy(Protocol):
    """Called after each layer; a decision stops the computation there."""

    def decide(self, layer_outputs: Sequence[LayerOutput]) -> ExitDecision | None: ...


@dataclass(frozen=True)
class EntropyPolicy:
    """Exit at the first layer whose span entropy ≤ ``threshold`` (the design's E_T).

    With ``no_answer_margin`` set (SQuAD 2.0) the layer must also have a settled no-answer
    call: |null_diff − null_threshold| ≥ no_answer_margin (``null_threshold`` may be one
    value per layer).
    """

    threshold: float
    rule: str = "max"
    no_answer_margin: float | None = None
    null_threshold: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.null_threshold, int | float):
            object.__setattr__(self, "null_threshold", tuple(float(v) for v in self.null_threshold))
        if not math.isfinite(self.threshold):
            raise ValueError(f"entropy threshold must be a finite number, got {self.threshold}")
        if self.rule not in SPAN_RULES:
            raise ValueError(f"unknown span entropy rule {self.rule!r}; choose one of {SPAN_RULES}")
        if self.no_answer_margin is not None and not self.no_answer_margin >= 0:
            raise ValueError(f"no_answer_margin must be ≥ 0, got {self.no_answer_margin}")

    def decide(self, layer_outputs: Sequence[LayerOutput]) -> ExitDecision | None:
        out = layer_outputs[-1]
        h = out.entropy_for(self.rule)
        if not self._ok(h, out.null_diff, out.layer):
            return None
        return ExitDecision(out.layer, f"entropy {h:.4f} ≤ {self.threshold:g}", out)

    def _ok(self, h: float, null_diff: float | None, layer: int) -> bool:
        if self.no_answer_margin is not None and null_diff is None:
            raise ValueError(f"layer {layer}: no_answer_margin is set but the output has no null_diff")
        null_threshold = null_threshold_at(self.null_threshold, layer)
        return bool(exit_confidence(h, self.threshold, null_diff, null_threshold, self.no_answer_margin))

    def exit_conditions(self, entropy: np.ndarray, span: np.ndarray | None, null_diff: np.ndarray | None):
        """Bool [K, N]: would a question exit at layer k (``entropy`` computed with ``self.rule``)."""
        if self.no_answer_margin is not None and null_diff is None:
            raise ValueError("no_answer_margin is set: pass per_layer_null_diff")
        null_threshold = self.null_threshold
        if isinstance(null_threshold, tuple):
            null_threshold = np.asarray(null_threshold, dtype=np.float64)[: np.shape(entropy)[0], None]
        return exit_confidence(entropy, self.threshold, null_diff, null_threshold, self.no_answer_margin)


@dataclass(frozen=True)
class PatiencePolicy:
    """Exit when the best span has been the same for ``patience`` consecutive layers.

    PABEE's counter counts *repeats*, so its patience t equals ``patience = t + 1`` here;
    ``patience = 1`` exits at layer 1.
    """

    patience: int

    def __post_init__(self) -> None:
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"patience must be an integer ≥ 1, got {self.patience}")

    def decide(self, layer_outputs: Sequence[LayerOutput]) -> ExitDecision | None:
        last = tuple(layer_outputs[-1].best_span)
        run = 0
        for out in reversed(layer_outputs):
            if tuple(out.best_span) != last:
                break
            run += 1
        if run < self.patience:
            return None
        return ExitDecision(layer_outputs[-1].layer, f"same span for {run} layers", layer_outputs[-1])

    def exit_conditions(self, entropy: np.ndarray, span: np.ndarray | None, null_diff: np.ndarray | None):
        if span is None:
            raise ValueError("PatiencePolicy needs per_layer_span [K, N, 2]")
        span = np.asarray(span)
        run = np.ones(span.shape[:2], dtype=np.int64)
        for k in range(1, span.shape[0]):
            same = np.all(span[k] == span[k - 1], axis=-1)
            run[k] = np.where(same, run[k - 1] + 1, 1)
        return run >= self.patience


@dataclass(frozen=True)
class NeverExit:
    """Never exit early: run every edge layer (full depth, or offload after the last one)."""

    def decide(self, layer_outputs: Sequence[LayerOutput]) -> ExitDecision | None:
        return None

    def exit_conditions(self, entropy: np.ndarray, span: np.ndarray | None, null_diff: np.ndarray | None):
        return np.zeros(np.shape(entropy), dtype=bool)


@dataclass(frozen=True)
class CombinedPolicy:
    """Exit as soon as any of the policies would (checked in order; the first names the reason)."""

    any_of: tuple[Any, ...]

    def __init__(self, any_of: Sequence[Any]) -> None:
        if not any_of:
            raise ValueError("CombinedPolicy needs at least one policy")
        object.__setattr__(self, "any_of", tuple(any_of))

    def decide(self, layer_outputs: Sequence[LayerOutput]) -> ExitDecision | None:
        for policy in self.any_of:
            decision = policy.decide(layer_outputs)
            if decision is not None:
                return ExitDecision(
                    decision.layer, f"{type(policy).__name__}: {decision.reason}", decision.output
                )
        return None

    def exit_conditions(self, entropy: np.ndarray, span: np.ndarray | None, null_diff: np.ndarray | None):
        conds = [_conditions(p, entropy, span, null_diff) for p in self.any_of]
        return np.logical_or.reduce(conds)


def policy_from_params(params: Mapping[str, Any]) -> Any:
    """A policy from a plain dict (notebook parameters, the edge bundle's JSON).

    Keys: ``threshold`` (+ ``rule``, ``no_answer_margin``, ``null_threshold``) for an
    EntropyPolicy, ``patience`` for a PatiencePolicy; both → exit when either would;
    neither → NeverExit.
    """
    known = {"threshold", "rule", "no_answer_margin", "null_threshold", "patience"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown policy parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    policies: list[Any] = []
    if params.get("threshold") is not None:
        entropy_keys = ("rule", "no_answer_margin", "null_threshold")
        extra = {k: params[k] for k in entropy_keys if params.get(k) is not None}
        policies.append(EntropyPolicy(float(params["threshold"]), **extra))
    if params.get("patience") is not None:
        policies.append(PatiencePolicy(int(params["patience"])))
    if not policies:
        return NeverExit()
    return policies[0] if len(policies) == 1 else CombinedPolicy(any_of=policies)


def simulate_exits(
    per_layer_entropy: np.ndarray,
    per_layer_span: np.ndarray | None,
    policy_params: Any,
    per_layer_null_diff: np.ndarray | None = None,
) -> np.ndarray:
    """Exit layer [N] of every question under a policy, from per-layer arrays [K, N].

    Values 1..K are exits; ``K + 1`` means no layer decided: not solved on the edge, the
    question is offloaded (or answered by layer K where there is no server).
    ``policy_params`` is a policy object or a ``policy_from_params`` dict. Policies without
    ``exit_conditions`` are replayed question by question through ``decide``.
    """
    entropy = np.asarray(per_layer_entropy, dtype=np.float64)
    if entropy.ndim != 2:
        raise ValueError(f"per_layer_entropy must be [K, N], got shape {entropy.shape}")
    span = None if per_layer_span is None else np.asarray(per_layer_span)
    if span is not None and span.shape != entropy.shape + (2,):
        raise ValueError(f"per_layer_span must be [K, N, 2] = {entropy.shape + (2,)}, got {span.shape}")
    diff = None if per_layer_null_diff is None else np.asarray(per_layer_null_diff, dtype=np.float64)
    if diff is not None and diff.shape != entropy.shape:
        raise ValueError(f"per_layer_null_diff must be [K, N] = {entropy.shape}, got {diff.shape}")
    policy = policy_from_params(policy_params) if isinstance(policy_params, Mapping) else policy_params
    return first_exit_layer(_conditions(policy, entropy, span, diff))


def first_exit_layer(conditions: np.ndarray) -> np.ndarray:
    """1-based first True layer per column of a bool [K, N] table; K + 1 where none."""
    cond = np.asarray(conditions, dtype=bool)
    return np.where(cond.any(axis=0), cond.argmax(axis=0) + 1, cond.shape[0] + 1)


def _conditions(policy: Any, entropy: np.ndarray, span: np.ndarray | None, diff: np.ndarray | None):
    if hasattr(policy, "exit_conditions"):
        cond = np.asarray(policy.exit_conditions(entropy, span, diff), dtype=bool)
        return np.broadcast_to(cond, entropy.shape)
    if not isinstance(policy, ExitPolicy):
        raise TypeError(f"{type(policy).__name__} is not an exit policy (it has no decide method)")
    return _replay(policy, entropy, span, diff)


def _replay(policy: ExitPolicy, entropy: np.ndarray, span: np.ndarray | None, diff: np.ndarray | None):
    """Conditions of a policy that only has ``decide``: replay each question layer by layer."""
    k_layers, n = entropy.shape
    cond = np.zeros((k_layers, n), dtype=bool)
    for q in range(n):
        outs: list[LayerOutput] = []
        for k in range(k_layers):
            s = NO_SPAN if span is None else (int(span[k, q, 0]), int(span[k, q, 1]))
            d = None if diff is None else float(diff[k, q])
            outs.append(LayerOutput(k + 1, None, None, float(entropy[k, q]), s, null_diff=d))
            if policy.decide(outs) is not None:
                cond[k, q] = True
                break
    return cond
