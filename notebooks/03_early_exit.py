# %% [markdown]
# # 03 · Early exit
#
# An exit head after every layer; a question leaves at the first layer whose **span entropy** (softmax over context tokens and [CLS] only, normalised by log of their number, the larger of start and end) is ≤ E_T. Here: four ways to train the exits compared (two-stage, joint, self-distillation with a frozen backbone, and joint self-distillation that also trains the layers), E_T chosen automatically for at most 1 F1 below the **full model** — on one half of the dev articles and applied to the other half — on all of dev-v1.1 and dev-v2.0 (where the no-answer call must be settled before a question may leave), the measured speed-up at batch 1, how many layers the edge should keep when unsettled questions go to the server, and the entropy predictor.

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
modes = ["distill", "two_stage", "joint", "joint_distill"]
max_f1_loss = 1.0
rtt_ms = 1.0

# %%
import numpy as np

from elma_utils import config, reporting
from elma_utils.early_exit import (
    EntropyExitPredictor,
    evaluate_predictor,
    oracle_exit_bound,
    plot_exit_histogram,
    plot_f1_vs_exit_layer,
    plot_f1_vs_latency,
    sweep_thresholds,
)
from elma_utils.early_exit import experiment as ee
from elma_utils.early_exit.edge_split import choose_edge_depth
from elma_utils.early_exit.exit_predictions import calibrated_dev_predictions
from elma_utils.early_exit.measured_speedup import measure_speedup
from elma_utils.early_exit.squad2 import cross_fitted_squad2_exit
from elma_utils.model.finetune import finetune

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
model_dir = finetune(P, data_dir=data_dir, verbose=0)  # the full model (trained by notebook 02)
model_dir

# %% [markdown]
# ## Four ways to train the exits, compared
# On a spread of dev-v1.1 questions: per-layer F1, and the cross-fitted early-exit result (F1, average exit layer) at ≤ 1 F1 below the full model. The full model's per-question F1 is the last layer of a frozen-backbone mode (two-stage/distill).

# %%
compare = {}
exit_dirs = {}
n_cmp = P.exit_compare_questions
titles_cmp = [e.title for e in ee.dev_questions("1.1", n_cmp, data_dir)[1]]
stats_cmp = {}
for mode in modes:
    exit_dirs[mode] = ee.train_exits_for_profile(model_dir, mode, P, data_dir)
    stats_cmp[mode] = ee.layerwise_dev_stats(exit_dirs[mode], "1.1", n_cmp, data_dir=data_dir)
server_cmp = stats_cmp["distill"]["f1"][-1]  # frozen backbone: its last exit is the full model
for mode, s in stats_cmp.items():
    cf = ee.cross_fitted_exit(s, titles_cmp, max_f1_loss, reference_f1=server_cmp)
    compare[mode] = {
        "per_layer_f1": (100 * s["f1"].mean(1)).round(2).tolist(),
        **{k: v for k, v in cf.items() if k not in ("exit_layers", "threshold_per_question")},
    }
{m: (r["per_layer_f1"], round(r["f1"], 2), round(r["avg_exit_layer"], 2)) for m, r in compare.items()}

# %%
import matplotlib.pyplot as plt

from elma_utils.plotting import finish_axes, mark_operating_point

fig, ax = plt.subplots(figsize=(6, 3.4))
for mode, r in compare.items():
    ax.plot(range(1, len(r["per_layer_f1"]) + 1), r["per_layer_f1"], marker="o", label=mode)
finish_axes(
    ax,
    "F1 of each exit layer, by how the exits were trained",
    "exit layer (layers computed)",
    "F1 (%, dev-v1.1 subset)",
)
ax.legend()
fig.tight_layout()
reporting.save_figure(fig, "03_exit_f1_per_layer_by_mode", REPORTS)

# %%
reference = 100 * float(server_cmp.mean())
ok = {m: r for m, r in compare.items() if r["f1"] >= reference - max_f1_loss - 1e-9}
best_mode = min(ok or compare, key=lambda m: (ok or compare)[m]["avg_exit_layer"])
print("full model F1", round(reference, 2), "→ best mode:", best_mode)

# %% [markdown]
# ## The whole dev-v1.1 set with the best mode
# E_T is tuned on one half of the articles and applied to the other (both ways), against the full model's F1 on the same questions. Latency per layer is measured at batch 1, sequence length of the profile.

# %%
multi, _, _, _ = ee.load_exits(exit_dirs[best_mode])
lat = ee.layer_latency_ms(multi, seq_len=P.max_seq_len)
full = ee.layerwise_dev_stats(exit_dirs[best_mode], "1.1", P.eval_examples, data_dir=data_dir)
server_v11 = ee.layerwise_dev_stats(exit_dirs["distill"], "1.1", P.eval_examples, data_dir=data_dir)["f1"][-1]
titles = [e.title for e in ee.dev_questions("1.1", P.eval_examples, data_dir)[1]]
cf = ee.cross_fitted_exit(
    full, titles, max_f1_loss, layer_latency_ms=np.array(lat["layer_ms"]), reference_f1=server_v11
)
summary_v11 = {k: v for k, v in cf.items() if k not in ("exit_layers", "threshold_per_question")}
summary_v11["per_layer_f1"] = (100 * full["f1"].mean(1)).round(2).tolist()
lat, summary_v11

# %%
sweep = sweep_thresholds(
    full["f1"], full["entropy"], np.array(lat["layer_ms"]), reference_f1=100 * server_v11.mean()
)
chosen = sweep.point(int(np.argmin(np.abs(sweep.values - np.mean(cf["thresholds"])))))
reporting.save_figure(
    plot_f1_vs_exit_layer(sweep, chosen, max_f1_loss=max_f1_loss), "03_f1_vs_exit_layer", REPORTS
)
reporting.save_figure(plot_f1_vs_latency(sweep, chosen, max_f1_loss=max_f1_loss), "03_f1_vs_latency", REPORTS)
reporting.save_figure(plot_exit_histogram(cf["exit_layers"], multi.num_exits), "03_exit_histogram", REPORTS)
two_x = [r for r in sweep.rows() if r["speedup"] >= 2.0]
at_2x = max(two_x, key=lambda r: r["f1"]) if two_x else None
print("best F1 at ≥ 2× (modelled from layer costs):", at_2x)

# %% [markdown]
# ## How far could any exit policy go? The oracle bound
# An oracle that knows every layer's F1 for every question picks each question's exit layer to save the most time within the same F1 budget. No policy (entropy, patience or any other) can beat it, so its speed-up is the ceiling for this model; `speedup_upper_bound` is a proven bound (Lagrangian dual), `speedup_achieved` an assignment that meets the budget. Costs are the measured layer latencies.

# %%
oracle = {}
for mode, s in [*stats_cmp.items(), (f"{best_mode} (all questions)", full)]:
    ref = 100 * float((server_v11 if s is full else server_cmp).mean())
    r = oracle_exit_bound(
        s["f1"], max_f1_loss, np.array(lat["layer_ms"]), lat["embeddings_ms"], reference_f1=ref
    )
    oracle[mode] = {k: v for k, v in r.items() if k != "exit_layers"}
{m: (r["reachable"], r.get("avg_exit_layer"), r["speedup_upper_bound"]) for m, r in oracle.items()}

# %% [markdown]
# ## Measured speed-up of the layer-by-layer runtime (batch 1)
# The same questions through all layers and with early exit, timed back to back per question in alternating order (so anything else the machine does lands on both); wall-clock time per question, tokenisation excluded. `speedup` is the ratio of mean times, `speedup_p50` of medians.

# %%
n_speed = P.exit_speedup_questions
thr = float(cf["threshold_per_question"][0])
speed = measure_speedup(exit_dirs[best_mode], thr, "1.1", n_questions=n_speed, data_dir=data_dir)
speed

# %% [markdown]
# ## SQuAD 2.0: early exit with settled no-answer calls
# Each exit gets its own no-answer threshold (tuned for F1 like the official script's best threshold); a question may leave only when its span entropy is ≤ E_T **and** its null margin is at least `margin` away from that layer's threshold. Thresholds, E_T and margin are tuned on one half of the articles and applied to the other. The 2021 prototype's best early-exit F1 on dev-v2.0 was 62.1.

# %%
ds2, ex2 = ee.dev_questions("2.0", P.eval_examples, data_dir)
stats2 = ee.layerwise_dev_stats(exit_dirs[best_mode], "2.0", P.eval_examples, data_dir=data_dir)
impossible = np.array([e.is_impossible for e in ex2])
v2 = cross_fitted_squad2_exit(
    stats2, [e.title for e in ex2], impossible, max_f1_loss, layer_latency_ms=np.array(lat["layer_ms"])
)
summary_v20 = {k: v for k, v in v2.items() if k not in ("exit_layers", "setting_index")}
{k: v for k, v in summary_v20.items() if k != "settings"}

# %%
setting = v2["settings"][int(v2["setting_index"][0])]  # tuned on the other half of the articles
speed_v20 = measure_speedup(
    exit_dirs[best_mode],
    setting["E_T"],
    "2.0",
    n_questions=n_speed,
    data_dir=data_dir,
    no_answer_margin=setting["margin"],
    null_thresholds=setting["null_thresholds"],
)
speed_v20

# %% [markdown]
# ## How many layers should the edge keep, and which edge model?
# The edge keeps layers 1..k of an exits model (candidates: the distilled exits on the frozen full model, and the joint self-distilled model whose own layers learned to answer early); a question none of them settles is offloaded to the server's full model (its F1 counts). Cost per offload here: the full model on this machine (a GPU server is faster) plus the SSH round trip `rtt_ms`; and a second scenario, a GPU server over Wi-Fi. For each k, E_T is cross-fitted with offloading in the sweep.

# %%
server_ms = lat["embeddings_ms"] + sum(lat["layer_ms"])
splits = {}
for cand in [m for m in ("distill", "joint_distill") if m in exit_dirs]:
    st = ee.layerwise_dev_stats(exit_dirs[cand], "1.1", P.eval_examples, data_dir=data_dir)
    for scenario, offload_ms in (
        ("this_cpu_server", server_ms + rtt_ms),
        ("gpu_server_wifi", 0.2 * server_ms + 20.0),
    ):
        splits[(cand, scenario)] = choose_edge_depth(
            st["f1"],
            st["entropy"],
            server_v11,
            titles,
            np.array(lat["layer_ms"]),
            lat["embeddings_ms"],
            offload_ms=offload_ms,
            max_f1_loss=max_f1_loss,
        )
edge_split = {f"{c}/{s}": v for (c, s), v in splits.items()}
{
    k: (
        v["best"]["k"],
        round(v["best"]["f1"], 2),
        round(v["best"]["share_offloaded"], 3),
        round(v["best"]["speedup"], 2),
        v["within_target"],
    )
    for k, v in edge_split.items()
}

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, v in edge_split.items():
    (line,) = ax.plot(
        [r["k"] for r in v["rows"]], [r["expected_ms"] for r in v["rows"]], marker="o", label=name
    )
    if v["best"]:
        mark_operating_point(
            ax,
            v["best"]["k"],
            v["best"]["expected_ms"],
            f"k = {v['best']['k']}",
            legend=False,
            color=line.get_color(),
        )
finish_axes(
    ax,
    "Expected time per question against edge depth (star: chosen k)",
    "layers kept on the edge (k, layers)",
    "expected time per question (ms)",
)
ax.legend(fontsize=7)
fig.tight_layout()
reporting.save_figure(fig, "03_edge_depth", REPORTS)

# %% [markdown]
# ## Entropy predictor (EdgeBERT's look-up table)
# From layer 1's entropy, predict whether a question will exit on the device; send the hopeless ones to the server at once. Fitted on one half of the articles, evaluated on the other.

# %%
half = np.array([t in set(sorted(set(titles))[::2]) for t in titles])
K = multi.num_exits
layers = np.minimum(cf["exit_layers"], K)
exit_f1 = full["f1"][layers - 1, np.arange(len(layers))]
pred = EntropyExitPredictor(K, layer=1, threshold=thr).fit(full["entropy"][0][half], cf["exit_layers"][half])
predictor = evaluate_predictor(
    pred,
    full["entropy"][0][~half],
    cf["exit_layers"][~half],
    exit_f1[~half],
    server_v11[~half],
    layer_latency_ms=np.array(lat["layer_ms"]),
)
predictor

# %% [markdown]
# ## Calibrated early-exit predictions
# Every dev question's answer at the layer where the calibrated edge stops (E_T tuned on the other half of the articles; SQuAD 2.0 with that fold's no-answer thresholds), in the official format, and beside it each question's exit layer, entropy and E_T. Scoring the written files gives back the F1 above.

# %%
ds1, ex1 = ee.dev_questions("1.1", P.eval_examples, data_dir)
exit_predictions = {
    "1.1": calibrated_dev_predictions(REPORTS / "predictions", ds1.raw, "1.1", ex1, full, cf),
    "2.0": calibrated_dev_predictions(REPORTS / "predictions", ds2.raw, "2.0", ex2, stats2, v2),
}
{v: (round(r["f1"], 2), round(r["avg_exit_layer"], 2), r["questions"]) for v, r in exit_predictions.items()}

# %%
reporting.save_metrics(
    "03_early_exit",
    {
        "profile": P.name,
        "modes": compare,
        "best_mode": best_mode,
        "layer_latency": lat,
        "dev_v1_1": summary_v11,
        "best_f1_at_2x_modelled": at_2x,
        "oracle_bound": oracle,
        "runtime_speedup": speed,
        "dev_v2_0": summary_v20,
        "runtime_speedup_v2": speed_v20,
        "edge_split": edge_split,
        "entropy_predictor": predictor,
        "exit_predictions": exit_predictions,
    },
    REPORTS,
)
