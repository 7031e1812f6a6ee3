"""Profiles (smoke / cpu / full, and their ALBERT twins), paths and environment variables.

One place decides how big a run is, so notebooks, the CLI and tests agree on it.
Environment variables override paths: ``ELMA_DATA_DIR`` (SQuAD json files),
``ELMA_ARTIFACTS_DIR`` (trained models), ``ELMA_REPORTS_DIR`` (reports/),
``ELMA_PROFILE`` (default profile name), ``ELMA_BACKBONE_SOURCE`` (ALBERT weights for a
profile with a pretrained ALBERT backbone: a preset, Google checkpoint or TF-Hub module;
``elma pipeline --backbone-source`` sets it for the notebooks).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = PROJECT_ROOT.parent / "shared"
DEFAULT_PROFILE = "cpu"


def data_dir() -> Path:
    """SQuAD directory: $ELMA_DATA_DIR, else ../shared/data/squad, else data/squad."""
    env = os.environ.get("ELMA_DATA_DIR")
    if env:
        return Path(env)
    shared = SHARED_DIR / "data" / "squad"
    if shared.is_dir():
        return shared
    return PROJECT_ROOT / "data" / "squad"


def albert_spm_path() -> Path:
    """ALBERT's 30k SentencePiece model: $ELMA_ALBERT_SPM, else ../shared/data/albert/30k-clean.model."""
    env = os.environ.get("ELMA_ALBERT_SPM")
    if env:
        return Path(env)
    return SHARED_DIR / "data" / "albert" / "30k-clean.model"


def artifacts_dir() -> Path:
    return Path(os.environ.get("ELMA_ARTIFACTS_DIR", PROJECT_ROOT / "artifacts"))


def reports_dir() -> Path:
    return Path(os.environ.get("ELMA_REPORTS_DIR", PROJECT_ROOT / "reports"))


def cache_dir() -> Path:
    """Where precomputed features (numpy arrays) are kept between runs."""
    return Path(os.environ.get("ELMA_CACHE_DIR", PROJECT_ROOT / "data" / "cache"))


@dataclasses.dataclass(frozen=True)
class Profile:
    """How big a run is. Every size knob of the pipeline lives here."""

    name: str
    # "minilm" (pretrained weights), "tiny-bert" / "tiny-albert" (random, for smoke) or "albert"
    backbone: str
    max_seq_len: int
    doc_stride: int
    max_query_len: int
    train_examples: int | None  # None = every train question
    eval_examples: int | None  # None = the whole dev file
    batch_size: int
    learning_rate: float
    warmup_fraction: float
    weight_decay: float
    epochs: float
    v2_unanswerable_ratio: float  # made-up unanswerable examples per answerable one (v2 training)
    checkpoint_every: int  # optimizer steps between resumable checkpoints
    eval_batch_size: int = 64
    seed: int = 13
    backbone_source: str | None = None  # ALBERT weights: preset name, Google checkpoint or TF-Hub module
    exit_epochs: float = 0.1  # training of the exit heads (share of an epoch of the train features)
    exit_compare_questions: int = 1000  # dev-v1.1 questions used to compare exit training modes
    # joint_distill: the backbone trains with its exits, warm-started from the distill exits
    joint_distill_epochs: float = 0.5
    joint_distill_learning_rate: float = 3e-5
    hard_negative_ratio: float = 0.0  # hard made-up unanswerable questions in exit training
    # SQuAD train file: "2.0" brings its real (crowd-written) unanswerable questions, which no
    # made-up negative replaces (needs the official train-v2.0.json: downloaded when online)
    train_version: str = "1.1"
    # notebook 04: the edge bundles against Keras, on whole dev sets, at batch 1
    edge_compare_questions: int = 300  # dev-v1.1 questions comparing precisions with Keras
    edge_eval_examples: int | None = None  # whole-dev bundle evaluation (None = as eval_examples)
    edge_speedup_questions: int = 300  # int8 with early exit against all layers, batch 1
    # notebook 04: adaptive width (``bench.adaptive_run``): candidate skim layers (empty: the
    # depth-only int8 bundle is the one deployed), keep thresholds to calibrate, training windows
    # of each skim head. The chosen bundle (skim + early exit) is then the one notebook 05 deploys.
    skim_layers: tuple[int, ...] = ()
    skim_taus: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85)
    skim_max_windows: int = 4000
    # notebook 04: the device pipeline benchmark (spoken question -> answer, per stage)
    bench_precisions: tuple[str, ...] = ("int8", "float32")
    bench_spoken_questions: int = 30
    bench_typed_questions: int = 0
    bench_runs: int = 3  # timed runs over the questions, after bench_warmup untimed ones
    bench_warmup: int = 2
    # notebook 07: E_T the device answers with while the data set grows (None: the bundle's own;
    # -1 offloads every question, which a random model needs, since it settles everything)
    growth_edge_threshold: float | None = None
    # notebook 07 / bench.growth_rounds: the rounds on a deployment domain (server.deployment_domain
    # DomainSizes, server.growth_rounds RoundsSettings); the defaults are the smoke sizes
    growth_articles: int = 2  # deployment articles (dev-v1.1 articles no model trained on)
    growth_paragraphs_per_article: int | None = 3  # None: every paragraph of a deployment article
    growth_asked_fraction: float = 0.6  # of each deployment article's questions, asked on the device
    growth_rounds: int = 2  # the asked part is cut into this many rounds
    growth_other_questions: int = 16  # other articles' questions measuring forgetting
    growth_calibration_questions: int = 16  # other articles' questions choosing a retrained edge's E_T
    growth_guard_questions: int = 16  # other articles' questions with real labels in the gate
    growth_order: str = "interleaved"  # how an article's questions arrive: "interleaved" or "document"
    # other articles' labelled questions the server prices an offload on (None: every question
    # of the articles the other groups leave over)
    growth_offload_pool_questions: int | None = 16
    growth_replay_questions: int = 16  # original training questions replayed in every retraining
    growth_epochs: float = 1.0  # epochs of each retraining
    # what a round retrains, each from the same start (server.growth_rounds.RETRAIN_TARGETS)
    growth_targets: tuple[str, ...] = ("exits",)
    # notebook 01: questions loaded from each SQuAD file for the checks (None: every one)
    data_check_limit: int | None = None
    # notebook 03: questions timed for the layer-by-layer runtime's speed-up (batch 1)
    exit_speedup_questions: int = 300
    # notebook 05: the E_T sweep, the SSH round trips and the server throughput benchmark
    offload_curve_questions: int = 300  # questions through the device path per E_T of the sweep
    round_trip_lines: int = 300  # pings per way of sending (persistent channel, channel per line, TCP)
    round_trip_new_connection_lines: int = 10  # pings over a new SSH connection each
    throughput_per_client: int = 100  # timed questions per simulated device

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def is_smoke(self) -> bool:
        """A CI profile (``smoke``, ``smoke-albert``): the notebooks take their small samples."""
        return self.name == "smoke" or self.name.startswith("smoke-")

    @property
    def random_weights(self) -> bool:
        """The model is a tiny randomly initialised one: its numbers test the plumbing only."""
        return self.backbone.startswith("tiny-")

    @property
    def model_description(self) -> str:
        """One line for reports: which model this profile trains, and whether it means anything."""
        if self.random_weights:
            kind = self.backbone.removeprefix("tiny-").upper()
            return f"a tiny {kind} with random weights: the numbers check the pipeline, not the model"
        if self.backbone == "albert":
            return f"ALBERT from {self.backbone_source or 'a --backbone-source'}"
        return "MiniLM-L6 (all-MiniLM-L6-v2 weights)" if self.backbone == "minilm" else self.backbone


# The rounds on a deployment domain at the size that measures something (cpu and full): 12
# deployment articles with every paragraph, three rounds, both retraining targets.
REAL_GROWTH_ROUNDS = {
    "growth_articles": 12,
    "growth_paragraphs_per_article": None,
    "growth_asked_fraction": 0.6,
    "growth_rounds": 3,
    "growth_other_questions": 600,
    "growth_calibration_questions": 600,
    "growth_guard_questions": 400,
    "growth_order": "interleaved",
    "growth_offload_pool_questions": None,
    "growth_replay_questions": 1500,
    "growth_epochs": 2.0,
    "growth_targets": ("exits", "exits+layers"),
}

PROFILES: dict[str, Profile] = {
    # CI / nbval: a tiny random BERT and a few dozen questions; the whole pipeline in minutes.
    "smoke": Profile(
        name="smoke",
        backbone="tiny-bert",
        max_seq_len=128,
        doc_stride=64,
        max_query_len=48,
        train_examples=64,
        eval_examples=240,
        batch_size=16,
        learning_rate=1e-3,
        warmup_fraction=0.1,
        weight_decay=0.01,
        epochs=1.0,
        v2_unanswerable_ratio=0.5,
        checkpoint_every=2,
        eval_batch_size=32,
        exit_epochs=1.0,
        exit_compare_questions=120,
        joint_distill_epochs=1.0,
        joint_distill_learning_rate=1e-3,
        edge_compare_questions=12,
        edge_eval_examples=40,
        edge_speedup_questions=20,
        skim_layers=(1,),
        skim_max_windows=64,
        bench_precisions=("float32",),
        bench_spoken_questions=2,
        bench_typed_questions=2,
        bench_runs=2,
        bench_warmup=1,
        growth_edge_threshold=-1.0,
        data_check_limit=400,
        exit_speedup_questions=20,
        offload_curve_questions=8,
        round_trip_lines=30,
        round_trip_new_connection_lines=3,
        throughput_per_client=5,
    ),
    # Real results on 2 CPU cores: MiniLM fine-tuned on a SQuAD v1.1 subset, whole dev sets evaluated.
    "cpu": Profile(
        name="cpu",
        backbone="minilm",
        max_seq_len=384,
        doc_stride=128,
        max_query_len=64,
        train_examples=38000,
        eval_examples=None,
        batch_size=32,
        learning_rate=1.2e-4,
        warmup_fraction=0.1,
        weight_decay=0.01,
        epochs=1.0,
        v2_unanswerable_ratio=0.15,
        checkpoint_every=100,
        # measured on MiniLM's distilled exits (dev-v1.1, held-out halves): after layers 2 and 3
        # no keep threshold stays within 1 F1; after layer 4 width alone gives 1.20x at -0.74
        skim_layers=(4,),
        **REAL_GROWTH_ROUNDS,
    ),
    # Whole SQuAD v1.1 train, several epochs; meant for a GPU machine.
    "full": Profile(
        name="full",
        backbone="minilm",
        max_seq_len=384,
        doc_stride=128,
        max_query_len=64,
        train_examples=None,
        eval_examples=None,
        batch_size=32,
        learning_rate=1e-4,
        warmup_fraction=0.1,
        weight_decay=0.01,
        epochs=3.0,
        v2_unanswerable_ratio=0.0,
        checkpoint_every=500,
        eval_batch_size=256,
        skim_layers=(2, 3, 4),  # the calibration picks the layer (tuning halves only)
        **REAL_GROWTH_ROUNDS,
    ),
}
# The cpu profile plus on-topic made-up negatives (the answer sentence cut out of the own
# paragraph): a SQuAD 2.0-style full model without SQuAD 2.0 training data.
PROFILES["cpu-v2"] = dataclasses.replace(PROFILES["cpu"], name="cpu-v2", hard_negative_ratio=0.3)
# The full profile on SQuAD v2.0 train (130,319 questions, 43,498 unanswerable): the model that
# dev-v2.0 numbers (and the 2021 prototype's 62.1 early-exit F1) call for. GPU machine.
PROFILES["full-v2"] = dataclasses.replace(PROFILES["full"], name="full-v2", train_version="2.0")
# smoke with a tiny random ALBERT (one shared layer, ALBERT's real 30k SentencePiece vocabulary,
# config.albert_spm_path()): the whole pipeline on the ALBERT path (shared-layer export) in CI.
PROFILES["smoke-albert"] = dataclasses.replace(PROFILES["smoke"], name="smoke-albert", backbone="tiny-albert")
# ALBERT-base v2 on the whole SQuAD v1.1 train set: GPU machine with internet (the keras-hub
# preset downloads from Kaggle), or ELMA_BACKBONE_SOURCE / --backbone-source naming a Google
# checkpoint directory, a TF-Hub module or a local preset directory. ALBERT's paper fine-tunes
# SQuAD v1.1 at 5e-5 with batch 48 for ~2 epochs; at batch 32 a rate of 3e-5 is about the same
# rate per example.
PROFILES["full-albert"] = dataclasses.replace(
    PROFILES["full"],
    name="full-albert",
    backbone="albert",
    backbone_source="albert_base_en_uncased",
    learning_rate=3e-5,
    epochs=2.0,
)


def get_profile(name: str | None = None) -> Profile:
    """Profile by name (default: $ELMA_PROFILE or 'cpu'); unknown names list the known ones."""
    name = name or os.environ.get("ELMA_PROFILE", DEFAULT_PROFILE)
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
    source = os.environ.get("ELMA_BACKBONE_SOURCE")
    if source and profile.backbone == "albert":  # pretrained ALBERT weights from elsewhere
        profile = dataclasses.replace(profile, backbone_source=source)
    return profile


def full_model_dir(profile: Profile) -> Path:
    """Where ``model.finetune`` keeps a profile's full QA model (``artifacts/<backbone>-<profile>``)."""
    return artifacts_dir() / f"{profile.backbone}-{profile.name}"


def reports_dir_for(profile: str) -> Path:
    """Where a profile's reports go: reports/ for the default profile (committed results),
    reports/profiles/<name>/ for the others, so a smoke run never overwrites real numbers."""
    if os.environ.get("ELMA_REPORTS_DIR"):
        return Path(os.environ["ELMA_REPORTS_DIR"])
    root = PROJECT_ROOT / "reports"
    return root if profile == DEFAULT_PROFILE else root / "profiles" / profile
