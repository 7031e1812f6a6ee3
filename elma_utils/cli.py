"""`elma` command line: train, evaluate, predict, benchmark, run the notebook pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from elma_utils.config import get_profile
    from elma_utils.model.finetune import finetune

    profile = get_profile(args.profile)
    if args.backbone or args.backbone_source:
        profile = dataclasses.replace(
            profile,
            backbone=args.backbone or profile.backbone,
            backbone_source=args.backbone_source or profile.backbone_source,
        )
    out = finetune(
        profile,
        args.name,
        data_dir=args.data_dir,
        out_dir=args.out,
        precision=args.precision,
        verbose=args.verbose,
    )
    print(out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from elma_utils.model.evaluation import evaluate_artifact

    result = evaluate_artifact(
        args.model,
        args.version,
        data_dir=args.data_dir,
        limit=args.limit,
        out_dir=args.out,
    )
    print(json.dumps(result["scores"], indent=2))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from elma_utils.model.inference import QAModel

    context = (
        args.context if args.context is not None else Path(args.context_file).read_text(encoding="utf-8")
    )
    answer = QAModel.load(args.model).answer(args.question, context)
    print(json.dumps(answer.to_dict(), indent=2) if args.json else answer.text)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from elma_utils.bench.inference import benchmark_inference

    result = benchmark_inference(
        args.model, seq_len=args.seq_len, runs=args.runs, eval_examples=args.eval_examples
    )
    print(json.dumps(result, indent=2))
    if args.out:
        from elma_utils.reporting import save_metrics

        print(save_metrics(args.out, result))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from elma_utils.offload.server import serve

    serve(
        args.model,
        args.store,
        port=args.port,
        unix_socket=args.unix,
        ssh_port=args.ssh_port,
        authorized_keys=args.authorized_keys,
        host_key=args.host_key,
        sftp_root=args.sftp_root,
        null_threshold=args.null_threshold,
        max_batch=args.max_batch,
        ready=lambda line: print(line, flush=True),
    )
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from elma_utils.pipeline import PipelineError, run_pipeline

    only = args.only.split(",") if args.only else None
    try:
        run_pipeline(profile=args.profile, only=only, force=args.force)
    except PipelineError as e:
        print(f"elma pipeline: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elma", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune the full QA model (resumes an interrupted run)")
    t.add_argument("--profile", default=None, help="smoke | cpu | full (default: $ELMA_PROFILE or cpu)")
    t.add_argument("--name", default=None, help="artifact name (default: <backbone>-<profile>)")
    t.add_argument("--out", type=Path, default=None, help="artifact directory (default: artifacts/<name>)")
    t.add_argument("--data-dir", type=Path, default=None, help="directory with the SQuAD json files")
    t.add_argument("--precision", default="auto", help="auto | float32 | mixed_bfloat16")
    t.add_argument("--backbone", default=None, help="minilm | tiny-bert | albert (default: the profile's)")
    t.add_argument(
        "--backbone-source",
        default=None,
        help="ALBERT weights: keras-hub preset, Google checkpoint dir or TF-Hub module",
    )
    t.add_argument("--verbose", default="auto", help="Keras verbosity: auto, 0, 1 or 2")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="official-format predictions + EM/F1 on a dev set")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--version", default="1.1", choices=["1.1", "2.0"])
    e.add_argument("--data-dir", type=Path, default=None)
    e.add_argument("--limit", type=int, default=None, help="first N questions only")
    e.add_argument(
        "--out", type=Path, default=None, help="where predictions/scores go (default: <model>/eval)"
    )
    e.set_defaults(func=_cmd_evaluate)

    a = sub.add_parser("ask", help="answer one typed question about a context")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--question", required=True)
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--context")
    g.add_argument("--context-file")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_ask)

    b = sub.add_parser("bench", help="inference latency (batch 1) and evaluation throughput")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--seq-len", type=int, default=384)
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--eval-examples", type=int, default=500)
    b.add_argument(
        "--out", default=None, help="also save as reports/metrics/<OUT>.json (e.g. bench_inference)"
    )
    b.set_defaults(func=_cmd_bench)

    sv = sub.add_parser("serve", help="answer offloaded questions (loopback only; devices come in over SSH)")
    sv.add_argument("--model", type=Path, required=True, help="the full model's artifact directory")
    sv.add_argument("--store", type=Path, default=Path("server/hard-questions.sqlite3"))
    sv.add_argument("--port", type=int, default=0, help="loopback TCP port (0: any free one, printed)")
    sv.add_argument("--unix", default=None, help="listen on this Unix socket instead of TCP")
    sv.add_argument("--ssh-port", type=int, default=None, help="also run ELMA's own SSH endpoint here")
    sv.add_argument("--authorized-keys", type=Path, default=None, help="client keys the endpoint accepts")
    sv.add_argument("--host-key", type=Path, default=None, help="endpoint host key (made when missing)")
    sv.add_argument("--sftp-root", type=Path, default=None, help="read-only SFTP root (edge bundles)")
    sv.add_argument("--null-threshold", type=float, default=None, help="SQuAD 2.0 no-answer threshold")
    sv.add_argument("--max-batch", type=int, default=16)
    sv.set_defaults(func=_cmd_serve)

    pl = sub.add_parser("pipeline", help="run the notebooks in order with papermill")
    pl.add_argument("--profile", default=None)
    pl.add_argument("--only", default=None, help="comma-separated notebook names or numbers")
    pl.add_argument("--force", action="store_true", help="rerun notebooks that already finished")
    pl.set_defaults(func=_cmd_pipeline)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", None) not in (None, "auto"):
        args.verbose = int(args.verbose)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"elma {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
