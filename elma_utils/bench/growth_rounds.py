"""`python -m elma_utils.bench.growth_rounds`: the growth loop, round by round, on a deployment domain.

Runs ``server.growth_rounds.run_growth_rounds`` on a profile's trained models (the full model of
notebook 02, the exits of notebook 03, the edge bundle of notebook 04) and dev-v1.1 articles
split by ``server.deployment_domain``; writes the ``rounds`` into
``<reports>/metrics/07_dataset_growth_and_sync.json`` (other keys of that file are kept) with
the commit and the command, and the figure ``07_growth_rounds.png``:

    python -m elma_utils.bench.growth_rounds --profile cpu     # the profile's sizes and targets
    python -m elma_utils.bench.growth_rounds --profile cpu --targets exits --rounds 2

What is not given on the command line comes from the profile's ``growth_*`` knobs (sizes:
``DomainSizes.from_profile``; replay, epochs, targets, the asking device's E_T).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_NAME = "07_dataset_growth_and_sync"
FIGURE_NAME = "07_growth_rounds"
GROUP_LABELS = {"deployment": "deployment articles (later questions)", "other": "other articles"}


def provenance(command: str) -> dict[str, Any]:
    """The commit the numbers come from (``dirty``: uncommitted changes) and the command."""
    from elma_utils.report import provenance as where

    return {**where.provenance(), "command": command}


def growth_metrics(result: dict[str, Any], command: str) -> dict[str, Any]:
    """The keys the rounds add to notebook 07's metrics: ``rounds`` and ``growth_rounds``."""
    rest = {k: v for k, v in result.items() if k != "rounds"}
    return {"rounds": result["rounds"], "growth_rounds": {**rest, "provenance": provenance(command)}}


def plot_rounds(rounds: Sequence[dict[str, Any]]):
    """Share settled on the device and F1 per round, for both groups and every target."""
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes

    fig, (ax_share, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.8))
    targets = list(dict.fromkeys(r["target"] for r in rounds))
    markers = dict(zip(targets, "osD^v", strict=False))
    colours = {"deployment": "tab:blue", "other": "tab:orange"}
    for target in targets:
        mine = [r for r in rounds if r["target"] == target]
        x = [r["round"] for r in mine]
        for group, colour in colours.items():
            label = f"{GROUP_LABELS[group]}, {target}"
            kw = {"color": colour, "marker": markers[target]}
            ax_share.plot(x, [r[group]["share_on_device"] for r in mine], label=label, **kw)
            ax_f1.plot(x, [r[group]["system_f1"] for r in mine], label=f"whole system: {label}", **kw)
            ax_f1.plot(x, [r[group]["device_f1"] for r in mine], linestyle="--", alpha=0.6,
                       label=f"device alone: {label}", **kw)  # fmt: skip
        for r in mine:  # what the device picked up, at the round it did
            if r["round"] and (r.get("sync") or {}).get("picked_up"):
                offload = r.get("offload") or {}
                what = (f"E_offload {offload['learned']['E_offload']:.2f}" if offload.get("published")
                        else "retrained edge")  # fmt: skip
                ax_share.annotate(f"published: {what}", (r["round"], r["deployment"]["share_on_device"]),
                                  textcoords="offset points", xytext=(4, -12), fontsize=7)  # fmt: skip
    rounds_x = sorted({r["round"] for r in rounds})
    finish_axes(ax_share, "Questions settled on the device", "growth round (0: before growth)",
                "settled on the device (% of questions)")  # fmt: skip
    finish_axes(ax_f1, "F1 per round (never-asked questions)", "growth round (0: before growth)",
                "F1 (%, official SQuAD scoring)")  # fmt: skip
    ax_share.set_xticks(rounds_x)
    ax_f1.set_xticks(rounds_x)
    ax_share.legend(fontsize=7)
    ax_f1.legend(fontsize=6)
    fig.suptitle("Growth loop on a deployment domain")
    fig.tight_layout()
    return fig


def save_growth_report(result: dict[str, Any], command: str, reports_dir: Path) -> Path:
    """Merge the rounds into notebook 07's metrics file and save the figure; returns the metrics path."""
    import matplotlib.pyplot as plt

    from elma_utils import reporting

    path = reports_dir / reporting.METRICS_DIR / f"{METRICS_NAME}.json"
    metrics = reporting.load_metrics(path) if path.is_file() else {}
    metrics.update(growth_metrics(result, command))
    fig = plot_rounds(result["rounds"])
    reporting.save_figure(fig, FIGURE_NAME, reports_dir)
    plt.close(fig)
    return reporting.save_metrics(METRICS_NAME, metrics, reports_dir)


def replay_questions(profile, n: int, data_dir: Path | None = None, seed: int = 0) -> list:
    """``n`` of the answerable questions the full model trained on (a seeded sample): the
    replay that keeps the retrained edge from forgetting."""
    from elma_utils.model.finetune import training_examples

    pool = [e for e in training_examples(profile, data_dir) if not e.is_impossible and not e.synthetic]
    return random.Random(seed).sample(pool, min(n, len(pool))) if n > 0 else []


def profile_artifacts(profile, model_dir: Path | None, exits: Path | None, bundle: Path | None,
                      precision: str = "int8") -> tuple[Path, Path, Path]:  # fmt: skip
    """The profile's full model, exits and edge bundle (notebooks 02, 03, 04), checked to exist."""
    import json

    from elma_utils import config, reporting

    model_dir = model_dir or config.artifacts_dir() / f"{profile.backbone}-{profile.name}"
    if exits is None:
        m03 = config.reports_dir_for(profile.name) / reporting.METRICS_DIR / "03_early_exit.json"
        best = json.loads(m03.read_text()).get("best_mode", "distill") if m03.is_file() else "distill"
        exits = model_dir.parent / f"{model_dir.name}-exits-{best}"
    bundle = bundle or config.artifacts_dir() / f"{model_dir.name}-edge" / precision
    for what, path, notebook in (("full model", model_dir, "02_finetune_full_model"),
                                 ("exits", exits, "03_early_exit"),
                                 ("edge bundle", bundle, "04_edge_export_and_benchmark")):  # fmt: skip
        if not path.is_dir():
            raise SystemExit(
                f"{what} {path} not found: run notebooks/{notebook}.ipynb with profile {profile.name} "
                "first, or name it (--model-dir, --exits, --bundle)"
            )
    return model_dir, exits, bundle


def main(argv: list[str] | None = None) -> int:
    from elma_utils import config
    from elma_utils.server.deployment_domain import DomainSizes, split_domain
    from elma_utils.server.growth_rounds import RETRAIN_TARGETS, RoundsSettings, run_growth_rounds
    from elma_utils.squad.data import load_squad

    p = argparse.ArgumentParser(
        prog="python -m elma_utils.bench.growth_rounds", description=__doc__.split("\n")[0]
    )
    p.add_argument("--profile", default=None, help="default: $ELMA_PROFILE or cpu")
    p.add_argument("--model-dir", type=Path, help="full model (default: the profile's, notebook 02)")
    p.add_argument("--exits", type=Path, help="exits artifact (default: notebook 03's best mode)")
    p.add_argument("--bundle", type=Path, help="initial edge bundle (default: notebook 04's int8 bundle)")
    p.add_argument("--work-dir", type=Path, help="default: artifacts/<model>-growth-rounds")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--reports-dir", type=Path, help="default: the profile's reports directory")
    p.add_argument(
        "--targets", nargs="+", default=None, choices=sorted(RETRAIN_TARGETS), help="default: the profile's"
    )
    p.add_argument("--articles", type=int, help="deployment articles")
    p.add_argument("--paragraphs-per-article", type=int, help="0: every paragraph")
    p.add_argument("--asked-fraction", type=float)
    p.add_argument("--rounds", type=int)
    p.add_argument("--other", type=int, help="questions of other articles measured for forgetting")
    p.add_argument("--calibration", type=int, help="other-article questions choosing E_T")
    p.add_argument("--guard", type=int, help="other-article questions in the gate's held-out set")
    p.add_argument("--order", choices=["interleaved", "document"])
    p.add_argument(
        "--offload-pool", type=int, help="other-article questions pricing an offload (0: every one left over)"
    )
    p.add_argument("--replay", type=int, default=None, help="original training questions per retraining")
    p.add_argument("--epochs", type=float, default=None, help="default: the profile's")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None, help="default: the target's")
    p.add_argument("--tolerance", type=float, default=0.0)
    p.add_argument("--max-share-drop", type=float, default=2.0)
    p.add_argument(
        "--ask-entropy-threshold",
        type=float,
        default=None,
        help="the asking device's E_T instead of the bundle's (a tiny model that settles everything; "
        "default: the profile's growth_edge_threshold)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    P = config.get_profile(args.profile)
    model_dir, exits, bundle = profile_artifacts(P, args.model_dir, args.exits, args.bundle)
    paragraphs = args.paragraphs_per_article
    sizes = DomainSizes.from_profile(
        P, articles=args.articles, asked_fraction=args.asked_fraction, rounds=args.rounds,
        other_questions=args.other, calibration_questions=args.calibration, guard_questions=args.guard,
        order=args.order,
    )  # fmt: skip
    if paragraphs is not None:
        sizes = dataclasses.replace(sizes, paragraphs_per_article=paragraphs or None)
    if args.offload_pool is not None:
        sizes = dataclasses.replace(sizes, offload_pool_questions=args.offload_pool or None)
    domain = split_domain(load_squad("1.1", "dev", data_dir=args.data_dir).examples, sizes, seed=args.seed)
    n_replay = args.replay if args.replay is not None else P.growth_replay_questions
    replay = replay_questions(P, n_replay, args.data_dir, seed=args.seed)
    ask_threshold = args.ask_entropy_threshold
    settings = RoundsSettings(
        epochs=args.epochs if args.epochs is not None else P.growth_epochs,
        batch_size=args.batch_size or P.batch_size, learning_rate=args.learning_rate,
        tolerance=args.tolerance, max_share_drop=args.max_share_drop,
        ask_entropy_threshold=ask_threshold if ask_threshold is not None else P.growth_edge_threshold,
        seed=args.seed,
    )  # fmt: skip
    targets = args.targets or list(P.growth_targets)
    work = args.work_dir or config.artifacts_dir() / f"{model_dir.name}-growth-rounds"
    print(f"domain: {domain.describe()['asked_per_round']} asked per round, {len(domain.later)} later, "
          f"{len(domain.other)} other; replay {len(replay)}; targets {targets}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    result = run_growth_rounds(
        model_dir, bundle, exits, work, domain, replay, settings, targets,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    command = "python -m elma_utils.bench.growth_rounds " + shlex.join(sys.argv[1:] if argv is None else argv)
    path = save_growth_report(result, command, args.reports_dir or config.reports_dir_for(P.name))
    print(f"{path} written ({time.perf_counter() - t0:.0f} s)")
    for target, s in result["summary"].items():
        print(target, {k: s[k] for k in ("published", "picked_up_by_device", "decisions")}, s["targets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
