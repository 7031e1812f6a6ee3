"""Adaptive compute for extractive QA: early exit (depth) and skimming the passage (width).

Exported here: span entropy, exit policies, calibration, the entropy predictor, the skim
head and its keep rule, and the cross-fitted calibration of tau with E_T. These names need
only NumPy (no Keras, no TensorFlow), so the same code decides exits and skims in training
notebooks and in the Keras-free edge runtime. The Keras parts are submodules imported by
name: ``experiment`` (training and measuring exits), ``runtime`` (``EarlyExitRunner``) and
``skim_model`` (training a skim head, skimmed layerwise dev stats).
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
from elma_utils.early_exit.skim import (
    SkimHead,
    fit_skim_probe,
    keep_positions,
    kept_share,
    scatter_logits,
    skim_targets,
)
from elma_utils.early_exit.skim_calibration import bench_settings, cross_fitted_adaptive, question_costs

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
    "SkimHead",
    "SweepPoint",
    "ThresholdSweep",
    "aggregate_by_example",
    "answer_space",
    "bench_settings",
    "best_span",
    "choose_threshold",
    "cross_fitted_adaptive",
    "evaluate_predictor",
    "exit_confidence",
    "first_exit_layer",
    "fit_skim_probe",
    "keep_positions",
    "kept_share",
    "layerwise_question_stats",
    "masked_normalised_entropy",
    "no_answer_margin",
    "oracle_exit_bound",
    "plot_exit_histogram",
    "plot_f1_vs_exit_layer",
    "plot_f1_vs_latency",
    "policy_from_params",
    "question_costs",
    "question_no_answer_margin",
    "scatter_logits",
    "settled_no_answer",
    "simulate_exits",
    "skim_targets",
    "span_entropy",
    "sweep_exit_layers",
    "sweep_thresholds",
]
