"""The `elma train` job: SQuAD examples → features → fine-tuned span model artifact."""

from __future__ import annotations

import platform
import random
import shutil
import time
from pathlib import Path

import keras

from elma_utils import config as cfg
from elma_utils.model import artifacts
from elma_utils.model.precision import set_policy, training_policy
from elma_utils.model.qa_model import SpanQAModel
from elma_utils.model.training import fit_span_model
from elma_utils.squad.data import SquadExample, load_squad, make_unanswerable
from elma_utils.squad.features import cached_features, span_recovery_rate


def training_examples(profile: cfg.Profile, data_dir: Path | None = None) -> list[SquadExample]:
    """SQuAD train questions of the profile's ``train_version`` (a seeded random subset when the
    profile says so), plus made-up unanswerable ones: another paragraph of the article
    (``v2_unanswerable_ratio``) and the own paragraph without its answer sentence
    (``hard_negative_ratio``), both made from the answerable questions."""
    examples = load_squad(profile.train_version, "train", data_dir=data_dir).examples
    if profile.train_examples is not None and profile.train_examples < len(examples):
        rng = random.Random(profile.seed)
        keep = sorted(rng.sample(range(len(examples)), profile.train_examples))
        examples = [examples[i] for i in keep]
    made = []
    if profile.v2_unanswerable_ratio > 0:
        made += make_unanswerable(examples, profile.v2_unanswerable_ratio, seed=profile.seed)
    if profile.hard_negative_ratio > 0:  # on-topic negatives: the answer sentence cut out
        from elma_utils.squad.hard_negatives import make_hard_unanswerable

        made += make_hard_unanswerable(examples, profile.hard_negative_ratio, seed=profile.seed)
    return examples + made


def held_back_examples(profile: cfg.Profile, n: int, data_dir: Path | None = None, seed: int = 0) -> list:
    """``n`` SQuAD train questions (of the profile's ``train_version``) the profile did *not*
    train on (seeded sample of the complement of ``training_examples``): fresh questions a
    device can ask in a data-growth experiment without the models having seen them."""
    examples = load_squad(profile.train_version, "train", data_dir=data_dir).examples
    if not _trains_on_a_subset(profile, examples):
        raise ValueError(f"profile {profile.name!r} trains on every train question: none is held back")
    return _held_back(profile, examples, n, seed)


def _trains_on_a_subset(profile: cfg.Profile, train: list[SquadExample]) -> bool:
    return profile.train_examples is not None and profile.train_examples < len(train)


def _held_back(profile: cfg.Profile, train: list[SquadExample], n: int, seed: int) -> list[SquadExample]:
    """Seeded sample of the train questions ``training_examples`` left out."""
    used = set(random.Random(profile.seed).sample(range(len(train)), profile.train_examples))
    rest = [i for i in range(len(train)) if i not in used]
    return [train[i] for i in sorted(random.Random(seed).sample(rest, min(n, len(rest))))]


def fresh_questions(
    profile: cfg.Profile, n: int, data_dir: Path | None = None, *, seed: int = 0, dev_held_out: int = 0
) -> list[SquadExample]:
    """``n`` questions no model of ``profile`` trained on, for a device to ask in a data-growth
    experiment: held-back train questions (``held_back_examples``) when the profile trains on
    a subset; when it trains on every train question (``full``), dev-v1.1 questions from
    articles other than those of the first ``dev_held_out`` dev questions, which stay free
    for held-out evaluation."""
    train = load_squad(profile.train_version, "train", data_dir=data_dir).examples
    if _trains_on_a_subset(profile, train):
        return _held_back(profile, train, n, seed)
    dev = load_squad("1.1", "dev", data_dir=data_dir).examples
    reserved = {e.title for e in dev[:dev_held_out]}
    rest = [e for e in dev if e.title not in reserved]
    pick = sorted(random.Random(seed).sample(range(len(rest)), min(n, len(rest))))
    return [rest[i] for i in pick]


def finetune(
    profile: cfg.Profile,
    name: str | None = None,
    *,
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    precision: str = "auto",
    verbose: int | str = "auto",
) -> Path:
    """Train (or resume, or skip when finished) the full QA model; returns its artifact dir."""
    name = name or cfg.full_model_dir(profile).name
    out = Path(out_dir or cfg.artifacts_dir() / name)
    if (out / artifacts.WEIGHTS_FILE).is_file():
        print(f"{out} is already trained; delete it (or pass another --name) to train again")
        return out
    policy = training_policy(precision)
    previous_policy = keras.mixed_precision.global_policy().name
    set_policy(policy)
    try:
        return _train_and_save(profile, name, out, policy, data_dir, verbose)
    finally:
        set_policy(previous_policy)


def _train_and_save(profile: cfg.Profile, name: str, out: Path, policy: str, data_dir, verbose) -> Path:
    keras.utils.set_random_seed(profile.seed)
    # the backbone first: weights that cannot be had (a preset offline) fail before feature work
    backbone, kwargs = artifacts.build_backbone(profile.backbone, source=profile.backbone_source)
    if profile.max_seq_len > backbone.max_sequence_length:
        raise ValueError(
            f"max_seq_len={profile.max_seq_len} exceeds the backbone's {backbone.max_sequence_length} positions; "
            "use a profile with a shorter max_seq_len"
        )
    tokenizer = artifacts.tokenizer_for(profile.backbone)
    examples = training_examples(profile, data_dir)
    t0 = time.time()
    feats = cached_features(
        examples,
        tokenizer,
        cfg.cache_dir(),
        max_seq_len=profile.max_seq_len,
        doc_stride=profile.doc_stride,
        max_query_len=profile.max_query_len,
    )
    feature_seconds = time.time() - t0
    recovery = span_recovery_rate(examples, feats)
    print(
        f"{len(examples)} examples → {len(feats)} features; labelled spans recovered: {recovery['rate']:.4f}"
    )

    model = SpanQAModel(backbone)
    model.build_for()
    out.mkdir(parents=True, exist_ok=True)
    train_stats = fit_span_model(
        model,
        feats,
        batch_size=profile.batch_size,
        epochs=profile.epochs,
        learning_rate=profile.learning_rate,
        warmup_fraction=profile.warmup_fraction,
        weight_decay=profile.weight_decay,
        checkpoint_every=profile.checkpoint_every,
        checkpoint_dir=out / "checkpoints",
        seed=profile.seed,
        log_csv=out / "train_log.csv",
        verbose=verbose,
    )
    set_policy("float32")  # saved weights and the artifact's model are float32
    config = {
        "name": name,
        "backbone": {"kind": artifacts.backbone_family(profile.backbone), "kwargs": kwargs},
        "source": profile.backbone_source or profile.backbone,
        "max_seq_len": profile.max_seq_len,
        "doc_stride": profile.doc_stride,
        "max_query_len": profile.max_query_len,
        "profile": profile.to_dict(),
        "trained_with": {
            "keras_backend": keras.backend.backend(),
            "keras": keras.__version__,
            "policy": policy,
            "python": platform.python_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    artifacts.save_artifact(out, model, tokenizer, config)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the finished weights supersede them
    artifacts.update_metrics(
        out,
        "train",
        {
            **train_stats,
            "examples": len(examples),
            "unanswerable_examples": sum(e.is_impossible for e in examples),
            "feature_seconds": round(feature_seconds, 1),
            "span_recovery": recovery,
            "parameters": int(model.count_params()),
            "policy": policy,
        },
    )
    return out
