"""How the device program feels to its user: cold starts, warm latency, memory, model swaps.

A benchmark, not a test (numbers go to ``reports/metrics/bench_device.json``):

- **cold start**: wall time from launching ``elma ask --bundle`` (one typed question, answered
  on the device) until it exits, and from launching ``elma device run`` until its first
  answer is printed — what the user waits for after a reboot or for a one-shot question;
- **warm latency** per question inside one ``elma device`` process, typed (stdin) and spoken
  (a watched folder of espeak-ng clips), p50/p95 of the device's own ``total_ms`` and of its
  parts (ASR, edge model, offload round trip);
- the device process's **resident memory** (peak and at the end, from /proc);
- **model swap**: loading and verifying a bundle as the sync thread does before a swap
  (``EdgeModel.load``), median of several loads; the swap itself is a pointer change.

The edge bundle has the shape of the real one — MiniLM-L6 (all-MiniLM-L6-v2 weights), int8,
sequence 384 — with untrained exit heads and ``E_T = -1``, so every question runs all six
layers and is offloaded: the worst case for the device, and the answers mean nothing (no F1
is reported). The server is a real ``elma serve`` with ELMA's SSH endpoint on loopback,
answering with a small random model, so the offload time is the link and protocol, not a
real model's. Run: ``python -m elma_utils.bench.device_bench [--out FILE] [--questions N]``.

Adaptive compute (``--bundle B --adaptive``): a real bundle (e.g. ``bench.adaptive_run``'s int8
bundle with a skim head) instead of the MiniLM-shape one, and the typed warm run twice, in
the same server session — the bundle as it is (early exit and skimming) and its full-compute
copy (``export.bundle.full_compute_copy``: every layer, full width) — giving per question the
edge time, the end-to-end time and the device process's CPU time for each
(``adaptive_vs_full``). ``--squad-passages N`` repeats that comparison on N dev-v1.1
paragraphs (evenly spaced in length) with their own questions: the benchmark's paragraph is
shorter than most SQuAD passages, so it understates what skimming saves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from elma_utils.atomic_files import write_json_atomic
from elma_utils.bench.throughput import percentile
from elma_utils.report import provenance

CONTEXT = (
    "The Seine is a 777-kilometre-long river in northern France. It rises at Source-Seine, "
    "30 kilometres northwest of Dijon, and flows through Paris into the English Channel at Le Havre. "
    "It is navigable by ocean-going vessels as far as Rouen, 120 kilometres from the sea. Over 60 "
    "percent of its length, as far as Burgundy, is negotiable by commercial riverboats, and nearly "
    "its whole length is available for recreational boating. The river gave its name to the "
    "departments of Seine-Maritime, Seine-et-Marne and Hauts-de-Seine."
)
QUESTIONS = [
    "How long is the Seine?",
    "Where does the Seine rise?",
    "Which city does the Seine flow through?",
    "Where does the river reach the English Channel?",
    "How far can ocean-going vessels navigate?",
    "How far is Rouen from the sea?",
    "What share of its length is negotiable by riverboats?",
    "Which departments are named after the river?",
    "In which country is the Seine?",
    "What is the Seine navigable by?",
]


def make_minilm_shape_bundle(out_dir: Path, precision: str = "int8") -> Path:
    """The real bundle's shape (MiniLM-L6 weights, 384 tokens) with untrained exits, E_T = -1."""
    from elma_utils.export.bundle import write_bundle
    from elma_utils.model.minilm import load_bert_backbone_from_hf
    from elma_utils.model.multi_exit import MultiExitQAModel
    from elma_utils.model.qa_model import SpanQAModel
    from elma_utils.model.tokenizers import QATokenizer

    backbone, _ = load_bert_backbone_from_hf(dropout=0.0)
    span = SpanQAModel(backbone)
    span.build_for()
    multi = MultiExitQAModel.from_span_model(span)
    return write_bundle(
        multi,
        QATokenizer.minilm(),
        out_dir,
        seq_len=384,
        precision=precision,
        thresholds={"policy": "entropy", "E_T": -1.0, "rule": "max"},
        model_version=f"minilm-shape-{precision}",
        doc_stride=128,
        max_query_len=64,
    )


def _elma(*args: str) -> list[str]:
    return [sys.executable, "-m", "elma_utils.cli", *args]


def _rss_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 1),
        "p95": round(percentile(ordered, 95), 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


def _start_server(work: Path, model_dir: Path) -> tuple[subprocess.Popen, int]:
    root = work / "server"
    (work / "authorized_keys").touch()  # devices are added with `elma keys add` once their keys exist
    proc = subprocess.Popen(
        _elma("serve", "--model", str(model_dir), "--server-root", str(root), "--listen", "127.0.0.1:0",
              "--authorized-keys", str(work / "authorized_keys")),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if m := re.search(r"SSH endpoint on 127\.0\.0\.1:(\d+)", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, int(m.group(1))
    raise RuntimeError("elma serve exited before it was ready")


def _device_config(work: Path, ssh_port: int, bundle: Path, input_kind: str, name: str | None = None,
                   context: str = CONTEXT) -> Path:  # fmt: skip
    """``elma device init`` as a user runs it, then register the key and pin the host key."""
    from elma_utils.edge.ssh_keys import add_known_host, load_private_key
    from elma_utils.server.status import ServerLayout

    name = name or input_kind
    config = work / f"device-{name}" / "device.toml"
    config.parent.mkdir(parents=True)
    (config.parent / "context.txt").write_text(context)
    init = ["device", "init", "--config", str(config), "--device-id", f"bench-{name}",
            "--server", f"127.0.0.1:{ssh_port}", "--bundle", str(bundle),
            "--context-file", str(config.parent / "context.txt"), "--input", input_kind]  # fmt: skip
    if input_kind == "folder":
        init += ["--folder", str(config.parent / "inbox")]
    subprocess.run(_elma(*init), check=True, capture_output=True)
    key_pub = next(config.parent.glob("*.pub"))
    subprocess.run(
        _elma("keys", "add", "--authorized-keys", str(work / "authorized_keys"), "--device",
              f"bench-{name}", "--public-key", str(key_pub)),
        check=True, capture_output=True,
    )  # fmt: skip
    host_key = ServerLayout(work / "server").host_key
    add_known_host(config.parent / "known_hosts", "127.0.0.1", ssh_port, load_private_key(host_key))
    return config


def _run_device(config: Path, feed, expected: int, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run ``elma device`` with ``feed(proc)`` giving it questions; collect JSON answers and memory."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        _elma("device", "run", "--config", str(config), "--json"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    records, first_answer_s, peak, cpu_first = [], None, 0.0, None
    feeder = threading.Thread(target=feed, args=(proc,), daemon=True)
    feeder.start()
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            records.append(json.loads(line))
            first_answer_s = first_answer_s or time.perf_counter() - started
            cpu_first = _cpu_s(proc.pid) if cpu_first is None else cpu_first
        peak = max(peak, _rss_mb(proc.pid, "VmHWM") or 0.0)
    rss_end = _rss_mb(proc.pid, "VmRSS")
    cpu_end = _cpu_s(proc.pid)
    proc.terminate()
    proc.wait(60)
    warm_cpu = (cpu_end - cpu_first) if cpu_first is not None and cpu_end is not None else float("nan")
    return {"records": records, "first_answer_s": first_answer_s, "peak_rss_mb": peak, "rss_mb": rss_end,
            "warm_cpu_s": warm_cpu}  # fmt: skip


def _typed_feed(questions: list[str]):
    def feed(proc: subprocess.Popen) -> None:
        for q in questions:
            proc.stdin.write(q + "\n")
            proc.stdin.flush()

    return feed


def _timings(records: list[dict], key: str) -> list[float]:
    return [float(r["timings_ms"][key]) for r in records if r.get("timings_ms", {}).get(key) is not None]


def run(out: Path, questions: int = 20, cold_runs: int = 3, swap_loads: int = 5, bundle: Path | None = None,
        adaptive: bool = False, passages: list[tuple[str, list[str]]] | None = None) -> dict[str, Any]:  # fmt: skip
    from elma_utils.edge.runtime import EdgeModel
    from elma_utils.speech.spoken_data import speak, write_wav  # espeak-ng, as the speech benchmark

    work = Path(tempfile.mkdtemp(prefix="elma-bench-device-"))
    print(f"work directory {work}", flush=True)
    given = bundle
    bundle = Path(bundle) if bundle is not None else make_minilm_shape_bundle(work / "bundle-int8")
    model_dir = _tiny_server_model(work / "server-model")
    asked = (QUESTIONS * (questions // len(QUESTIONS) + 1))[:questions]

    ask_cold = []
    (work / "context.txt").write_text(CONTEXT)
    for _ in range(cold_runs):
        t0 = time.perf_counter()
        subprocess.run(_elma("ask", "--bundle", str(bundle), "--question", QUESTIONS[0], "--context-file",
                             str(work / "context.txt"), "--json"), check=True, capture_output=True)  # fmt: skip
        ask_cold.append(time.perf_counter() - t0)

    server, ssh_port = _start_server(work, model_dir)
    try:
        typed_cfg = _device_config(work, ssh_port, bundle, "stdin")
        cold = [
            _run_device(typed_cfg, _typed_feed(QUESTIONS[:1]), 1)["first_answer_s"] for _ in range(cold_runs)
        ]
        typed = _run_device(typed_cfg, _typed_feed([QUESTIONS[0], *asked]), questions + 1)
        folder_cfg = _device_config(work, ssh_port, bundle, "folder")
        clips = work / "clips"
        clips.mkdir()
        wavs = []
        for i, q in enumerate(asked):
            write_wav(clips / f"q{i:03d}.wav", speak(q))
            wavs.append(clips / f"q{i:03d}.wav")

        def drop_clips(proc: subprocess.Popen) -> None:
            inbox = folder_cfg.parent / "inbox"
            inbox.mkdir(exist_ok=True)
            for wav in wavs:
                os.replace(wav, inbox / wav.name)
                time.sleep(0.05)

        spoken = _run_device(folder_cfg, drop_clips, len(wavs))
        compared = adaptive_vs_full(work, ssh_port, bundle, asked) if adaptive else None
        on_squad = (
            adaptive_vs_full(work, ssh_port, bundle, asked, passages) if adaptive and passages else None
        )
    finally:
        server.terminate()
        server.wait(60)

    loads = []
    for _ in range(swap_loads):
        t0 = time.perf_counter()
        EdgeModel.load(bundle)
        loads.append((time.perf_counter() - t0) * 1000)

    warm_typed = typed["records"][1:]  # the first question pays for the connection
    result = {
        "what": "device program: cold starts, warm per-question latency, memory, model swap",
        "bundle": {"shape": "MiniLM-L6 (all-MiniLM-L6-v2 weights), int8, seq 384, untrained exits",
                   "E_T": -1.0, "note": "every question runs all 6 layers and is offloaded: worst case; no F1"},
        "server": "elma serve with ELMA's SSH endpoint on loopback, small random model (offload = link + protocol)",
        "cold_start_s": {"elma_ask_typed_edge": _summary(ask_cold), "elma_device_first_answer": _summary(cold)},
        "warm_ms": {
            "typed_total": _summary(_timings(warm_typed, "total")),
            "typed_edge": _summary(_timings(warm_typed, "edge")),
            "typed_offload": _summary(_timings(warm_typed, "offload")),
            "spoken_total": _summary(_timings(spoken["records"], "total")),
            "spoken_asr": _summary(_timings(spoken["records"], "asr")),
            "spoken_edge": _summary(_timings(spoken["records"], "edge")),
        },
        "device_rss_mb": {"typed_peak": typed["peak_rss_mb"], "spoken_peak": spoken["peak_rss_mb"],
                          "spoken_end": spoken["rss_mb"]},
        "model_swap_load_ms": _summary(loads),
        "questions": {"typed": len(warm_typed), "spoken": len(spoken["records"])},
    }  # fmt: skip
    from elma_utils.bench.environment import machine_facts

    if given is not None:
        m = EdgeModel.load(bundle).manifest
        result["bundle"] = {"path": str(bundle), "model_version": m["model_version"], "precision": m["precision"],
                            "skim": m.get("skim"), "thresholds": "the bundle's own (thresholds.json)"}  # fmt: skip
    if compared is not None:
        result["adaptive_vs_full"] = compared
    if on_squad is not None:
        result["adaptive_vs_full_squad"] = {"source": "dev-v1.1 paragraphs at evenly spaced length quantiles",
                                            **on_squad}  # fmt: skip
    result["machine"] = machine_facts()
    result[provenance.KEY] = provenance.provenance()
    write_json_atomic(out, result)
    return result


def adaptive_vs_full(
    work: Path,
    ssh_port: int,
    bundle: Path,
    questions: list[str],
    passages: list[tuple[str, list[str]]] | None = None,
) -> dict[str, Any]:
    """Typed warm runs of ``bundle`` as it is and of its full-compute copy, one ``elma device``
    process each against the same server: per-question edge and end-to-end ms (the device's
    own timings), CPU ms of the device process per question, and the edge's kept share.

    ``passages``: (context, its questions) pairs, each asked by its own pair of device
    processes (the device answers about one text at a time), pooled; default: ``questions``
    about the benchmark's one paragraph."""
    from elma_utils.export.bundle import full_compute_copy

    passages = passages or [(CONTEXT, list(questions))]
    full = full_compute_copy(bundle, work / f"{Path(bundle).name}-full-compute-{len(passages)}")
    n = sum(len(qs) for _, qs in passages)
    out: dict[str, Any] = {"bundle": str(bundle), "questions": n, "passages": len(passages),
                           "context_words": [len(c.split()) for c, _ in passages]}  # fmt: skip
    for name, b in (("adaptive", Path(bundle)), ("full", full)):
        warm, cpu_s = [], 0.0
        for i, (context, asked) in enumerate(passages):
            cfg = _device_config(
                work, ssh_port, b, "stdin", name=f"{name}-typed-{len(passages)}-{i}", context=context
            )
            ran = _run_device(cfg, _typed_feed([asked[0], *asked]), len(asked) + 1)
            warm += ran["records"][1:]  # the first question pays for the connection
            cpu_s += ran["warm_cpu_s"]
        out[name] = {
            "edge_ms": _summary(_timings(warm, "edge")),
            "end_to_end_ms": _summary(_timings(warm, "total")),
            "cpu_ms_per_question": cpu_s * 1e3 / max(len(warm), 1),
            "share_offloaded": sum(r.get("source") == "server" for r in warm) / max(len(warm), 1),
            "answered": len(warm),
            "avg_exit_layer": statistics.fmean([r["exit_layer"] for r in warm if r.get("exit_layer")] or [0]),
        }
    for key in ("edge_ms", "end_to_end_ms"):
        out[f"speedup_{key.removesuffix('_ms')}_p50"] = out["full"][key]["p50"] / max(
            out["adaptive"][key]["p50"], 1e-9
        )
    out["cpu_ratio"] = out["full"]["cpu_ms_per_question"] / max(out["adaptive"]["cpu_ms_per_question"], 1e-9)
    return out


def squad_passages(
    count: int, data_dir: Path | None = None, min_questions: int = 4
) -> list[tuple[str, list[str]]]:
    """``count`` dev-v1.1 paragraphs with their questions, at evenly spaced quantiles of the
    paragraphs' length in words (so short and long passages both count), for the adaptive run:
    the benchmark's own paragraph is shorter than most SQuAD passages, and skimming saves more
    on longer ones."""
    from elma_utils.squad.data import load_squad

    if count < 1:
        raise ValueError("count must be at least 1")
    by_context: dict[str, list[str]] = {}
    for e in load_squad("1.1", "dev", data_dir=data_dir).examples:
        by_context.setdefault(e.context, []).append(e.question)
    ranked = sorted(
        (c for c, qs in by_context.items() if len(qs) >= min_questions), key=lambda c: len(c.split())
    )
    picks = sorted({round(q * (len(ranked) - 1)) for q in [(i + 0.5) / count for i in range(count)]})
    return [(ranked[i], by_context[ranked[i]]) for i in picks]


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (/proc/<pid>/stat), None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tiny_server_model(directory: Path) -> Path:
    """A small random full model for the server: the benchmark measures the device, not QA."""
    from elma_utils.model import artifacts
    from elma_utils.model.backbones import TINY_BERT, build_bert_backbone
    from elma_utils.model.qa_model import SpanQAModel
    from elma_utils.model.tokenizers import QATokenizer

    model = SpanQAModel(build_bert_backbone(dropout=0.0, **TINY_BERT))
    model.build_for()
    config = {"backbone": {"kind": "bert", "kwargs": dict(TINY_BERT)}, "max_seq_len": 384, "doc_stride": 128,
              "max_query_len": 64, "model_version": "bench-server-tiny"}  # fmt: skip
    return artifacts.save_artifact(directory, model, QATokenizer.minilm(), config)


def main(argv: list[str] | None = None) -> int:
    from elma_utils.config import PROJECT_ROOT

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "metrics" / "bench_device.json")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="this edge bundle instead of the MiniLM-shape one (e.g. bench.adaptive_run's skim bundle)",
    )
    p.add_argument("--adaptive", action="store_true",
                   help="also compare the bundle with its full-compute copy (edge, end to end, CPU time)")  # fmt: skip
    p.add_argument("--squad-passages", type=int, default=0, metavar="N",
                   help="with --adaptive: also N dev-v1.1 paragraphs with their questions (needs SQuAD)")  # fmt: skip
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding the SQuAD files")
    args = p.parse_args(argv)
    if args.squad_passages and not args.adaptive:
        p.error("--squad-passages needs --adaptive (it compares the adaptive bundle with full compute)")
    if args.squad_passages < 0:
        p.error("--squad-passages must be >= 0")
    if args.adaptive and args.bundle is None:
        p.error(
            "--adaptive needs --bundle (an adaptive bundle, e.g. from python -m elma_utils.bench.adaptive_run)"
        )
    try:
        passages = squad_passages(args.squad_passages, args.data_dir) if args.squad_passages else None
    except FileNotFoundError as err:
        p.error(f"--squad-passages needs SQuAD dev-v1.1: {err}")
    result = run(args.out, args.questions, args.cold_runs, bundle=args.bundle, adaptive=args.adaptive,
                 passages=passages)  # fmt: skip
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "cold_start_s",
                    "warm_ms",
                    "device_rss_mb",
                    "model_swap_load_ms",
                    "adaptive_vs_full",
                    "adaptive_vs_full_squad",
                )
                if k in result
            },  # fmt: skip
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
