"""`elma` command line: train, evaluate, predict, benchmark, run the notebook pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from elma_utils.config import PROFILES
from elma_utils.native_logs import quiet_environment
from elma_utils.server.service import DEFAULT_SERVICE_PORT, MAX_CONTEXT_CHARS, MAX_SERVER_DEADLINE_MS

PROFILE_NAMES = " | ".join(PROFILES)

# before any command imports TensorFlow: TF_CPP_MIN_LOG_LEVEL=3, GRPC_VERBOSITY=ERROR (unless set);
# GPUs stay visible and oneDNN stays on (see elma_utils.native_logs)
quiet_environment(os.environ)


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
    """Check every input first (one line, exit 2, nothing loaded), then load the models and answer."""
    from elma_utils.native_logs import native_noise_filtered
    from elma_utils.speech.spoken_qa import SpokenQA

    question, context, squad_question, manifest = _check_ask(args)
    spoken = args.audio
    if args.mic:  # fails with a message naming what is missing (PyAudio, a device) before any model loads
        from elma_utils.speech.audio import capture_microphone

        spoken = capture_microphone(timeout=args.mic_timeout)
    recognizer = None
    if spoken is not None:
        from elma_utils.speech.recognizers import get_recognizer

        lm, train = args.lm, None if args.data_dir is None else args.data_dir / "train-v1.1.json"
        if train is not None and lm.strip().lower() == "auto":  # 'auto': the questions of --data-dir
            lm = str(train) if train.is_file() else None
        recognizer = get_recognizer(args.engine, **({"lm": lm} if args.engine == "whisper" else {}))
    with native_noise_filtered():  # TensorFlow/absl/CUDA/LiteRT start-up lines (elma_utils.native_logs)
        answerer = _answerer(args, manifest)
    qa = SpokenQA(recognizer, answerer)
    try:
        with native_noise_filtered():
            if spoken is not None:
                r = qa.ask(spoken, context, reference=question or squad_question)
            else:
                r = qa.ask_typed(question, context)
    finally:
        tunnel = getattr(answerer, "tunnel", None)
        if tunnel is not None:
            tunnel.close()
    if args.json:
        print(json.dumps(r.to_dict(), indent=2, allow_nan=False))  # strict JSON: NaN/inf are null
        return 0
    if spoken is not None:
        print(f"heard:  {r.transcript}")
    if r.unreliable:  # the recogniser's guard: not answered, ask again
        print(f"answer: (not answered) the transcript looks unreliable: {r.unreliable}")
        print("        please repeat the question")
        return 0
    print(f"answer: {r.answer if r.answer else '(no answer)'}")
    print(f"from:   {r.where}")
    print("ms:     " + ", ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items()))
    return 0


def _check_ask(args: argparse.Namespace) -> tuple[str | None, str, str | None, dict | None]:
    """Every input of `elma ask`, checked before TensorFlow, Whisper or a model loads; raises a
    ValueError with one line naming the input and the fix. Returns (question, context, the SQuAD
    question of --squad-id, the verified bundle manifest)."""
    from elma_utils.edge import input_checks as check
    from elma_utils.speech.spoken_qa import resolve_context

    if args.mic and args.audio is not None:
        raise ValueError("give the spoken question either as --audio FILE or from --mic, not both")
    if args.audio is None and args.question is None and not args.mic:
        raise ValueError("give the question as --audio FILE, --mic or --question TEXT")
    if (args.model is None) == (args.bundle is None):
        raise ValueError("answer with exactly one of --model DIR (full model) and --bundle DIR (edge model)")
    offload = {"--ssh-port": args.ssh_port, "--service-port": args.service_port, "--key": args.key,
               "--known-hosts": args.known_hosts, "--user": args.user}  # fmt: skip
    given = [name for name, value in offload.items() if value is not None]
    if given and args.model is not None:
        them = "it" if len(given) == 1 else "them"
        raise ValueError(
            f"{' '.join(given)}: offloading is for the edge model (--bundle DIR); leave {them} out"
        )
    if given and args.ssh_port is None:
        raise ValueError(f"{' '.join(given)} without --ssh-port: give the server's SSH port to offload")
    question = check.check_question(args.question) if args.question is not None else None
    if args.audio is not None:
        check.check_audio_file(args.audio)
    if args.mic and not args.mic_timeout > 0:
        raise ValueError(f"--mic-timeout {args.mic_timeout:g}: give the seconds to wait for speech (> 0)")
    if args.data_dir is not None:
        check.check_directory(args.data_dir, label="--data-dir")
    if (args.audio is not None or args.mic) and args.engine == "whisper":
        check.check_lm(args.lm)
    context, squad_question = resolve_context(args.context, args.context_file, args.squad_id, args.data_dir)
    manifest = None
    if args.model is not None:
        check.check_model_dir(args.model)
    else:
        manifest = check.check_bundle_dir(args.bundle)
    if args.ssh_port is not None:
        missing = [n for n in ("--service-port", "--key", "--known-hosts") if offload[n] is None]
        if missing:
            raise ValueError(f"offloading needs {' '.join(missing)} too (see `elma ask --help`)")
        args.ssh_host = check.check_host(args.ssh_host)
        check.check_port(args.ssh_port, label="--ssh-port")
        check.check_port(args.service_port, label="--service-port")
        if args.user is not None:
            check.check_user(args.user)
        check.check_private_key(args.key)
        check.check_known_hosts(args.known_hosts, args.ssh_host, args.ssh_port)
        check.check_device_id(args.device_id)
        check.check_outbox_path(args.outbox)
    return question, context, squad_question, manifest


def _answerer(args: argparse.Namespace, manifest: dict | None = None):
    """QAModel (--model), EdgeModel (--bundle), or EdgeQA when --ssh-port names a server.

    `manifest`: the bundle's, already verified by `check_bundle_dir` (its files are not hashed again)."""
    if args.model is not None:
        from elma_utils.model.inference import QAModel

        return QAModel.load(args.model)
    from elma_utils.edge.runtime import EdgeModel

    if manifest is None:
        edge = EdgeModel.load(args.bundle)
    else:
        from elma_utils.export.bundle import read_thresholds

        edge = EdgeModel(Path(args.bundle), manifest, read_thresholds(args.bundle))
    if args.ssh_port is None:
        return edge
    import getpass

    from elma_utils.edge.client import EdgeQA
    from elma_utils.edge.outbox import Outbox
    from elma_utils.edge.ssh_client import SSHTunnelClient

    tunnel = SSHTunnelClient(args.ssh_host, args.ssh_port, args.user or getpass.getuser(), args.key,
                             args.known_hosts, ("127.0.0.1", args.service_port))  # fmt: skip
    return EdgeQA(edge, tunnel, Outbox(args.outbox), device_id=args.device_id)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bundle:  # the whole spoken-question pipeline, stage by stage (elma_utils.bench.harness)
        from elma_utils.bench import harness

        argv = [a for b in args.bundle for a in ("--bundle", str(b))]
        argv += [
            "--audio-n",
            str(args.audio_n),
            "--typed-n",
            str(args.typed_n),
            "--runs",
            str(args.runs_pipeline),
        ]
        if args.server_model:
            argv += ["--server-model", str(args.server_model)]
        if args.out:
            argv += ["--out", args.out]
        return harness.main(argv)
    if args.model is None:
        raise ValueError("elma bench needs --model DIR (full model) or --bundle DIR (pipeline benchmark)")
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
    """Check addresses, files and the growth settings (one line, exit 2) before the model loads."""
    import shlex

    from elma_utils.server.service import configure_logging, serve

    configure_logging(args.log_level)
    growth = None
    if args.grow_after is not None or args.grow_every is not None or args.grow_config is not None:
        from elma_utils.server.growth import GrowthSettings, load_config

        settings = load_config(args.grow_config) if args.grow_config is not None else {}
        if args.grow_after is not None:
            settings["after"] = args.grow_after
        if args.grow_every is not None:
            settings["every_s"] = args.grow_every
        if args.full_model is not None:
            settings["full_model"] = args.full_model
        settings["server_model"] = args.model  # the offload step prices the server's own answers
        if args.grow_command is not None:
            settings["command"] = shlex.split(args.grow_command)
        growth = GrowthSettings(**settings).check()
    elif args.full_model is not None or args.grow_command is not None:
        raise ValueError("--full-model and --grow-command are for the growth loop: add --grow-after N")
    serve(
        args.model,
        args.store,
        server_root=args.server_root,
        listen=args.listen,
        port=args.port,
        unix_socket=args.unix,
        service_port=args.service_port,
        ssh_port=args.ssh_port,
        authorized_keys=args.authorized_keys,
        host_key=args.host_key,
        sftp_root=args.sftp_root,
        null_threshold=args.null_threshold,
        max_batch=args.max_batch,
        max_context_chars=args.max_context_chars,
        max_deadline_ms=args.max_deadline_ms,
        drain_s=args.drain_seconds,
        growth=growth,
        ready=lambda line: print(line, flush=True),
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from elma_utils.server.status import collect_status, format_status, to_json

    if args.recent < 0:
        raise ValueError(f"--recent {args.recent}: give how many recent questions to show (0 or more)")
    status = collect_status(
        args.server_root, store=args.store, authorized_keys=args.authorized_keys, recent=args.recent
    )
    print(to_json(status) if args.json else format_status(status))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from elma_utils.server import device_keys

    if args.action in ("add", "revoke") and args.device is None:
        raise ValueError(f"elma keys {args.action} needs --device ID")
    if args.action == "add" and args.public_key is None:
        raise ValueError("elma keys add needs --public-key FILE.pub (or the 'ssh-ed25519 AAAA...' line)")
    if args.action == "add":
        options = ""
        if args.sshd:
            from elma_utils.server.sshd import device_key_options

            if args.permit_open is None:
                raise ValueError("--sshd needs --permit-open HOST:PORT (the model service's address)")
            host, _, port = args.permit_open.rpartition(":")
            options = device_key_options((host, int(port)), args.sftp_root)
        line = device_keys.add_device(args.authorized_keys, args.device, args.public_key, options)
        print(f"added device {args.device} to {args.authorized_keys}:\n{line}")
    elif args.action == "revoke":
        removed = device_keys.revoke_device(args.authorized_keys, args.device)
        if not removed:
            raise ValueError(f"no device {args.device!r} in {args.authorized_keys} (see `elma keys list`)")
        print(
            f"revoked device {args.device} ({removed} key(s)); its connections to ELMA's endpoint close within seconds"
        )
    else:
        devices = device_keys.list_devices(args.authorized_keys)
        if args.json:
            print(json.dumps(devices, indent=2))
        for d in [] if args.json else devices:
            print(f"{d['device_id']:<24} {d['fingerprint']}  {d['options'] or '(no options)'}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from elma_utils.server import publish

    if args.what == "bundle":
        print(publish.publish_bundle(args.bundle, args.server_root, exits_dir=args.exits))
        return 0
    result = publish.retrain_edge(
        args.store,
        args.server_root,
        mode=args.mode,
        full_model_dir=args.full_model,
        original_train=args.original_train,
        original_limit=args.original_limit,
        dev_eval=args.dev_eval,
        dev_limit=args.dev_limit,
        calibration=args.calibration,
        calibration_limit=args.calibration_limit,
        max_f1_loss=args.max_f1_loss,
        eval_fraction=args.eval_fraction,
        epochs=args.epochs,
        learning_rate=args.lr,
        tolerance=args.tolerance,
        max_share_drop=args.max_share_drop,
    )
    print(json.dumps(result.to_dict(), indent=2, default=str) if args.json else result.reason)
    return 0 if result.published else 3


def _cmd_sync(args: argparse.Namespace) -> int:
    from elma_utils.edge import sync

    if args.rollback:
        print(f"current: {sync.rollback(args.local_root)}")
        return 0
    options = {"keep": args.keep, "force": args.force}
    if args.no_smoke:
        options["smoke"] = None
    if args.from_dir is not None:
        result = sync.sync_bundle(sync.LocalTree(args.from_dir), ".", args.local_root, **options)
    else:
        from elma_utils.edge.ssh_client import SSHTunnelClient

        missing = [n for n in ("host", "port", "key", "known_hosts") if getattr(args, n) is None]
        if missing:
            raise ValueError(
                f"sync over SSH needs --{' --'.join(m.replace('_', '-') for m in missing)} (or --from-dir)"
            )
        import getpass

        client = SSHTunnelClient(args.host, args.port, args.user or getpass.getuser(), args.key, args.known_hosts,
                                 ("127.0.0.1", 1))  # fmt: skip
        try:
            result = sync.sync_with_client(client, args.remote_root, args.local_root, **options)
        finally:
            client.close()
    print(f"{result.status}: {result.version} {result.message}".strip())
    return 0


_DEVICE_INIT_OPTIONS = ("device_id", "server", "user", "service", "model_root", "bundle", "context_file",
                        "input", "folder", "engine", "sync_interval", "remote_root", "speak", "authorized_keys")  # fmt: skip


def _cmd_device(args: argparse.Namespace) -> int:
    if args.action == "init":
        from elma_utils.edge.device_config import init_device

        if args.json:
            raise ValueError("--json is for `elma device run`")
        options = {k: getattr(args, k) for k in _DEVICE_INIT_OPTIONS if getattr(args, k) not in (None, False)}
        if "input" in options:
            options["input_kind"] = options.pop("input")
        print(init_device(args.config, **options).instructions())
        return 0
    given = [k for k in _DEVICE_INIT_OPTIONS if getattr(args, k) not in (None, False)]
    if given:
        raise ValueError(
            f"--{given[0].replace('_', '-')} is for `elma device init`; edit {args.config} instead"
        )
    from elma_utils.edge.device import run_device

    return run_device(args.config, json_lines=args.json)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from elma_utils.pipeline import PipelineError, run_pipeline

    if args.backbone_source:  # the notebooks' get_profile reads it (pretrained ALBERT profiles)
        os.environ["ELMA_BACKBONE_SOURCE"] = args.backbone_source
    _check_backbone_source(args.profile)
    only = args.only.split(",") if args.only else None
    try:
        run_pipeline(profile=args.profile, only=only, force=args.force)
    except PipelineError as e:
        print(f"elma pipeline: {e}", file=sys.stderr)
        return 1
    return 0


def _check_backbone_source(profile_name: str | None) -> None:
    """Before any notebook runs: a profile's pretrained ALBERT weights can be had (a preset
    downloads once and is cached); else one line that says what to pass instead."""
    from elma_utils.config import get_profile

    profile = get_profile(profile_name)
    if profile.backbone == "albert":
        from elma_utils.model.artifacts import build_backbone

        build_backbone(profile.backbone, source=profile.backbone_source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elma", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune the full QA model (resumes an interrupted run)")
    t.add_argument("--profile", default=None, help=f"{PROFILE_NAMES} (default: $ELMA_PROFILE or cpu)")
    t.add_argument("--name", default=None, help="artifact name (default: <backbone>-<profile>)")
    t.add_argument("--out", type=Path, default=None, help="artifact directory (default: artifacts/<name>)")
    t.add_argument("--data-dir", type=Path, default=None, help="directory with the SQuAD json files")
    t.add_argument("--precision", default="auto", help="auto | float32 | mixed_bfloat16")
    t.add_argument(
        "--backbone", default=None, help="minilm | tiny-bert | tiny-albert | albert (default: the profile's)"
    )
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

    a = sub.add_parser("ask", help="answer a spoken (--audio) or typed (--question) question about a text")
    q = a.add_argument_group("the question")
    q.add_argument("--audio", type=Path, default=None, help="WAV/FLAC/OGG/MP3 file with the spoken question")
    q.add_argument(
        "--mic", action="store_true", help="record the spoken question from the microphone (needs PyAudio)"
    )
    q.add_argument(
        "--mic-timeout", type=float, default=5.0, help="--mic: seconds to wait for speech to start"
    )
    q.add_argument("--question", default=None, help="typed question (with --audio: the reference for WER)")
    q.add_argument("--engine", default="whisper", choices=["whisper", "sphinx"], help="speech recogniser")
    q.add_argument(
        "--lm",
        default="auto",
        help="whisper: rescore its n-best list with a question language model: 'auto' (the questions of "
        "train-v1.1.json in the data directory, when there; built once, about a minute, then cached), "
        "'none' (no LM), a saved LM (.json.gz) or a SQuAD file",
    )
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--context", help="the text the question is about")
    g.add_argument("--context-file", type=Path)
    g.add_argument("--squad-id", help="take the context of this SQuAD dev question")
    a.add_argument("--data-dir", type=Path, default=None)
    m = a.add_argument_group("the model")
    m.add_argument("--model", type=Path, default=None, help="full model artifact")
    m.add_argument("--bundle", type=Path, default=None, help="edge bundle (early exit on this device)")
    o = a.add_argument_group("offloading (with --bundle)")
    o.add_argument("--ssh-host", default="127.0.0.1")
    o.add_argument("--ssh-port", type=int, default=None, help="the server's SSH endpoint or sshd")
    o.add_argument(
        "--service-port", type=int, default=None, help="the `elma serve` port on the server's loopback"
    )
    o.add_argument("--user", default=None)
    o.add_argument("--key", type=Path, default=None, help="this device's ed25519 private key")
    o.add_argument(
        "--known-hosts",
        type=Path,
        default=None,
        help="known_hosts file pinning the server's host key (not its .pub): ssh-keyscan -t ed25519 -p PORT HOST",
    )
    o.add_argument("--outbox", type=Path, default=Path("edge/outbox.sqlite3"))
    o.add_argument("--device-id", default="edge")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_ask)

    b = sub.add_parser(
        "bench",
        help="full-model latency and throughput (--model), or the spoken-question pipeline per stage (--bundle)",
    )
    b.add_argument("--model", type=Path, default=None)
    b.add_argument("--bundle", type=Path, action="append", default=None, help="edge bundle (repeatable)")
    b.add_argument("--server-model", type=Path, default=None, help="full model for a local offload server")
    b.add_argument("--audio-n", type=int, default=30, help="spoken dev-v1.1 questions (pipeline benchmark)")
    b.add_argument("--typed-n", type=int, default=0, help="typed dev-v1.1 questions (pipeline benchmark)")
    b.add_argument("--runs-pipeline", type=int, default=3, help="repeats per question (pipeline benchmark)")
    b.add_argument("--seq-len", type=int, default=384)
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--eval-examples", type=int, default=500)
    b.add_argument(
        "--out", default=None, help="also save as reports/metrics/<OUT>.json (e.g. bench_inference)"
    )
    b.set_defaults(func=_cmd_bench)

    sv = sub.add_parser(
        "serve",
        help="the server program: the full model behind ELMA's SSH endpoint, the store, the growth loop",
    )
    sv.add_argument("--model", type=Path, required=True, help="the full model's artifact directory")
    sv.add_argument(
        "--server-root",
        type=Path,
        default=None,
        help="one directory for everything (elma_utils.server.status.ServerLayout): the store, "
        "authorized_keys, host key, bundles/ (SFTP), growth/; the options below override its files",
    )
    sv.add_argument(
        "--listen",
        default=None,
        help="ELMA's SSH endpoint on HOST:PORT, e.g. 0.0.0.0:2222, [::]:2222 (IPv6 and IPv4), 10.0.0.1:2222",
    )
    sv.add_argument("--ssh-port", type=int, default=None, help="short for --listen 127.0.0.1:PORT")
    sv.add_argument(
        "--store",
        type=Path,
        default=None,
        help="the hard-question store (default: <server-root>/hard-questions.sqlite3, "
        "else server/hard-questions.sqlite3)",
    )
    sv.add_argument(
        "--port",
        type=int,
        default=None,
        help="the model service on this loopback TCP port (0: any free one, printed); default: a Unix "
        "socket behind --listen, else any free port",
    )
    sv.add_argument(
        "--service-port",
        type=int,
        default=DEFAULT_SERVICE_PORT,
        help="with a Unix socket behind --listen: the 127.0.0.1 port devices name in their forwards",
    )
    sv.add_argument("--unix", default=None, help="the model service on this Unix socket instead of TCP")
    sv.add_argument(
        "--authorized-keys",
        type=Path,
        default=None,
        help="registered devices (default: <server-root>/authorized_keys)",
    )
    sv.add_argument(
        "--host-key",
        type=Path,
        default=None,
        help="endpoint host key, made when missing (default: in --server-root)",
    )
    sv.add_argument(
        "--sftp-root", type=Path, default=None, help="read-only SFTP root (default: <server-root>/bundles)"
    )
    sv.add_argument("--null-threshold", type=float, default=None, help="SQuAD 2.0 no-answer threshold")
    sv.add_argument("--max-batch", type=int, default=16)
    sv.add_argument(
        "--max-context-chars",
        type=int,
        default=MAX_CONTEXT_CHARS,
        help="longer contexts are refused (too_large)",
    )
    sv.add_argument(
        "--max-deadline-ms", type=int, default=MAX_SERVER_DEADLINE_MS, help="longer deadlines are cut to this"
    )
    sv.add_argument(
        "--drain-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM: how long asks in flight may take to finish",
    )
    sv.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="stderr log level"
    )
    gr = sv.add_argument_group(
        "growth loop (retrain/distil → gate → publish in a niced process; needs --server-root)"
    )
    gr.add_argument("--grow-after", type=int, default=None, help="run after N new stored hard questions")
    gr.add_argument("--grow-every", type=float, default=None, help="or every SECONDS when there are new ones")
    gr.add_argument(
        "--full-model", type=Path, default=None, help="the backbone the edge exits sit on (default: --model)"
    )
    gr.add_argument(
        "--grow-config",
        type=Path,
        default=None,
        help="TOML: after, every, full_model, command, and a [retrain] table of retrain_edge options",
    )
    gr.add_argument(
        "--grow-command",
        default=None,
        help="run this instead of `python -m elma_utils.server.growth run` (gets $ELMA_STORE, "
        "$ELMA_SERVER_ROOT, $ELMA_GROWTH_RESULT ...)",
    )
    sv.set_defaults(func=_cmd_serve)

    st = sub.add_parser(
        "status", help="server: stored questions, devices, the published version, the growth loop's last run"
    )
    st.add_argument("--server-root", type=Path, required=True)
    st.add_argument("--store", type=Path, default=None, help="default: <server-root>/hard-questions.sqlite3")
    st.add_argument(
        "--authorized-keys",
        type=Path,
        default=None,
        help="registered devices (default: <server-root>/authorized_keys when there)",
    )
    st.add_argument("--recent", type=int, default=10, help="how many of the latest stored questions to show")
    st.add_argument("--json", action="store_true", help="strict JSON")
    st.set_defaults(func=_cmd_status)

    ks = sub.add_parser("keys", help="add, list or revoke devices in the server's authorized_keys")
    ks.add_argument("action", choices=("add", "revoke", "list"))
    ks.add_argument("--authorized-keys", type=Path, required=True, help="the file `elma serve` and sshd read")
    ks.add_argument("--device", default=None, help="the device id (add, revoke)")
    ks.add_argument(
        "--public-key", default=None, help="the device's .pub file or its 'ssh-ed25519 AAAA...' line"
    )
    ks.add_argument("--sshd", action="store_true", help="add the options that restrict the key under OpenSSH")
    ks.add_argument("--permit-open", default=None, help="with --sshd: the model service's HOST:PORT")
    ks.add_argument("--sftp-root", type=Path, default=None, help="with --sshd: the bundles directory")
    ks.add_argument("--json", action="store_true", help="list as JSON")
    ks.set_defaults(func=_cmd_keys)

    pb = sub.add_parser(
        "publish", help="server: publish an edge bundle, or retrain it from offloaded questions"
    )
    pbs = pb.add_subparsers(dest="what", required=True)
    pb1 = pbs.add_parser("bundle", help="publish an existing bundle (the first one)")
    pb1.add_argument("bundle", type=Path)
    pb1.add_argument("--server-root", type=Path, required=True)
    pb1.add_argument("--exits", type=Path, default=None, help="the exits artifact behind the bundle")
    pb2 = pbs.add_parser(
        "retrain", help="distil the edge on the hard-question store; publish only if no worse"
    )
    pb2.add_argument("--store", type=Path, required=True)
    pb2.add_argument("--server-root", type=Path, required=True)
    pb2.add_argument("--mode", default="distill", choices=["distill", "two_stage", "joint_distill"])
    pb2.add_argument("--full-model", type=Path, default=None)
    pb2.add_argument("--original-train", type=Path, default=None, help="SQuAD json mixed into the training")
    pb2.add_argument("--original-limit", type=int, default=None)
    pb2.add_argument("--dev-eval", type=Path, default=None, help="SQuAD json added to the held-out set")
    pb2.add_argument("--dev-limit", type=int, default=None)
    pb2.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="SQuAD json of questions neither model trained on: the candidate's E_T is chosen on them",
    )
    pb2.add_argument("--calibration-limit", type=int, default=None)
    pb2.add_argument(
        "--max-f1-loss", type=float, default=1.0, help="E_T target: F1 below the candidate's full depth"
    )
    pb2.add_argument("--eval-fraction", type=float, default=0.2)
    pb2.add_argument("--epochs", type=float, default=1.0)
    pb2.add_argument("--lr", type=float, default=5e-4)
    pb2.add_argument("--tolerance", type=float, default=0.0, help="F1 the candidate may lose and still ship")
    pb2.add_argument(
        "--max-share-drop",
        type=float,
        default=2.0,
        help="percentage points of held-out questions the candidate may settle fewer on the edge",
    )
    pb2.add_argument("--json", action="store_true")
    pb.set_defaults(func=_cmd_publish)

    sy = sub.add_parser(
        "sync", help="edge: fetch the latest bundle (SFTP), verify, swap atomically; or roll back"
    )
    sy.add_argument("--local-root", type=Path, required=True)
    sy.add_argument("--host", default=None)
    sy.add_argument("--port", type=int, default=None)
    sy.add_argument("--user", default=None)
    sy.add_argument("--key", type=Path, default=None, help="the device's ed25519 private key")
    sy.add_argument("--known-hosts", type=Path, default=None, help="pinned server host key")
    sy.add_argument("--remote-root", default=".", help="the bundles directory on the server (SFTP path)")
    sy.add_argument("--from-dir", type=Path, default=None, help="update from a local directory (USB stick)")
    sy.add_argument("--keep", type=int, default=2)
    sy.add_argument("--force", action="store_true")
    sy.add_argument("--no-smoke", action="store_true", help="skip the smoke question before the swap")
    sy.add_argument("--rollback", action="store_true")
    sy.set_defaults(func=_cmd_sync)

    dv = sub.add_parser(
        "device", help="the device program: `init` a board's config and key, or `run` it (the default)"
    )
    dv.add_argument("action", nargs="?", default="run", choices=("init", "run"))
    dv.add_argument("--config", type=Path, required=True, help="the device's TOML file (init writes it)")
    dv.add_argument("--json", action="store_true", help="run: one JSON object per answer on stdout")
    di = dv.add_argument_group("init only (the values written into the new config)")
    di.add_argument("--device-id", default=None, help="default: the host name")
    di.add_argument("--server", default=None, help="HOST[:SSH_PORT] or [IPv6]:PORT (default 127.0.0.1:22)")
    di.add_argument("--user", default=None, help="the SSH user on the server (default elma)")
    di.add_argument(
        "--service", default=None, help="the model service's address on the server (127.0.0.1:7433)"
    )
    di.add_argument(
        "--model-root", type=Path, default=None, help="bundles kept up to date by sync (default: bundles/)"
    )
    di.add_argument("--bundle", type=Path, default=None, help="or a fixed bundle directory")
    di.add_argument("--context-file", type=Path, default=None, help="the text questions are about")
    di.add_argument("--input", default=None, choices=("stdin", "folder", "microphone"))
    di.add_argument("--folder", type=Path, default=None, help="--input folder: where audio files arrive")
    di.add_argument("--engine", default=None, choices=("whisper", "sphinx"))
    di.add_argument("--sync-interval", type=float, default=None, help="seconds between syncs (0: off)")
    di.add_argument("--remote-root", default=None, help="the bundles directory on the server's SFTP")
    di.add_argument("--speak", action="store_true", help="say answers with espeak-ng")
    di.add_argument(
        "--authorized-keys", default=None, help="the server's authorized_keys, for `elma keys add`"
    )
    dv.set_defaults(func=_cmd_device)

    pl = sub.add_parser("pipeline", help="run the notebooks in order with papermill")
    pl.add_argument("--profile", default=None, help=f"{PROFILE_NAMES} (default: $ELMA_PROFILE or cpu)")
    pl.add_argument("--only", default=None, help="comma-separated notebook names or numbers")
    pl.add_argument("--force", action="store_true", help="rerun notebooks that already finished")
    pl.add_argument(
        "--backbone-source",
        default=None,
        help="ALBERT profiles: keras-hub preset, Google checkpoint dir or TF-Hub module "
        "(default: the profile's preset; sets ELMA_BACKBONE_SOURCE for the notebooks)",
    )
    pl.set_defaults(func=_cmd_pipeline)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", None) not in (None, "auto"):
        args.verbose = int(args.verbose)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError) as e:  # errors that say what to do
        print(f"elma {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
