"""The whole pipeline, stage by stage, with early exit and without: one harness for any machine.

    with local_offload_server("artifacts/minilm-cpu", workdir) as link:
        result = run_pipeline_benchmark(["artifacts/minilm-cpu-edge/int8"], dev_questions(30), link=link)
    print(format_table(result)); plot_stages(result)

Each question goes through what a device does: speech recognition (spoken questions), then
the edge bundle layer by layer, then — when no layer settled it — the offload round trip over
SSH to the server model. Per question every stage is timed: ``asr``, ``tokenise``,
``embeddings``, ``layer_1`` … ``layer_K`` (only the layers computed), ``exit_decisions``
(entropy, best span and policy after each layer), ``offload_link`` (SSH, network and
serialisation: the round trip minus the server's own time), ``server`` and ``other`` (what is
left of the end-to-end wall time). The stages are disjoint intervals inside the end-to-end one,
so they add up to it exactly, ``other`` included.

Modes (``MODES``) run the same bundle with the same questions: ``early_exit`` (the bundle's
calibrated policy; unsettled questions offloaded) against ``no_early_exit`` (``NeverExit``:
every layer, answered on the device from the last one). Runs alternate the mode order so that
a machine shared with other work disturbs both alike. Each mode's pass over the questions is
one ``EnergyMeter`` window (tegrastats, RAPL or CPU time; the result names the source), with
the peak RSS reset before it where Linux allows (``/proc/self/clear_refs``).

The server runs in its own process (``local_offload_server``: ``elma serve`` with ELMA's SSH
endpoint on loopback), so CPU time, energy and RSS measured here are the device's only.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elma_utils.bench.energy import EnergyMeter, describe_energy_sources
from elma_utils.early_exit.policies import NeverExit

SAMPLE_RATE = 16000
SCHEMA = "elma-pipeline-benchmark/1"
FIXED_STAGES = ("asr", "tokenise", "embeddings")
TAIL_STAGES = ("exit_decisions", "offload_link", "server", "other")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Mode:
    """How the device answers: the bundle's policy (None) or NeverExit, offloading or not."""

    never_exit: bool
    offload: bool


MODES = {
    "early_exit": Mode(never_exit=False, offload=True),  # ELMA: exit early, offload the rest
    "no_early_exit": Mode(never_exit=True, offload=False),  # every layer, answered on the device
    "early_exit_edge_only": Mode(never_exit=False, offload=False),  # an offline device
    "no_early_exit_offload": Mode(never_exit=True, offload=True),  # every layer, then the server
}
DEFAULT_MODES = ("early_exit", "no_early_exit")


# ---------------------------------------------------------------------------------------------- questions
@dataclass
class BenchQuestion:
    """One question: typed (``audio`` None) or spoken (16 kHz mono float32 samples)."""

    qas_id: str
    question: str  # as written: typed input, and the reference for WER
    context: str
    answers: tuple[str, ...] = ()
    audio: np.ndarray | None = field(default=None, repr=False)
    audio_path: str | None = None

    @property
    def kind(self) -> str:
        return "typed" if self.audio is None else "spoken"


def dev_questions(
    audio_n: int = 30,
    typed_n: int = 0,
    *,
    examples: Sequence | None = None,
    data_dir: Path | None = None,
    spoken_dir: str | Path | None = None,
    voice: str = "en-us",
    speed: int = 160,
    seed: int | None = 0,
) -> list[BenchQuestion]:
    """``audio_n`` spoken then ``typed_n`` typed SQuAD dev-v1.1 questions, all different.

    ``examples`` (SquadExamples) default to dev-v1.1's answerable questions; with ``seed`` a
    random sample in file order (the first questions of the file all share one article).
    Spoken ones are read by espeak-ng into ``spoken_dir`` (default
    ``data/cache/spoken/bench``; existing clips are reused) and loaded with ``load_audio``.
    """
    from elma_utils.config import PROJECT_ROOT
    from elma_utils.speech.spoken_data import pick_questions

    if examples is None:
        from elma_utils.squad.data import load_squad

        examples = load_squad("1.1", "dev", data_dir=data_dir).examples
    by_id = {e.qas_id: e for e in examples if not e.is_impossible}
    chosen = pick_questions(list(by_id.values()), audio_n + typed_n, seed=seed)
    if len(chosen) < audio_n + typed_n:
        raise ValueError(f"asked for {audio_n + typed_n} questions, only {len(chosen)} available")
    out = []
    for i, (qas_id, _) in enumerate(chosen):
        ex = by_id[qas_id]
        q = BenchQuestion(qas_id, ex.question, ex.context, tuple(a.text for a in ex.answers))
        if i < audio_n:
            from elma_utils.speech.audio import load_audio
            from elma_utils.speech.spoken_data import synthesize_item

            where = Path(spoken_dir) if spoken_dir else PROJECT_ROOT / "data" / "cache" / "spoken" / "bench"
            item = synthesize_item(qas_id, ex.question, where, voice, speed)
            q.audio, q.audio_path = load_audio(item.path), str(item.path)
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------ server link
@dataclass(frozen=True)
class OffloadLink:
    """How the device reaches the server: an SSH endpoint, a pinned host key, a client key."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts: Path
    target: tuple[str, int]  # the offload server's socket, as seen from the SSH server
    description: str = ""

    def tunnel(self, timeout: float = 30.0):
        """A new (not yet connected) ``SSHTunnelClient`` over this link."""
        from elma_utils.edge.ssh_client import SSHTunnelClient

        return SSHTunnelClient(
            self.host, self.port, self.user, self.key_path, self.known_hosts, self.target, timeout=timeout
        )


_LISTEN = re.compile(r"devices forward to 127\.0\.0\.1:(\d+)")
_SSH = re.compile(r"SSH endpoint on 127\.0\.0\.1:(\d+)")


@contextlib.contextmanager
def local_offload_server(
    model_dir: str | Path, workdir: str | Path, *, start_timeout_s: float = 600.0
) -> Iterator[OffloadLink]:
    """``elma serve`` with ELMA's SSH endpoint on loopback, in its own process; yields the link.

    Keys are made in ``workdir`` (client key, authorized_keys, host key pinned in
    known_hosts); the server's log is ``workdir/serve.log``. SIGTERM on exit.
    """
    from elma_utils.config import PROJECT_ROOT
    from elma_utils.edge.ssh_keys import (
        add_known_host,
        generate_ed25519_key,
        load_private_key,
        write_authorized_keys,
    )

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    client_key = work / "edge_ed25519"
    authorized = write_authorized_keys(  # the comment is the device id the server checks signatures for
        work / "authorized_keys", [generate_ed25519_key(client_key)], comment="bench"
    )
    host_key = work / "host_ed25519"
    generate_ed25519_key(host_key, comment="bench server")
    # A TCP service port (not the Unix socket `elma serve --ssh-port` prefers): the benchmark
    # compares the SSH link with plain TCP to the same service.
    cmd = [sys.executable, "-m", "elma_utils.cli", "serve", "--model", str(model_dir),
           "--store", str(work / "hard-questions.sqlite3"), "--port", "0", "--ssh-port", "0",
           "--authorized-keys", str(authorized), "--host-key", str(host_key)]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, text=True
    )
    watchdog = threading.Timer(start_timeout_s, proc.kill)
    watchdog.start()
    try:
        ports: dict[str, int] = {}
        while len(ports) < 2:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"elma serve exited before it was ready; see {work / 'serve.log'}")
            for name, pattern in (("service", _LISTEN), ("ssh", _SSH)):
                if m := pattern.search(line):
                    ports[name] = int(m.group(1))
        watchdog.cancel()
        known = add_known_host(work / "known_hosts", "127.0.0.1", ports["ssh"], load_private_key(host_key))
        yield OffloadLink(
            "127.0.0.1", ports["ssh"], "elma", client_key, known, ("127.0.0.1", ports["service"]),
            description=f"elma serve --model {model_dir} (pid {proc.pid}) via ELMA's SSH endpoint on loopback",
        )  # fmt: skip
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()
        log.close()


# ------------------------------------------------------------------------------------------ measuring
class _PolicyEdge:
    """The bundle answering with one fixed policy; keeps the last ``EdgeAnswer`` (per-layer times),
    which ``EdgeQA`` reduces to totals."""

    def __init__(self, model, policy):
        self.model, self.policy = model, policy
        self.manifest = model.manifest
        self.last = None

    def answer(self, question: str, context: str):
        self.last = self.model.answer(question, context, policy=self.policy)
        return self.last


@dataclass
class _Outcome:
    text: str
    source: str
    edge: Any  # EdgeAnswer
    edge_ms: float
    offload_ms: float = 0.0
    server_ms: float = 0.0
    error: str | None = None


class _ModeRunner:
    """Answers a (question, context) the way one mode does."""

    def __init__(self, model, mode: Mode, tunnel, deadline_ms: int):
        self.edge = _PolicyEdge(model, NeverExit() if mode.never_exit else model.policy)
        self.client = None
        if mode.offload:
            from elma_utils.edge.client import EdgeQA

            self.client = EdgeQA(self.edge, tunnel, None, device_id="bench", deadline_ms=deadline_ms)

    def __call__(self, question: str, context: str) -> _Outcome:
        if self.client is not None:
            r = self.client.answer(question, context)
            return _Outcome(r.text, r.source, self.edge.last, r.edge_ms, r.offload_ms, r.server_ms, r.error)
        t0 = time.perf_counter()
        a = self.edge.answer(question, context)
        return _Outcome(
            a.text, "edge" if a.solved else "edge-last-layer", a, (time.perf_counter() - t0) * 1e3
        )


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def measure_question(q: BenchQuestion, runner: Callable[[str, str], _Outcome], recognizer=None) -> dict:
    """One question through the pipeline: its stage times (ms), end-to-end time and answer."""
    stages: dict[str, float] = {}
    heard = None
    t0 = time.perf_counter()
    text = q.question
    if q.audio is not None:
        a0 = time.perf_counter()
        heard = text = recognizer.transcribe(
            q.audio, SAMPLE_RATE, context=q.context
        ).text  # as `elma ask` does
        stages["asr"] = _ms_since(a0)
    out = runner(text, q.context) if text.strip() else None
    e2e = _ms_since(t0)
    row: dict[str, Any] = {"qas_id": q.qas_id, "kind": q.kind, "heard": heard, "e2e_ms": e2e}
    if out is None:  # nothing recognised: nothing to ask
        row.update(source="no-speech", answer="", exit_layer=0, layers=0)
    else:
        a = out.edge
        stages.update(tokenise=a.tokenise_ms, embeddings=a.embeddings_ms)
        stages.update({f"layer_{k}": ms for k, ms in enumerate(a.layer_ms, start=1)})
        stages["exit_decisions"] = out.edge_ms - a.total_ms
        if out.offload_ms:  # an attempt that failed (fallback) is all link: no server time
            stages["offload_link"] = out.offload_ms - out.server_ms
        if out.source == "server":
            stages["server"] = out.server_ms
        row.update(source=out.source, answer=out.text, exit_layer=int(a.exit_layer), layers=len(a.layer_ms),
                   edge_ms=out.edge_ms, offload_ms=out.offload_ms, server_ms=out.server_ms)  # fmt: skip
        if out.error:
            row["error"] = out.error
    stages["other"] = e2e - sum(stages.values())
    row["stages"] = stages
    if q.answers:
        from elma_utils.squad.metrics import exact_match_score, f1_score, metric_max_over_ground_truths

        row["f1"] = 100.0 * metric_max_over_ground_truths(f1_score, row["answer"], list(q.answers))
        row["em"] = 100.0 * float(
            metric_max_over_ground_truths(exact_match_score, row["answer"], list(q.answers))
        )
    return row


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next window reports its own peak (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float | None:
    """This process's resident memory now (VmRSS, MiB); None where /proc has no status."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    return None


# ------------------------------------------------------------------------------------------ statistics
def percentiles(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/mean/min/max (ms) and the count; None for an empty list."""
    v = np.asarray(values_ms, dtype=np.float64)
    if not v.size:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "min_ms": None,
                "max_ms": None, "n": 0}  # fmt: skip
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(v.mean()), 3), "min_ms": round(float(v.min()), 3),
            "max_ms": round(float(v.max()), 3), "n": int(v.size)}  # fmt: skip


def stage_names(num_layers: int) -> list[str]:
    return [*FIXED_STAGES, *(f"layer_{k}" for k in range(1, num_layers + 1)), *TAIL_STAGES]


def combine_energy(blocks: list[dict]) -> dict[str, Any]:
    """Energy windows of one mode added up; per-question values over all their questions."""
    items = sum(b["items"] for b in blocks)
    joules = None if any(b["joules"] is None for b in blocks) else sum(b["joules"] for b in blocks)
    wall = sum(b["wall_seconds"] for b in blocks)
    cpu = sum(b["cpu_seconds"] for b in blocks)
    return {
        "source": blocks[0]["source"],
        "windows": len(blocks),
        "questions": items,
        "joules": joules,
        "joules_per_question": None if joules is None else joules / items,
        "average_watts": None if joules is None or wall <= 0 else joules / wall,
        "cpu_seconds": cpu,
        "cpu_seconds_per_question": cpu / items,
        "wall_seconds": wall,
        "wall_seconds_per_question": wall / items,
        "peak_rss_mb": max(b["peak_rss_mb"] for b in blocks),
        "notes": sorted({n for b in blocks for n in b.get("notes", [])}),
    }


def summarise_mode(rows: list[dict], num_layers: int, energy_blocks: list[dict]) -> dict[str, Any]:
    """Per-stage percentiles (over the questions that ran the stage), mean per question (all of
    them, 0 where a stage did not run: these add up to the mean end-to-end time), exits, energy."""
    names = stage_names(num_layers)
    stages = {s: percentiles([r["stages"][s] for r in rows if s in r["stages"]]) for s in names}
    offloaded = [r for r in rows if r.get("offload_ms")]
    sources = Counter(r["source"] for r in rows)
    out: dict[str, Any] = {
        "samples": len(rows),
        "stages": stages,
        "stage_mean_ms": {s: float(np.mean([r["stages"].get(s, 0.0) for r in rows])) for s in names},
        "end_to_end": percentiles([r["e2e_ms"] for r in rows]),
        "end_to_end_spoken": percentiles([r["e2e_ms"] for r in rows if r["kind"] == "spoken"]),
        "end_to_end_typed": percentiles([r["e2e_ms"] for r in rows if r["kind"] == "typed"]),
        "edge": percentiles([r["edge_ms"] for r in rows if "edge_ms" in r]),
        "offload_round_trip": percentiles([r["offload_ms"] for r in offloaded]),
        "layers_computed_mean": float(np.mean([r["layers"] for r in rows])),
        "layers_computed_total": int(sum(r["layers"] for r in rows)),
        "exit_layers": {str(k): v for k, v in sorted(Counter(r["exit_layer"] for r in rows).items())},
        "sources": dict(sorted(sources.items())),
        "offloaded_fraction": len(offloaded) / len(rows),
        "energy": combine_energy(energy_blocks),
    }
    scored = [r for r in rows if "f1" in r]
    if scored:
        out["quality"] = {"f1": float(np.mean([r["f1"] for r in scored])),
                          "em": float(np.mean([r["em"] for r in scored])), "n": len(scored)}  # fmt: skip
    return out


def compare_modes(modes: dict[str, dict], a: str = "early_exit", b: str = "no_early_exit") -> dict | None:
    """Ratios a/b of what the user cares about: time and energy per question, layers computed."""
    if a not in modes or b not in modes:
        return None
    x, y = modes[a], modes[b]

    def ratio(p: float | None, q: float | None) -> float | None:
        return None if p is None or q is None or q == 0 else p / q

    ex, ey = x["energy"], y["energy"]
    return {
        "modes": [a, b],
        "end_to_end_p50_ratio": ratio(x["end_to_end"]["p50_ms"], y["end_to_end"]["p50_ms"]),
        "end_to_end_mean_ratio": ratio(x["end_to_end"]["mean_ms"], y["end_to_end"]["mean_ms"]),
        "edge_mean_ratio": ratio(x["edge"]["mean_ms"], y["edge"]["mean_ms"]),
        "layers_computed_ratio": ratio(x["layers_computed_mean"], y["layers_computed_mean"]),
        "joules_per_question_ratio": ratio(ex["joules_per_question"], ey["joules_per_question"]),
        "cpu_seconds_per_question_ratio": ratio(
            ex["cpu_seconds_per_question"], ey["cpu_seconds_per_question"]
        ),
        "f1_difference": (x["quality"]["f1"] - y["quality"]["f1"])
        if "quality" in x and "quality" in y
        else None,
    }


# ---------------------------------------------------------------------------------------- the benchmark
def _bundle_info(model, path: Path) -> dict[str, Any]:
    m = model.manifest
    return {
        "path": str(path),
        "model_version": m.get("model_version"),
        "precision": m.get("precision"),
        "num_layers": model.num_layers,
        "seq_len": model.seq_len,
        "dynamic_length": model.dynamic_length,
        "thresholds": model.thresholds,
        "policy": repr(model.policy),
    }


def _label(model, path: Path, taken: set[str]) -> str:
    base = str(model.manifest.get("precision") or path.name)
    skim = model.manifest.get("skim")
    if skim:  # an adaptive-width bundle beside the depth-only export of the same precision
        base += f"-skim-L{skim.get('layer')}"
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    return label


def _warm_server(model, tunnel, q: BenchQuestion, recognizer) -> dict:
    """One forced offload (NeverExit) with a long deadline: the server's first call builds its graph."""
    runner = _ModeRunner(model, MODES["no_early_exit_offload"], tunnel, deadline_ms=300_000)
    row = measure_question(q, runner, recognizer)
    return {"source": row["source"], "offload_ms": row.get("offload_ms"), "error": row.get("error")}


def _link_round_trip(link: OffloadLink) -> dict[str, Any]:
    """What the SSH link alone costs per line (ping → pong), against plain TCP to the server."""
    from elma_utils.bench.link_overhead import measure_round_trip
    from elma_utils.edge.protocol import Ping, encode

    try:
        trips = measure_round_trip(
            link.tunnel, encode(Ping("bench")), lines=50, new_connection_lines=5, warmup=5
        )
    except Exception as err:  # noqa: BLE001 - a remote target has no plain-TCP path from here
        return {"error": f"{type(err).__name__}: {err}"}
    return {k: v.as_dict() for k, v in trips.items()}


def run_pipeline_benchmark(
    bundles: str | Path | Sequence[str | Path],
    questions: Sequence[BenchQuestion],
    *,
    link: OffloadLink | None = None,
    recognizer: Any = "whisper",
    runs: int = 3,
    warmup: int = 2,
    modes: Sequence[str] = DEFAULT_MODES,
    energy_source: str = "auto",
    deadline_ms: int = 10_000,
    num_threads: int | None = None,
    measure_link: bool = True,
    keep_samples: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Measure every mode on every bundle with the same questions; a JSON-able result.

    ``link``: the server (``local_offload_server`` or a real one); None = an offline device
    (offloads fall back to the edge answer). ``recognizer``: an engine name for
    ``get_recognizer`` or an object with ``transcribe(audio, sr)``; only used for spoken
    questions. ``warmup`` questions per mode are answered untimed first, and one question is
    offloaded untimed to warm the server. ``runs`` passes over ``questions`` per mode.
    """
    from elma_utils.edge.runtime import EdgeModel

    if runs < 1 or not questions:
        raise ValueError("need runs ≥ 1 and at least one question")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    say = log or (lambda _line: None)
    paths = [Path(bundles)] if isinstance(bundles, str | Path) else [Path(b) for b in bundles]
    if isinstance(recognizer, str) and any(q.audio is not None for q in questions):
        from elma_utils.speech.recognizers import get_recognizer

        recognizer = get_recognizer(recognizer)
    load_start = os.getloadavg()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "energy_sources": describe_energy_sources(),
        "config": {
            "runs": runs, "warmup": warmup, "modes": list(modes), "energy_source": energy_source,
            "deadline_ms": deadline_ms, "num_threads": num_threads,
            "questions": len(questions), "spoken": sum(q.kind == "spoken" for q in questions),
            "typed": sum(q.kind == "typed" for q in questions),
            "asr": None if recognizer is None or isinstance(recognizer, str) else
            {"engine": getattr(recognizer, "name", type(recognizer).__name__),
             "model": getattr(recognizer, "model_name", None)},
            "server": None if link is None else link.description, "nice": os.nice(0),
            "peak_rss_reset": reset_peak_rss(),
            # was the server stack in this (device) process while measuring? It should not be
            "loaded_in_device_process": {m: m in sys.modules for m in ("tensorflow", "keras", "torch")},
        },
        "rss_mb": {"before_bundles": current_rss_mb()},
        "questions": [{"qas_id": q.qas_id, "kind": q.kind, "question": q.question,
                       "audio_seconds": None if q.audio is None else len(q.audio) / SAMPLE_RATE}
                      for q in questions],
        "bundles": {},
    }  # fmt: skip
    tunnel = link.tunnel() if link is not None else None
    sampler = _start_sampler(energy_source)
    try:
        if link is not None and measure_link:
            say("measuring the SSH link (ping round trips)")
            result["link_round_trip"] = _link_round_trip(link)
        for path in paths:
            model = EdgeModel.load(path, num_threads=num_threads)
            label = _label(model, path, set(result["bundles"]))
            result["rss_mb"][f"after_loading_{label}"] = current_rss_mb()
            result["bundles"][label] = _bench_bundle(
                model, path, questions, modes, tunnel, recognizer, runs, warmup, deadline_ms,
                energy_source, sampler, keep_samples, lambda line, lb=label: say(f"[{lb}] {line}"),
            )  # fmt: skip
    finally:
        if sampler is not None:
            sampler.stop()
        if tunnel is not None:
            result["tunnel"] = tunnel.stats.as_dict()
            tunnel.close()
    result["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    result["machine"] = _machine()
    result["findings"] = early_exit_findings(result)
    return result


PRIOR_ENERGY = (
    "Prior numbers: the 2021 ELMA prototype measured 16 % less energy with early exit on a Jetson TX2 "
    "for one dev-set evaluation; EdgeBERT reports up to 2.5x lower energy than latency-unbounded early exit."
)


def early_exit_findings(result: dict[str, Any]) -> list[str]:
    """The comparison a user asks for, in sentences: early exit against all layers on the device,
    per bundle — layers, edge time, end-to-end time and energy (or what stands in for it here),
    and what ASR weighs in it — then the prior numbers to set it against."""
    lines = []
    for label, b in result.get("bundles", {}).items():
        c = b.get("comparison")
        if not c:
            continue
        ee, ne = b["modes"]["early_exit"], b["modes"]["no_early_exit"]

        def x(key: str, c: dict = c) -> str:
            return "n/a" if c.get(key) is None else f"x{c[key]:.2f}"

        energy = ee["energy"]
        if c.get("joules_per_question_ratio") is not None:
            spent = f"energy per question {x('joules_per_question_ratio')} ({energy['source']})"
        else:
            spent = (
                f"no energy counter here ({'; '.join(energy.get('notes') or []) or energy['source']}), so "
                f"CPU-seconds per question stand in: {x('cpu_seconds_per_question_ratio')}"
            )
        asr = ne.get("stage_mean_ms", {}).get("asr")
        share = f"; ASR is {asr:.0f} of {ne['end_to_end']['mean_ms']:.0f} ms per question" if asr else ""
        f1 = "" if c.get("f1_difference") is None else f"; F1 {c['f1_difference']:+.1f} on these questions"
        lines.append(
            f"{label}: early exit (offloading what it cannot settle) against all layers on the device — "
            f"edge layers computed {x('layers_computed_ratio')}, edge time {x('edge_mean_ratio')}, "
            f"end to end {x('end_to_end_mean_ratio')}{share}; {spent}{f1}."
        )
    if lines:
        lines.append(PRIOR_ENERGY)
    return lines


def _start_sampler(energy_source: str):
    """One tegrastats sampler shared by every window (when tegrastats is the source)."""
    if energy_source not in ("auto", "tegrastats") or describe_energy_sources()["tegrastats"] is None:
        return None
    from elma_utils.bench.tegrastats import TegrastatsSampler

    try:
        return TegrastatsSampler().start()
    except RuntimeError:
        if energy_source == "tegrastats":
            raise
        return None


def _bench_bundle(model, path, questions, modes, tunnel, recognizer, runs, warmup, deadline_ms,
                  energy_source, sampler, keep_samples, say: Log) -> dict[str, Any]:  # fmt: skip
    runners = {m: _ModeRunner(model, MODES[m], tunnel, deadline_ms) for m in modes}
    info = _bundle_info(model, path)
    if tunnel is not None and any(MODES[m].offload for m in modes):
        info["server_warmup"] = _warm_server(model, tunnel, questions[0], recognizer)
        say(f"server warm-up: {info['server_warmup']}")
    for m in modes:
        for i in range(warmup):
            measure_question(questions[i % len(questions)], runners[m], recognizer)
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    blocks: dict[str, list[dict]] = {m: [] for m in modes}
    for run in range(runs):
        for m in modes if run % 2 == 0 else list(reversed(modes)):
            reset_peak_rss()
            with EnergyMeter(source=energy_source, sampler=sampler) as meter:
                measured = [measure_question(q, runners[m], recognizer) for q in questions]
            for row in measured:
                row.update(run=run, mode=m)
            rows[m] += measured
            blocks[m].append(meter.result(items=len(measured)))
            p50 = float(np.median([r["e2e_ms"] for r in measured]))
            say(f"run {run + 1}/{runs} {m}: {len(measured)} questions, end-to-end p50 {p50:.1f} ms")
    summary = {m: {"never_exit": MODES[m].never_exit, "offload": MODES[m].offload,
                   "policy": repr(runners[m].edge.policy),
                   **summarise_mode(rows[m], model.num_layers, blocks[m])} for m in modes}  # fmt: skip
    spoken = [r for m in modes for r in rows[m] if r["kind"] == "spoken"]
    if spoken:
        from elma_utils.speech.wer import word_error_rate

        text = {q.qas_id: q.question for q in questions}
        info["asr_wer"] = word_error_rate(
            [text[r["qas_id"]] for r in spoken], [r["heard"] or "" for r in spoken]
        )
    out = {**info, "modes": summary, "comparison": compare_modes(summary)}
    out["per_question"] = _per_question(questions, rows)
    if keep_samples:
        out["samples"] = [r for m in modes for r in rows[m]]
    return out


def _per_question(questions: Sequence[BenchQuestion], rows: dict[str, list[dict]]) -> list[dict]:
    """Per question and mode: median end-to-end time, exit layer, where the answer came from."""
    out = []
    for q in questions:
        entry: dict[str, Any] = {"qas_id": q.qas_id, "kind": q.kind, "question": q.question}
        for m, mode_rows in rows.items():
            mine = [r for r in mode_rows if r["qas_id"] == q.qas_id]
            entry[m] = {
                "e2e_ms_median": float(np.median([r["e2e_ms"] for r in mine])),
                "exit_layer": mine[-1]["exit_layer"],
                "source": mine[-1]["source"],
                "answer": mine[-1]["answer"],
                "heard": mine[-1]["heard"],
                **({"f1": mine[-1]["f1"]} if "f1" in mine[-1] else {}),
            }
        out.append(entry)
    return out


def _machine() -> dict[str, Any]:
    """``machine_description()`` (it imports Keras: called after the measurements); without Keras
    (an edge device) the same facts from ``environment.machine_facts``."""
    from elma_utils.bench.environment import machine_facts

    try:
        from elma_utils.bench.inference import machine_description

        return {**machine_facts(), **machine_description()}
    except ImportError:
        return machine_facts()


# ------------------------------------------------------------------------------------------- reporting
def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: per bundle, stage p50/p95/p99 for each mode, then energy, memory and exits."""
    src = result["energy_sources"]["auto_source"]
    parts = []
    for label, b in result["bundles"].items():
        modes = list(b["modes"])
        head = "| stage (ms) | " + " | ".join(f"{m} p50 | p95 | p99 | n" for m in modes) + " |"
        lines = [
            f"**{label}** — {b['model_version']}, {b['num_layers']} layers, seq {b['seq_len']}"
            f"{' (dynamic length)' if b['dynamic_length'] else ''}; policy {b['policy']}",
            "",
            head,
            "|---|" + "---:|---:|---:|---:|" * len(modes),
        ]
        names = [
            s for s in stage_names(b["num_layers"]) if any(b["modes"][m]["stages"][s]["n"] for m in modes)
        ]
        for name, pick in [*((s, lambda d, s=s: d["stages"][s]) for s in names),
                           ("offload round trip", lambda d: d["offload_round_trip"]),
                           ("**end to end**", lambda d: d["end_to_end"])]:  # fmt: skip
            cells = []
            for m in modes:
                p = pick(b["modes"][m])
                cells.append(f"{_fmt(p['p50_ms'])} | {_fmt(p['p95_ms'])} | {_fmt(p['p99_ms'])} | {p['n']}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| per question | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
        rows = [
            (f"energy J ({src})", lambda d: _fmt(d["energy"]["joules_per_question"], 3)),
            ("CPU s", lambda d: _fmt(d["energy"]["cpu_seconds_per_question"], 3)),
            ("wall s", lambda d: _fmt(d["energy"]["wall_seconds_per_question"], 3)),
            ("peak RSS MB", lambda d: _fmt(d["energy"]["peak_rss_mb"])),
            ("layers computed", lambda d: _fmt(d["layers_computed_mean"], 2)),
            ("offloaded %", lambda d: _fmt(100 * d["offloaded_fraction"])),
            ("F1", lambda d: _fmt(d.get("quality", {}).get("f1"))),
        ]
        lines += [f"| {name} | " + " | ".join(get(b["modes"][m]) for m in modes) + " |" for name, get in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


STAGE_COLOURS = {"asr": "#9e9e9e", "tokenise": "#e6ab02", "embeddings": "#7570b3", "exit_decisions": "#1b9e77",
                 "offload_link": "#ff7f0e", "server": "#d62728", "other": "#000000"}  # fmt: skip


def _stage_colour(name: str, num_layers: int):
    import matplotlib.pyplot as plt

    if name.startswith("layer_"):
        return plt.get_cmap("Blues")(0.3 + 0.65 * int(name.split("_")[1]) / num_layers)
    return STAGE_COLOURS[name]


def _stacked(ax, b: dict[str, Any], names: list[str]) -> None:
    """One stacked bar per mode, its total (ms) written on top."""
    from elma_utils.plotting import label_bars

    modes = list(b["modes"])
    bottoms = np.zeros(len(modes))
    top = None
    for name in names:
        heights = np.array([b["modes"][m]["stage_mean_ms"][name] for m in modes])
        if heights.any():
            top = ax.bar(modes, heights, bottom=bottoms, width=0.6, label=name,
                         color=_stage_colour(name, b["num_layers"]))  # fmt: skip
        bottoms += heights
    if top is not None:  # the last drawn segment ends at each mode's total
        label_bars(ax, top, labels=[f"{t:.0f} ms" if t >= 10 else f"{t:.1f} ms" for t in bottoms])
    ax.margins(y=0.1)
    ax.tick_params(axis="x", labelrotation=10)


def plot_stages(result: dict[str, Any]):
    """Stacked bars of the mean time per question by stage, one bar per mode, a column per bundle.

    Top row: every stage, with the end-to-end p50 dashed; bottom row: the same without speech
    recognition, which otherwise hides the difference early exit makes on the device.
    """
    import matplotlib.pyplot as plt

    from elma_utils.plotting import finish_axes

    labels = list(result["bundles"])
    fig, axes = plt.subplots(2, len(labels), figsize=(3.4 + 2.8 * len(labels), 7.0), squeeze=False)
    for col, label in enumerate(labels):
        b = result["bundles"][label]
        names = stage_names(b["num_layers"])
        top, bottom = axes[0][col], axes[1][col]
        _stacked(top, b, names)
        for x, m in enumerate(b["modes"]):
            p50 = b["modes"][m]["end_to_end"]["p50_ms"]
            top.plot([x - 0.3, x + 0.3], [p50, p50], color="black", lw=1, ls="--")
        _stacked(bottom, b, [n for n in names if n != "asr"])
        finish_axes(top, f"{label}: {b['model_version']} ({b['num_layers']} layers)\nmean per stage; dashed: "
                    "end-to-end p50", "mode", "time per question (ms)", fontsize=9)  # fmt: skip
        finish_axes(
            bottom, "after speech recognition (ASR left out)", "mode", "time per question (ms)", fontsize=9
        )
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(n, h)
    fig.legend(
        list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
    )
    fig.suptitle(
        f"Latency per stage, early exit vs not (energy source here: {result['energy_sources']['auto_source']})"
    )
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m elma_utils.bench.harness",
        description="Per-stage latency, energy and memory of the spoken-QA pipeline, early exit vs not.",
    )
    p.add_argument("--bundle", type=Path, action="append", required=True, help="edge bundle (repeatable)")
    p.add_argument("--server-model", type=Path, default=None, help="full model for the local offload server")
    p.add_argument("--audio-n", type=int, default=30, help="spoken dev-v1.1 questions (espeak-ng)")
    p.add_argument("--typed-n", type=int, default=0, help="typed dev-v1.1 questions")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="question sample (negative: the first ones)")
    p.add_argument("--voice", default="en-us")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {list(MODES)}")
    p.add_argument("--energy-source", default="auto")
    p.add_argument("--deadline-ms", type=int, default=10_000)
    p.add_argument("--num-threads", type=int, default=None, help="LiteRT threads (default: its own)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", default=None, help="save reports/metrics/<OUT>.json (e.g. bench_pipeline)")
    p.add_argument(
        "--figure", default=None, help="figure name (default: <OUT's notebook number, or OUT>_stage_latency)"
    )
    p.add_argument("--reports-dir", type=Path, default=None)
    p.add_argument("--no-samples", action="store_true", help="do not keep the per-run rows at all")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    say(f"preparing {args.audio_n} spoken + {args.typed_n} typed questions")
    questions = dev_questions(args.audio_n, args.typed_n, data_dir=args.data_dir, voice=args.voice,
                              seed=None if args.seed < 0 else args.seed)  # fmt: skip
    kwargs = dict(runs=args.runs, warmup=args.warmup, modes=args.modes.split(","), energy_source=args.energy_source,
                  deadline_ms=args.deadline_ms, num_threads=args.num_threads, keep_samples=not args.no_samples,
                  log=say)  # fmt: skip
    with contextlib.ExitStack() as stack:
        link = None
        if args.server_model is not None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="elma-bench-")))
            say(f"starting elma serve --model {args.server_model}")
            link = stack.enter_context(local_offload_server(args.server_model, work))
        result = run_pipeline_benchmark(args.bundle, questions, link=link, **kwargs)
    print(format_table(result))
    if args.out:
        figure = args.figure or default_figure_name(args.out)
        for path in save_result(result, args.out, figure, args.reports_dir):
            print(path)
    return 0


def default_figure_name(out: str) -> str:
    """``04_device_benchmark`` -> ``04_stage_latency`` (shown in notebook 04's report section);
    ``bench_pipeline`` -> ``bench_pipeline_stage_latency`` (one figure per benchmark name)."""
    head = out.split("_")[0]
    return f"{head if head.isdigit() else out}_stage_latency"


def save_result(
    result: dict[str, Any], name: str, figure: str, reports_dir: Path | None = None
) -> list[Path]:
    """``metrics/<name>.json`` without the per-run rows (they go to ``runs/<name>-samples.json``,
    not committed) and ``figures/<figure>.png``."""
    from elma_utils.config import reports_dir as default_reports_dir
    from elma_utils.reporting import RUNS_DIR, save_figure, save_metrics, to_jsonable

    samples = {label: b.pop("samples") for label, b in result["bundles"].items() if "samples" in b}
    paths = [save_metrics(name, result, reports_dir)]
    if samples:
        out = Path(reports_dir or default_reports_dir()) / RUNS_DIR / f"{name}-samples.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(to_jsonable(samples), allow_nan=False) + "\n")
        paths.append(out)
        for label, rows in samples.items():
            result["bundles"][label]["samples"] = rows
    import matplotlib.pyplot as plt

    fig = plot_stages(result)
    paths.append(save_figure(fig, figure, reports_dir))
    plt.close(fig)
    return paths


if __name__ == "__main__":
    sys.exit(main())
