# %% [markdown]
# # 04 · Edge export and benchmark
#
# The exits model of notebook 03 exported as LiteRT parts (embeddings, then one part per layer with its exit head) in float32, float16 and dynamic-range int8, packed into verified bundles (sha256 manifest). The Keras-free edge runtime answers the same questions as the Keras layer-by-layer runtime; we compare answers, F1, size and latency.

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
precisions = ["float32", "float16", "int8"]

# %%
import matplotlib.pyplot as plt

from elma_utils import config, reporting
from elma_utils.early_exit import experiment as ee
from elma_utils.export.benchmark import compare_precisions
from elma_utils.model.finetune import finetune

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
model_dir = finetune(P, data_dir=data_dir, verbose=0)
prev = reporting.earlier_metrics("03_early_exit", REPORTS)  # calibrated by notebook 03
mode = prev["best_mode"]
E_T = float(sum(prev["dev_v1_1"]["thresholds"]) / 2)
exits_dir = ee.train_exits_for_profile(model_dir, mode, P, data_dir)
multi, tokenizer, cfg, _ = ee.load_exits(exits_dir)
mode, E_T

# %%
n = P.edge_compare_questions
ds, examples = ee.dev_questions("1.1", n, data_dir)
edge = compare_precisions(
    multi,
    tokenizer,
    cfg,
    config.artifacts_dir() / f"{model_dir.name}-edge",
    precisions,
    {"E_T": E_T, "rule": "max"},
    model_dir.name + "-" + mode,
    examples,
    ds.raw,
)
{
    k: {kk: vv for kk, vv in v.items() if kk != "part_bytes"} if isinstance(v, dict) else v
    for k, v in edge.items()
}

# %%
from elma_utils.plotting import finish_axes, label_bars

fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
label_bars(axes[0], axes[0].bar(precisions, [edge[p]["tflite_bytes"] / 1e6 for p in precisions]), "{:.1f} MB")
finish_axes(axes[0], "Edge bundle size per precision", "precision", "bundle parts (MB)")
label_bars(axes[1], axes[1].bar(precisions, [edge[p]["question_ms_p50"] for p in precisions]), "{:.1f} ms")
finish_axes(axes[1], "Latency per precision (LiteRT)", "precision", "time per question (ms, p50, batch 1)")
for ax in axes:
    ax.margins(y=0.12)
fig.tight_layout()
reporting.save_figure(fig, "04_size_and_latency_per_precision", REPORTS)

# %% [markdown]
# ## Whole dev sets, from raw text as on the device
# Every dev-v1.1 question through the float32 and int8 bundles with the calibrated E_T (tokenised by the bundle's keras-free tokenizer, each window run at its own length); dev-v2.0 through int8 with the per-layer no-answer thresholds and margin of notebook 03, each article half with the settings tuned on the other half. Latency per question and per exit layer.

# %%
from elma_utils.early_exit.policies import EntropyPolicy
from elma_utils.early_exit.squad2 import held_out_folds
from elma_utils.export.benchmark import evaluate_bundle

n_whole = P.edge_eval_examples if P.edge_eval_examples is not None else P.eval_examples
ds1, ex1 = ee.dev_questions("1.1", n_whole, data_dir)
whole_v11 = {p: evaluate_bundle(edge[p]["bundle"], ex1, ds1.raw, "1.1") for p in ("float32", "int8")}
int8_f1_loss = whole_v11["float32"]["f1"] - whole_v11["int8"]["f1"]
whole_v11, int8_f1_loss

# %% [markdown]
# ### Early exit on the device runtime
# The same int8 bundle on the first dev-v1.1 questions with every layer (no early exit) and with the calibrated E_T: the measured speed-up of LiteRT inference at batch 1.

# %%
from elma_utils.early_exit.policies import NeverExit

m = P.edge_speedup_questions
no_exit = evaluate_bundle(edge["int8"]["bundle"], ex1[:m], ds1.raw, "1.1", policy=NeverExit())
with_exit = evaluate_bundle(edge["int8"]["bundle"], ex1[:m], ds1.raw, "1.1")
device_speedup = {
    "questions": m,
    "no_exit": no_exit,
    "early_exit": with_exit,
    "speedup_p50": no_exit["question_ms_p50"] / with_exit["question_ms_p50"],
}
{
    k: (v["f1"], v["avg_exit_layer"], v["question_ms_p50"]) if isinstance(v, dict) else v
    for k, v in device_speedup.items()
}

# %%
ds2, ex2 = ee.dev_questions("2.0", n_whole, data_dir)
parts = []
for setting, mask in zip(prev["dev_v2_0"]["settings"], held_out_folds([e.title for e in ex2]), strict=True):
    qs = [e for e, m in zip(ex2, mask, strict=True) if m]
    pol = EntropyPolicy(
        setting["E_T"], no_answer_margin=setting["margin"], null_threshold=setting["null_thresholds"]
    )
    parts.append(
        evaluate_bundle(
            edge["int8"]["bundle"], qs, ds2.raw, "2.0", policy=pol, null_thresholds=setting["null_thresholds"]
        )
    )
n2 = sum(r["questions"] for r in parts)
whole_v20_int8 = {
    k: sum(r[k] * r["questions"] for r in parts) / n2
    for k in ("f1", "exact", "avg_exit_layer", "share_solved_on_edge", "question_ms_p50")
} | {"questions": n2}
whole_v20_int8

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for p in ("float32", "int8"):
    ms = whole_v11[p]["layer_ms_p50"]
    ax.plot(range(1, len(ms) + 1), ms, marker="o", label=p)
finish_axes(
    ax,
    "Device latency by the layer a question exits at",
    "exit layer (layers computed)",
    "time per question (ms, median)",
)
ax.legend()
fig.tight_layout()
reporting.save_figure(fig, "04_latency_per_exit_layer", REPORTS)

# %% [markdown]
# ## Adaptive width: the bundle the device runs
# Early exit alone cannot average much below five of six layers within the F1 budget (notebook 03). The other axis is *width*: after layer s a small head, distilled from the full model's answers, scores the passage in blocks, and only the blocks likely to hold the answer go on (with the question and [CLS], the no-answer path) through the remaining layers. `bench.adaptive_run` trains a head per candidate layer of the profile (`skim_layers`), measures every dev question with and without skimming at each keep threshold tau, chooses tau and E_T for at most 1 F1 below the full model on one half of the articles and applies them to the other (on SQuAD 2.0 a skim may not flip the no-answer call), picks the layer on the tuning halves only, writes the int8 bundle with that head, and times it on the device runtime at batch 1 against the same bundle at full depth and width (depth only, width only and both, interleaved question by question). That bundle is the one notebook 05 deploys; its figures are `bench_adaptive_dev-v*.png`.

# %%
from elma_utils.bench import adaptive_run
from elma_utils.report.provenance import command_line

adaptive = None
if P.skim_layers:
    adaptive = adaptive_run.deployment_record(
        adaptive_run.run(
            exits_dir,
            REPORTS,
            layers=list(P.skim_layers),
            taus=list(P.skim_taus),
            limit=P.eval_examples,
            data_dir=data_dir,
            max_windows=P.skim_max_windows,
            command=command_line("04_edge_export_and_benchmark"),
        )
    )
adaptive

# %%
from IPython.display import Image

# F1 against the measured speed-up on dev-v1.1: the E_T sweeps, the measured runs, the chosen point
Image(filename=str(REPORTS / "figures" / "bench_adaptive_dev-v1.1.png")) if adaptive else None

# %%
reporting.save_metrics(
    "04_edge_export_and_benchmark",
    {
        "profile": P.name,
        "mode": mode,
        "E_T": E_T,
        "seq_len": cfg["max_seq_len"],
        "edge": edge,
        "whole_dev_v1_1": whole_v11,
        "int8_f1_loss_v1_1": int8_f1_loss,
        "whole_dev_v2_0_int8": whole_v20_int8,
        "device_speedup_int8": device_speedup,
        "adaptive": adaptive,
    },
    REPORTS,
)

# %% [markdown]
# ## Device benchmark
# The whole pipeline as a device runs it: spoken questions (espeak-ng) → Whisper → the edge bundle layer by layer → the server over SSH for what no layer settles. Every stage is timed (p50/p95/p99 over repeated runs after a warm-up), early exit against the same bundle without it (`NeverExit`: every layer, answered on the device), with energy per question from the best source here (tegrastats, RAPL or CPU time: the table names it) and peak RSS. The server model runs in its own process (`elma serve` behind ELMA's SSH endpoint on loopback), so CPU time, energy and memory are the device side's alone.

# %%
import tempfile

from IPython.display import Markdown

from elma_utils.bench.harness import (
    dev_questions,
    format_table,
    local_offload_server,
    plot_stages,
    run_pipeline_benchmark,
)

bench_bundles = [config.artifacts_dir() / f"{model_dir.name}-edge" / p for p in P.bench_precisions]
bench_bundles += [config.PROJECT_ROOT / adaptive["bundle"]] if adaptive else []  # the deployed one
bench_questions = dev_questions(P.bench_spoken_questions, P.bench_typed_questions, data_dir=data_dir)
bench_runs, bench_warmup = P.bench_runs, P.bench_warmup
[str(b) for b in bench_bundles], len(bench_questions)

# %%
with tempfile.TemporaryDirectory(prefix="elma-bench-") as work, local_offload_server(model_dir, work) as link:
    bench = run_pipeline_benchmark(
        bench_bundles,
        bench_questions,
        link=link,
        runs=bench_runs,
        warmup=bench_warmup,
        keep_samples=False,
        log=print,
    )
Markdown(format_table(bench))

# %%
fig = plot_stages(bench)
reporting.save_figure(fig, "04_device_stage_latency", REPORTS)

# %%
reporting.save_metrics("04_device_benchmark", {"profile": P.name, "E_T": E_T, **bench}, REPORTS)
