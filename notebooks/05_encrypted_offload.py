# %% [markdown]
# # 05 · Encrypted offloading
#
# The whole path on this machine's loopback: the full model served by `OffloadServer` (loopback only), reached through ELMA's SSH endpoint (paramiko, ed25519 keys, pinned host key) or a real OpenSSH sshd; the edge bundle of notebook 04 answers with early exit and offloads what it cannot settle over one persistent SSH channel. We answer the dev set through the edge, measure the offload share and end-to-end F1 against the threshold, and what the SSH link costs per question.

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
precision = "int8"
thresholds = [0.2, 0.4, 0.5, 0.6, 0.7, 0.9]
system_max_f1_loss = 0.5

# %%
from dataclasses import asdict

import matplotlib.pyplot as plt
import numpy as np

from elma_utils import config, reporting
from elma_utils.bench.end_to_end import (
    ask_held_out,
    end_to_end_summary,
    full_model_answers,
    write_end_to_end_predictions,
)
from elma_utils.bench.loopback import LoopbackDeployment
from elma_utils.bench.throughput import format_throughput
from elma_utils.early_exit import experiment as ee
from elma_utils.early_exit.edge_split import evaluate_edge_depth
from elma_utils.early_exit.policies import EntropyPolicy
from elma_utils.early_exit.squad2 import held_out_folds
from elma_utils.export.deployed_bundle import deployed_bundle, edge_layer_costs, edge_layerwise_stats
from elma_utils.model.finetune import finetune
from elma_utils.plotting import finish_axes, mark_operating_point
from elma_utils.squad.metrics import per_question_scores

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
model_dir = finetune(P, data_dir=data_dir, verbose=0)
bundle = deployed_bundle(model_dir, precision, REPORTS)  # notebook 04's: adaptive (skim + exit) when built
work = config.artifacts_dir() / f"{model_dir.name}-offload"
bundle

# %% [markdown]
# ## E_T for the whole system
# The bundle's E_T (notebook 03) keeps the *edge alone* within 1 F1 of the full model. Here an unsettled question goes to the server and gets the full model's answer, and the system's target is tighter (`system_max_f1_loss`), so E_T is chosen again with offloading in the sweep (`edge_split.evaluate_edge_depth` with every layer kept; an offload costs the full model on this machine plus 1 ms), on one half of the dev articles, and applied to the other half, and vice versa. The statistics are the float32 exits of notebook 03 (cached) as the deployed bundle runs them: when notebook 04 built the adaptive bundle, skimmed after its layer at its keep threshold, so the offload decision is tuned on what the device computes, and each question's later layers are priced at the share of tokens it keeps (`edge_layer_costs`, the cost model of `skim_calibration`); the device runs the int8 bundle.

# %%
prev = reporting.earlier_metrics("03_early_exit", REPORTS)
mode, lat = prev["best_mode"], prev["layer_latency"]
ds, examples = ee.dev_questions("1.1", P.eval_examples, data_dir)  # the questions notebook 03 calibrated on
titles = [e.title for e in examples]
edge_stats = edge_layerwise_stats(  # skimmed at the bundle's tau when the bundle skims
    ee.train_exits_for_profile(model_dir, mode, P, data_dir), bundle, "1.1", P.eval_examples, data_dir
)
server_f1 = ee.layerwise_dev_stats(
    ee.train_exits_for_profile(model_dir, "distill", P, data_dir), "1.1", P.eval_examples, data_dir=data_dir
)["f1"][-1]  # frozen backbone: its last exit is the full model
full_ms = lat["embeddings_ms"] + sum(lat["layer_ms"])
system_cal = evaluate_edge_depth(
    len(lat["layer_ms"]),
    edge_stats["f1"],
    edge_stats["entropy"],
    server_f1,
    titles,
    edge_layer_costs(bundle, edge_stats, lat["layer_ms"]),  # [K], or [K, Q] when the bundle skims
    lat["embeddings_ms"],
    full_ms + 1.0,
    full_ms,
    system_max_f1_loss,
)
mode, system_cal

# %% [markdown]
# ## The dev set through edge + server
# Every dev-v1.1 question (the `cpu` profile; the profile's sample in `smoke`) asked as a device asks it, each article half with the E_T tuned on the other half; questions no edge layer settles go to the server over ELMA's SSH endpoint. The same questions through the full model alone are the reference (target: ≥ 60 % answered on the edge with F1 within 0.5 of the full model). The answers are written in the official format, with where each came from.

# %%
dep = LoopbackDeployment(model_dir, bundle, work, way_in="endpoint", device_id="notebook-05").start()
wire0 = dep.tunnel.stats.wire_bytes_sent + dep.tunnel.stats.wire_bytes_received
results = ask_held_out(dep.edge, examples, system_cal.thresholds, held_out_folds(titles))
wire = dep.tunnel.stats.wire_bytes_sent + dep.tunnel.stats.wire_bytes_received - wire0
reference = full_model_answers(dep.server.service.answerer.qa, examples)  # the full model alone
end_to_end = end_to_end_summary(
    examples, results, ds.raw, "1.1", reference=reference, wire_bytes=wire, max_f1_loss=system_max_f1_loss
)
end_to_end["files"] = {
    k: str(v)
    for k, v in write_end_to_end_predictions(REPORTS / "predictions", "1.1", examples, results).items()
}
{k: end_to_end[k] for k in ("questions", "f1", "full_model_f1", "share", "targets_met")}

# %% [markdown]
# ## End-to-end F1 against the threshold
# A lower E_T keeps fewer questions on the device: more offloads, F1 closer to the server's.

# %%
m = P.offload_curve_questions
curve = []
edge_model = dep.edge.edge
own_policy = edge_model.policy
for t in thresholds:
    edge_model.policy = EntropyPolicy(t)
    rs = [dep.edge.answer(e.question, e.context) for e in examples[:m]]
    sc = per_question_scores(ds.raw, {e.qas_id: r.text for e, r in zip(examples[:m], rs, strict=True)}, "1.1")
    curve.append(
        {
            "E_T": t,
            "f1": 100 * float(np.mean([sc[e.qas_id][1] for e in examples[:m]])),
            "share_offloaded": float(np.mean([r.source == "server" for r in rs])),
            "ms_per_question": float(np.mean([r.total_ms for r in rs])),
        }
    )
edge_model.policy = own_policy
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(
    [100 * c["share_offloaded"] for c in curve],
    [c["f1"] for c in curve],
    marker="o",
    label=f"E_T sweep, {m} questions",
)
for c in curve:
    ax.annotate(f"E_T {c['E_T']:g}", (100 * c["share_offloaded"], c["f1"]), fontsize=7)
mark_operating_point(
    ax,
    100 * end_to_end["share"]["server"],
    end_to_end["f1"],
    "E_T "
    + " / ".join(f"{t:.2g}" for t in system_cal.thresholds)
    + f" (held out, {end_to_end['questions']} questions)",
)
finish_axes(
    ax,
    "Edge + server: F1 against the share offloaded",
    "offloaded to the server (% of questions)",
    "end-to-end F1 (%, official SQuAD scoring)",
)
ax.legend(fontsize=7)
fig.tight_layout()
reporting.save_figure(fig, "05_f1_vs_offload_share", REPORTS)
curve

# %% [markdown]
# ## What the SSH link costs per offloaded question
# A ping (no model time) over the persistent SSH channel, a new channel per question, a new SSH connection per question, and plain TCP to the service; the same through a real OpenSSH sshd.

# %%
lines, new_connection_lines = P.round_trip_lines, P.round_trip_new_connection_lines
rtt = {"endpoint": dep.round_trips(lines, new_connection_lines=new_connection_lines)}
store_stats = dep.server.store.stats()
dep.close()
with LoopbackDeployment(model_dir, bundle, work, way_in="sshd", device_id="notebook-05-sshd") as dep2:
    rtt["sshd"] = dep2.round_trips(lines, new_connection_lines=new_connection_lines)
{
    w: {m: (round(r["p50_ms"], 3), round(r["wire_bytes_per_line"])) for m, r in v.items()}
    for w, v in rtt.items()
}

# %% [markdown]
# ## Server throughput with 1, 4 and 8 devices at once
# Each device on its own persistent SSH connection through ELMA's endpoint, asking dev questions one after another; every reply is matched to its request. The server is the real full model with its micro-batcher; clients, SSH and server share this machine's cores. A deployment of its own, so the benchmark's asks do not enter the store above.

# %%
per_client = P.throughput_per_client
with LoopbackDeployment(
    model_dir, bundle, work.parent / f"{work.name}-throughput", device_id="bench"
) as dep3:
    throughput = dep3.server_throughput(
        [(e.question, e.context) for e in examples], (1, 4, 8), per_client=per_client
    )
print(format_throughput(throughput))

# %%
overhead = {w: v["ssh_persistent"]["p50_ms"] - v["plain_tcp"]["p50_ms"] for w, v in rtt.items()}
print("persistent SSH minus plain TCP (ms, p50):", overhead)
reporting.save_metrics(
    "05_encrypted_offload",
    {
        "profile": P.name,
        "precision": precision,
        "end_to_end": end_to_end,
        "system_calibration": {"mode": mode, "max_f1_loss": system_max_f1_loss, **asdict(system_cal)},
        "threshold_curve": curve,
        "round_trips": rtt,
        "ssh_overhead_ms_p50": overhead,
        "throughput": throughput,
        "store": {"offloads": store_stats.offloads, "questions": store_stats.questions},
    },
    REPORTS,
)
