"""Early exit for extractive QA: span entropy, exit policies, calibration, entropy predictor.

Pure NumPy (no Keras), so the same code decides exits in training notebooks and in the
edge runtime.
"""

from elma_utils.early_exit.calibration import (
    SweepPoint,
    ThresholdSweep,
    choose_threshold,
    layerwise_question_stats,
    plot_exit_histogram,
    plot_f1_vs_exit_layer,
    plot_f1_vs_latency,
    sweep_exit_layers,
    sweep_thresholds,
)
from elma_utils.early_exit.entropy import (
    aggregate_by_example,
    answer_space,
    best_span,
    exit_confidence,
    masked_normalised_entropy,
    no_answer_margin,
    question_no_answer_margin,
    settled_no_answer,
    span_entropy,
)
from elma_utils.early_exit.oracle import oracle_exit_bound
from elma_utils.early_exit.policies import (
    NO_SPAN,
    CombinedPolicy,
    EntropyPolicy,
    ExitDecision,
    ExitPolicy,
    LayerOutput,
    NeverExit,
    PatiencePolicy,
    first_exit_layer,
    policy_from_params,
    simulate_exits,
)
from elma_utils.early_exit.predictor import EntropyExitPredictor, evaluate_predictor

__all__ = [
    "NO_SPAN",
    "CombinedPolicy",
    "EntropyExitPredictor",
    "EntropyPolicy",
    "ExitDecision",
    "ExitPolicy",
    "LayerOutput",
    "NeverExit",
    "PatiencePolicy",
    "SweepPoint",
    "ThresholdSweep",
    "aggregate_by_example",
    "answer_space",
    "best_span",
    "choose_threshold",
    "evaluate_predictor",
    "exit_confidence",
    "first_exit_layer",
    "layerwise_question_stats",
    "masked_normalised_entropy",
    "no_answer_margin",
    "oracle_exit_bound",
    "plot_exit_histogram",
    "plot_f1_vs_exit_layer",
    "plot_f1_vs_latency",
    "policy_from_params",
    "question_no_answer_margin",
    "settled_no_answer",
    "simulate_exits",
    "span_entropy",
    "sweep_exit_layers",
    "sweep_thresholds",
]
