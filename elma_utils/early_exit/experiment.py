"""Train exit heads on a fine-tuned model and measure early exit on a dev set.

    exits_dir = train_exits("artifacts/minilm-cpu", mode="distill")
    stats = layerwise_dev_stats(exits_dir, "1.1")        # per layer × question: entropy, F1
    sweep = sweep_thresholds(stats["f1"], stats["entropy"], layer_latency_ms=...)

The exits artifact (``<full>-exits-<mode>/``) holds the whole multi-exit network (backbone
shared with the full model, plus one head per layer) and ``exits.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np

from elma_utils import config as cfg
from elma_utils.model import artifacts
from elma_utils.model.exit_training import fit_exit_heads, predict_exit_logits
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.precision import set_policy, training_policy

EXITS_CONFIG = "exits.json"
EXITS_WEIGHTS = "exits.weights.h5"


def train_exits(
    full_model_dir: Path,
    mode: str = "distill",
    *,
    profile: cfg.Profile | None = None,
    epochs: float = 0.5,
    learning_rate: float = 5e-4,
    out_dir: Path | None = None,
    data_dir: Path | None = None,
    verbose: int | str = "auto",
) -> Path:
    """Fit one exit head per layer of ``full_model_dir``'s model; returns the exits artifact."""
    from elma_utils.model.finetune import training_examples
    from elma_utils.squad.features import cached_features

    full_model_dir = Path(full_model_dir)
    out = Path(out_dir or full_model_dir.parent / f"{full_model_dir.name}-exits-{mode}")
    if (out / EXITS_WEIGHTS).is_file():
        return out
    span, tokenizer, config = artifacts.load_span_model(full_model_dir)
    profile = profile or cfg.Profile(**config["profile"])
    examples = training_examples(profile, data_dir)
    feats = cached_features(
        examples,
        tokenizer,
        cfg.cache_dir(),
        max_seq_len=config["max_seq_len"],
        doc_stride=config["doc_stride"],
        max_query_len=config["max_query_len"],
    )
    previous = keras.mixed_precision.global_policy().name
    set_policy(training_policy("auto"))
    try:
        multi = MultiExitQAModel.from_span_model(span)
        t0 = time.time()
        stats = fit_exit_heads(
            multi,
            feats,
            mode=mode,
            batch_size=profile.batch_size,
            epochs=epochs,
            learning_rate=learning_rate,
            log_csv=None,
            verbose=verbose,
        )
        stats["seconds"] = round(time.time() - t0, 1)
    finally:
        set_policy(previous)
    out.mkdir(parents=True, exist_ok=True)
    weights = [w for w in multi.get_weights()]
    clean, _, _ = load_exits_model_from(full_model_dir, multi.num_exits)
    clean.set_weights(weights)
    clean.save_weights(out / EXITS_WEIGHTS)
    (out / EXITS_CONFIG).write_text(
        json.dumps(
            {
                "full_model": str(full_model_dir),
                "mode": mode,
                "num_exits": multi.num_exits,
                "train": stats,
                "epochs": epochs,
                "learning_rate": learning_rate,
            },
            indent=2,
        )
    )
    return out


def load_exits_model_from(full_model_dir: Path, num_exits: int | None = None):
    span, tokenizer, config = artifacts.load_span_model(Path(full_model_dir))
    return MultiExitQAModel.from_span_model(span, num_exits), tokenizer, config


def load_exits(exits_dir: Path):
    """(MultiExitQAModel with trained exits, tokenizer, full model config, exits config)."""
    exits_dir = Path(exits_dir)
    ecfg_path = exits_dir / EXITS_CONFIG
    if not ecfg_path.is_file():
        raise FileNotFoundError(f"{exits_dir} holds no {EXITS_CONFIG}: train exits with train_exits() first")
    ecfg = json.loads(ecfg_path.read_text())
    multi, tokenizer, config = load_exits_model_from(Path(ecfg["full_model"]), ecfg["num_exits"])
    multi.load_weights(exits_dir / EXITS_WEIGHTS)
    return multi, tokenizer, config, ecfg


def layerwise_dev_stats(
    exits_dir: Path,
    version: str = "1.1",
    limit: int | None = None,
    data_dir: Path | None = None,
    rule: str = "max",
) -> dict:
    """Per-layer, per-question entropy / F1 / spans of a dev set, cached as npz next to the exits."""
    from elma_utils.early_exit.calibration import layerwise_question_stats
    from elma_utils.squad.data import load_squad
    from elma_utils.squad.features import build_features

    exits_dir = Path(exits_dir)
    cache = exits_dir / f"layerwise-dev-v{version}-{limit or 'all'}-{rule}.npz"
    if cache.is_file():
        with np.load(cache) as d:
            return {k: d[k] for k in d.files}
    multi, tokenizer, config, _ = load_exits(exits_dir)
    ds = load_squad(version, "dev", data_dir=data_dir, limit=limit)
    feats = build_features(
        ds.examples, tokenizer, config["max_seq_len"], config["doc_stride"], config["max_query_len"]
    )
    start, end = predict_exit_logits(multi, feats)
    stats = layerwise_question_stats(
        ds.examples, feats, start.transpose(1, 0, 2), end.transpose(1, 0, 2), ds.raw, version, rule=rule
    )
    arrays = {k: np.asarray(v) for k, v in stats.items() if k != "predictions"}
    np.savez(cache, **arrays)
    return arrays
