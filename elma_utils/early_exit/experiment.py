"""Train exit heads on a fine-tuned model and measure early exit on a dev set.

    exits_dir = train_exits("artifacts/minilm-cpu", mode="distill")
    stats = layerwise_dev_stats(exits_dir, "1.1")        # per layer × question: entropy, F1
    sweep = sweep_thresholds(stats["f1"], stats["entropy"], layer_latency_ms=...)

The exits artifact (``<full>-exits-<mode>/``) holds the whole multi-exit network (backbone
shared with the full model, plus one head per layer) and ``exits.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from elma_utils import config as cfg
from elma_utils.early_exit.exits_artifact import (
    EXITS_CONFIG,
    EXITS_WEIGHTS,
    full_model_entry,
    full_model_path,
)
from elma_utils.model import artifacts
from elma_utils.model.exit_training import fit_exit_heads, predict_exit_logits
from elma_utils.model.multi_exit import MultiExitQAModel
from elma_utils.model.precision import set_policy, training_policy

CHECKPOINT_DIR = "checkpoint"  # train_exits(checkpoint_every=...): removed once the artifact is written


def train_exits(
    full_model_dir: Path,
    mode: str = "distill",
    *,
    profile: cfg.Profile | None = None,
    epochs: float = 0.5,
    learning_rate: float = 5e-4,
    out_dir: Path | None = None,
    data_dir: Path | None = None,
    init_exits: Path | None = None,
    hard_negative_ratio: float = 0.0,
    checkpoint_every: int | None = None,
    verbose: int | str = "auto",
) -> Path:
    """Fit one exit head per layer of ``full_model_dir``'s model; returns the exits artifact.

    ``init_exits``: start from another exits artifact's weights (e.g. ``joint_distill``
    continuing from ``distill``) instead of fresh heads on the fine-tuned model.
    ``hard_negative_ratio``: add that many hard made-up unanswerable questions per answerable
    one (``squad.hard_negatives``), so that modes that train the backbone learn SQuAD 2.0's
    on-topic "no answer" too. ``checkpoint_every``: checkpoint every that many steps in
    ``<out>/checkpoint/`` and resume there (a long run, e.g. an epoch of ``joint_distill``)."""
    from elma_utils.model.finetune import training_examples
    from elma_utils.squad.features import cached_features

    full_model_dir = Path(full_model_dir)
    out = Path(out_dir or full_model_dir.parent / f"{full_model_dir.name}-exits-{mode}")
    if (out / EXITS_WEIGHTS).is_file():
        return out
    span, tokenizer, config = artifacts.load_span_model(full_model_dir)
    profile = profile or cfg.Profile(**config["profile"])
    if hard_negative_ratio > 0:
        profile = dataclasses.replace(profile, hard_negative_ratio=hard_negative_ratio)
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
        if init_exits is not None:
            multi.load_weights(Path(init_exits) / EXITS_WEIGHTS)
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
            checkpoint_dir=out / CHECKPOINT_DIR if checkpoint_every else None,
            checkpoint_every=checkpoint_every or 100,
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
                **full_model_entry(full_model_dir, out),
                "mode": mode,
                "num_exits": multi.num_exits,
                "train": stats,
                "epochs": epochs,
                "learning_rate": learning_rate,
                "init_exits": str(init_exits) if init_exits else None,
                "hard_negative_ratio": hard_negative_ratio,
            },
            indent=2,
        )
    )
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return out


def train_exits_for_profile(
    full_model_dir: Path, mode: str, profile: cfg.Profile, data_dir: Path | None = None, verbose=0
) -> Path:
    """``train_exits`` with the profile's settings for ``mode``; ``joint_distill`` starts from
    the ``distill`` exits (trained first when missing), with the backbone's learning rate."""
    if mode != "joint_distill":
        return train_exits(full_model_dir, mode, profile=profile, epochs=profile.exit_epochs, data_dir=data_dir,
                           verbose=verbose)  # fmt: skip
    distill = train_exits_for_profile(full_model_dir, "distill", profile, data_dir, verbose)
    return train_exits(
        full_model_dir,
        mode,
        profile=profile,
        epochs=profile.joint_distill_epochs,
        learning_rate=profile.joint_distill_learning_rate,
        init_exits=distill,
        hard_negative_ratio=profile.hard_negative_ratio,
        checkpoint_every=profile.checkpoint_every,
        data_dir=data_dir,
        verbose=verbose,
    )


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
    full = full_model_path(exits_dir, ecfg)
    if not (full / artifacts.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{exits_dir}'s full model {full} is missing: move or copy it beside the exits "
                                f"(as {ecfg['full_model']!r} names it)")  # fmt: skip
    multi, tokenizer, config = load_exits_model_from(full, ecfg["num_exits"])
    multi.load_weights(exits_dir / EXITS_WEIGHTS)
    return multi, tokenizer, config, ecfg


def dev_questions(version: str, n_questions: int | None = None, data_dir: Path | None = None):
    """(dataset, examples): all dev questions, or ``n_questions`` spread evenly over the file
    (so that every article is represented and article-level halves are possible)."""
    from elma_utils.squad.data import load_squad

    ds = load_squad(version, "dev", data_dir=data_dir)
    if n_questions is None or n_questions >= len(ds.examples):
        return ds, ds.examples
    by_title: dict[str, list[int]] = {}
    for i, e in enumerate(ds.examples):
        by_title.setdefault(e.title, []).append(i)
    share = n_questions / len(ds.examples)
    picked: list[int] = []
    for rows in by_title.values():  # every article, in proportion to its size
        take = max(1, round(share * len(rows)))
        picked.extend(rows[j] for j in np.linspace(0, len(rows) - 1, take).round().astype(int))
    return ds, [ds.examples[i] for i in sorted(set(picked))]


def layerwise_dev_stats(
    exits_dir: Path,
    version: str = "1.1",
    n_questions: int | None = None,
    data_dir: Path | None = None,
    rule: str = "max",
) -> dict:
    """Per-layer, per-question entropy / F1 / spans of dev questions (``dev_questions``),
    cached as npz next to the exits."""
    from elma_utils.early_exit.calibration import layerwise_question_stats
    from elma_utils.squad.features import build_features

    exits_dir = Path(exits_dir)
    cache = exits_dir / f"layerwise-dev-v{version}-{n_questions or 'all'}-{rule}.npz"
    if cache.is_file():
        with np.load(cache) as d:
            return {k: d[k] for k in d.files}
    multi, tokenizer, config, _ = load_exits(exits_dir)
    ds, examples = dev_questions(version, n_questions, data_dir)
    feats = build_features(
        examples, tokenizer, config["max_seq_len"], config["doc_stride"], config["max_query_len"]
    )
    start, end = predict_exit_logits(multi, feats)
    stats = layerwise_question_stats(
        examples, feats, start.transpose(1, 0, 2), end.transpose(1, 0, 2), ds.raw, version, rule=rule
    )
    arrays = {k: np.asarray(v) for k, v in stats.items() if k != "predictions"}
    np.savez(cache, **arrays)
    return arrays


def cross_fitted_exit(
    stats: dict,
    titles: list[str],
    max_f1_loss: float = 1.0,
    seed: int = 0,
    layer_latency_ms: np.ndarray | None = None,
    reference_f1: np.ndarray | None = None,
) -> dict:
    """Choose E_T on one half of the articles, apply it to the other half, and vice versa.

    ``reference_f1`` [N] (0..1): the per-question F1 the early exit must stay within
    ``max_f1_loss`` of — the full (server) model's; default: this model's last layer. When
    no E_T reaches that on a tuning half (an edge model weaker than the reference at every
    depth), the E_T with the best F1 there is used and ``within_target_on_tuning_halves`` is
    False.

    Returns the held-out F1, average exit layer and share that no layer settles, with the
    per-question exit layers (K + 1: not settled; those are answered by the last layer here,
    i.e. the full model without offloading).
    """
    from elma_utils.early_exit.calibration import choose_threshold, sweep_thresholds
    from elma_utils.early_exit.policies import simulate_exits

    f1, entropy = np.asarray(stats["f1"]), np.asarray(stats["entropy"])
    k, n = f1.shape
    unique = sorted(set(titles))
    rng = np.random.default_rng(seed)
    half = set(rng.permutation(unique)[: len(unique) // 2].tolist())
    in_a = np.array([t in half for t in titles])
    exit_layer = np.zeros(n, dtype=int)
    threshold_of = np.zeros(n)
    thresholds = []
    ref = f1[-1] if reference_f1 is None else np.asarray(reference_f1, dtype=np.float64)
    within_target = True
    for tune in (in_a, ~in_a):
        sweep = sweep_thresholds(
            f1[:, tune], entropy[:, tune], layer_latency_ms, reference_f1=100 * float(ref[tune].mean())
        )
        try:
            chosen = choose_threshold(sweep, max_f1_loss)
        except ValueError:  # no E_T keeps F1 within the target on this half: take the best F1 one
            chosen = sweep.point(int(np.argmax(sweep.f1)))
            within_target = False
        thresholds.append(chosen.value)
        exit_layer[~tune] = simulate_exits(entropy[:, ~tune], None, {"threshold": chosen.value})
        threshold_of[~tune] = chosen.value
    layer_used = np.minimum(exit_layer, k)
    got = f1[layer_used - 1, np.arange(n)]
    return {
        "thresholds": thresholds,
        "f1": float(100 * got.mean()),
        "full_depth_f1": float(100 * f1[-1].mean()),
        "reference_f1": float(100 * ref.mean()),
        "within_target_on_tuning_halves": within_target,
        "f1_loss": float(100 * (ref.mean() - got.mean())),
        "avg_exit_layer": float(layer_used.mean()),
        "share_not_settled": float(np.mean(exit_layer > k)),
        "exit_layer_histogram": np.bincount(exit_layer, minlength=k + 2)[1:].tolist(),
        "exit_layers": exit_layer,
        "threshold_per_question": threshold_of,
    }


def layer_latency_ms(multi: MultiExitQAModel, seq_len: int = 384, runs: int = 20) -> dict:
    """Batch-1 latency of the embeddings and of each layer with its exit head (median, ms)."""
    from elma_utils.early_exit.policies import NeverExit
    from elma_utils.early_exit.runtime import EarlyExitRunner

    runner = EarlyExitRunner(multi, NeverExit())
    ids = np.random.default_rng(0).integers(1000, 20000, (1, seq_len)).astype("int32")
    seg = np.zeros_like(ids)
    seg[:, 32:] = 1
    pad = np.ones_like(ids)

    def median(fn):
        fn()
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1000)

    x = runner._embed(ids, seg)
    embed_ms = median(lambda: np.asarray(runner._embed(ids, seg)))
    layers = [median(lambda f=f: np.asarray(f(x, pad, seg)[1])) for f in runner._layers]
    return {"seq_len": seq_len, "embeddings_ms": embed_ms, "layer_ms": layers}


def main(argv: list[str] | None = None) -> int:
    """``python -m elma_utils.early_exit.experiment --full DIR --mode MODE [--epochs E]``: train
    exits outside the notebooks, checkpointed and resumable (e.g. a whole epoch of
    ``joint_distill`` in the background), with the full model's profile for everything else."""
    import argparse

    from elma_utils.model.multi_exit import EXIT_MODES

    p = argparse.ArgumentParser(description="train the exits of a fine-tuned model (resumable)")
    p.add_argument("--full", type=Path, required=True, help="fine-tuned full-model artifact (notebook 02)")
    p.add_argument("--mode", choices=EXIT_MODES, default="joint_distill")
    p.add_argument("--epochs", type=float, default=None, help="default: the profile's for the mode")
    p.add_argument("--learning-rate", type=float, default=None, help="default: the profile's for the mode")
    p.add_argument("--init-exits", type=Path, default=None,
                   help="start from these exits (joint_distill default: <full>-exits-distill)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="default: <full>-exits-<mode>")
    p.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps per checkpoint (default: the profile's)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    if not (args.full / artifacts.CONFIG_FILE).is_file():
        p.error(f"{args.full} is no full-model artifact (no {artifacts.CONFIG_FILE}): run notebook 02 first")
    if args.epochs is not None and args.epochs <= 0:
        p.error("--epochs must be > 0")
    profile = cfg.Profile(**json.loads((args.full / artifacts.CONFIG_FILE).read_text())["profile"])
    joint = args.mode == "joint_distill"
    init = args.init_exits or (args.full.parent / f"{args.full.name}-exits-distill" if joint else None)
    if init is not None and not (init / EXITS_WEIGHTS).is_file():
        p.error(f"no exits to start from at {init}: train them first (--mode distill) or name --init-exits")
    epochs = args.epochs or (profile.joint_distill_epochs if joint else profile.exit_epochs)
    rate = args.learning_rate or (profile.joint_distill_learning_rate if joint else 5e-4)
    out = train_exits(args.full, args.mode, profile=profile, epochs=epochs, learning_rate=rate, out_dir=args.out,
                      data_dir=args.data_dir, init_exits=init, hard_negative_ratio=profile.hard_negative_ratio,
                      checkpoint_every=args.checkpoint_every or profile.checkpoint_every)  # fmt: skip
    print(f"exits: {out} ({args.mode}, {epochs:g} epochs from {init or 'fresh heads'})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
