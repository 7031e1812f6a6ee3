"""Cells to append to notebook 04 ("Device benchmark"), in the format of scripts/build_notebooks.py.

They use what notebook 04 has defined by then: ``P``, ``REPORTS``, ``config``, ``model_dir``
(the server model), ``E_T`` and ``data_dir``; the bundles are the ones notebook 04 wrote under
``artifacts/<model>-edge/<precision>``. Smoke profile: the tiny model, 2 spoken + 2 typed
questions; otherwise 30 spoken dev-v1.1 questions on the int8 and float32 bundles.
"""

NB04_DEVICE = [
    (
        "md",
        "## Device benchmark\nThe whole pipeline as a device runs it: spoken questions (espeak-ng) → Whisper → "
        "the edge bundle layer by layer → the server over SSH for what no layer settles. Every stage is timed "
        "(p50/p95/p99 over repeated runs after a warm-up), early exit against the same bundle without it "
        "(`NeverExit`: every layer, answered on the device), with energy per question from the best source "
        "here (tegrastats, RAPL or CPU time: the table names it) and peak RSS. The server model runs in its "
        "own process (`elma serve` behind ELMA's SSH endpoint on loopback), so CPU time, energy and memory "
        "are the device side's alone.",
    ),
    (
        "code",
        "import tempfile\n\nfrom IPython.display import Markdown\n\n"
        "from elma_utils.bench.harness import (dev_questions, format_table, local_offload_server, plot_stages,\n"
        "                                      run_pipeline_benchmark)\n\n"
        "smoke = P.name == 'smoke'\n"
        "bench_bundles = [config.artifacts_dir() / f'{model_dir.name}-edge' / p\n"
        "                 for p in (['float32'] if smoke else ['int8', 'float32'])]\n"
        "bench_questions = dev_questions(2 if smoke else 30, 2 if smoke else 0, data_dir=data_dir)\n"
        "bench_runs, bench_warmup = (2, 1) if smoke else (3, 2)\n"
        "[str(b) for b in bench_bundles], len(bench_questions)",
    ),
    (
        "code",
        "with tempfile.TemporaryDirectory(prefix='elma-bench-') as work, local_offload_server(model_dir, work) as link:\n"
        "    bench = run_pipeline_benchmark(bench_bundles, bench_questions, link=link, runs=bench_runs,\n"
        "                                   warmup=bench_warmup, keep_samples=False, log=print)\n"
        "Markdown(format_table(bench))",
    ),
    (
        "code",
        "fig = plot_stages(bench)\nreporting.save_figure(fig, '04_device_stage_latency', REPORTS)",
    ),
    (
        "code",
        "reporting.save_metrics('04_device_benchmark', {'profile': P.name, 'E_T': E_T, **bench}, REPORTS)",
    ),
]
