# %% [markdown]
# # 07 · Data set growth and model sync
#
# The loop that makes ELMA improve where the device is weak: the device asks questions the models never trained on (held-back SQuAD v1.1 train questions); those it cannot settle go to the server, which answers and stores them. The server exports them as a SQuAD data set (its answers as pseudo-labels), distils the edge exits on it with the full model's answers as teacher, evaluates candidate and current edge on held-out questions, and publishes only if the candidate is no worse. The device then fetches the new bundle over the same SSH connection (SFTP), checks every sha256 and swaps atomically.

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
precision = "int8"
mode = "distill"
tolerance = 0.0

# %%
import json

import matplotlib.pyplot as plt

from elma_utils import config, reporting
from elma_utils.bench.loopback import LoopbackDeployment
from elma_utils.early_exit import experiment as ee
from elma_utils.early_exit.policies import EntropyPolicy
from elma_utils.edge import sync
from elma_utils.model.finetune import finetune, fresh_questions, training_examples
from elma_utils.server import publish
from elma_utils.squad.data import examples_to_squad_json, load_squad

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
model_dir = finetune(P, data_dir=data_dir, verbose=0)
m03 = REPORTS / "metrics" / "03_early_exit.json"
best = json.loads(m03.read_text())["best_mode"] if m03.is_file() else "distill"
exits_dir = ee.train_exits_for_profile(model_dir, best, P, data_dir)
bundle = config.artifacts_dir() / f"{model_dir.name}-edge" / precision  # written by notebook 04
run = config.artifacts_dir() / f"{model_dir.name}-growth"
server_root, device_root = run / "server", run / "device"
if not (publish.bundles_dir(server_root) / "LATEST.json").is_file():
    publish.publish_bundle(bundle, server_root, exits_dir=exits_dir)
publish.read_latest(server_root)

# %% [markdown]
# ## The device asks, the server keeps the hard ones
# The device first installs the published bundle (SFTP through ELMA's SSH endpoint), then asks held-back train questions.

# %%
n_ask, n_cal, n_dev = (40, 20, 20) if P.is_smoke else (4000, 1000, 500)
# questions no model trained on (held-back train questions, or other dev articles for full profiles)
pool = fresh_questions(P, n_ask + n_cal, data_dir, dev_held_out=n_dev)
asked = pool[:n_ask]
asked_contexts = {e.context for e in asked}
calibration = [e for e in pool[n_ask:] if e.context not in asked_contexts]  # chooses a retrained edge's E_T
with LoopbackDeployment(
    model_dir, bundle, run / "loop", device_id="growth-device", sftp_root=publish.bundles_dir(server_root)
) as dep:
    installed = sync.sync_with_client(dep.tunnel, ".", device_root)
    if P.growth_edge_threshold is not None:  # smoke: -1 offloads all (a random model settles everything)
        dep.edge.edge.policy = EntropyPolicy(P.growth_edge_threshold)
    sources = [dep.edge.answer(e.question, e.context).source for e in asked]
    store_path = dep.server.store.db.path
    stored = dep.server.store.stats()
grown = {
    "asked": len(asked),
    "offloaded": sources.count("server"),
    "fallbacks": sources.count("edge-fallback"),
    "stored_questions": stored.questions,
    "installed": installed.version,
}
grown

# %% [markdown]
# ## Retrain, evaluate, publish only if no worse
# Held out: the store export's evaluation contexts (never trained on) and the first dev-v1.1 questions with their real labels. The grown training set is the stored questions (server answers as pseudo-labels) plus the full model's own SQuAD training questions, so that the exits learn the device's hard cases without forgetting the easy ones. Retrained heads are more or less sure than the old ones, so the candidate's E_T is chosen again (notebook 03's rule: cheapest within 1 F1 of its full depth) on held-back questions that neither model trained on and the device did not ask.

# %%
dev_path = load_squad("1.1", "dev", data_dir=data_dir).path
n_original = 20 if P.is_smoke else 3000
original = [e for e in training_examples(P, data_dir) if not e.is_impossible][
    :n_original
]  # the full model's own
(run / "original.json").write_text(json.dumps(examples_to_squad_json(original)))
(run / "calibration.json").write_text(json.dumps(examples_to_squad_json(calibration)))
result = publish.retrain_edge(
    store_path,
    server_root,
    mode=mode,
    full_model_dir=model_dir,
    dev_eval=dev_path,
    original_train=run / "original.json",
    calibration=run / "calibration.json",
    dev_limit=n_dev,
    squad_version="1.1",
    epochs=1.0,
    batch_size=P.batch_size,
    tolerance=tolerance,
)
print(result.reason)
{
    "current": result.current.get("f1"),
    "candidate": result.candidate.get("f1"),
    "candidate E_T": result.recalibration,
}

# %%
names = [k for k in result.current.get("sets", {}) if k in result.candidate.get("sets", {})]
fig, ax = plt.subplots(figsize=(6, 3.2))
x = range(len(names))
ax.bar([i - 0.2 for i in x], [result.current["sets"][k]["f1"] for k in names], 0.4, label="current edge")
ax.bar([i + 0.2 for i in x], [result.candidate["sets"][k]["f1"] for k in names], 0.4, label="retrained edge")
ax.set_xticks(list(x), names)
ax.set_ylabel("edge F1 (held out)")
ax.legend()
fig.tight_layout()
reporting.save_figure(fig, "07_edge_f1_before_after", REPORTS)

# %% [markdown]
# ## Sync
# The device fetches whatever is now published (a new version if the gate let it through) over SFTP, verifies every file and swaps; the previous version stays for rollback.

# %%
with LoopbackDeployment(
    model_dir, bundle, run / "loop", device_id="growth-device", sftp_root=publish.bundles_dir(server_root)
) as dep:
    synced = sync.sync_with_client(dep.tunnel, ".", device_root)
{
    "status": synced.status,
    "version": synced.version,
    "previous": synced.previous,
    "bytes": synced.bytes,
    "seconds": round(synced.seconds, 2),
}

# %% [markdown]
# ## Rounds on a deployment domain: does the loop pay?
# The questions above come from the distribution the model trained on, so retraining on them can hardly help. Here the device is used on texts of its own: dev-v1.1 articles no model trained on, split by article. Each deployment article's questions arrive over time; the first part is asked on the device (the real client, SSH endpoint and server on loopback), round by round, and the later part is never asked: it measures each round. Every round: ask → the server stores what the device offloads → retrain the edge from every stored question (the server's answers as labels) plus replay of the original training data → E_T chosen again on other articles → the gate judges the whole system's answers (the edge's where it settles, the server's where it offloads) on the store's held-out contexts and other-article questions → publish → the device syncs over SFTP. Other articles measure forgetting. Which part of the edge to retrain (`exits`: the exit heads; `exits+layers`: the edge's copy of the layers too, the server's full model unchanged) is measured, not assumed.

# %%
from elma_utils.bench import growth_rounds as growth_bench
from elma_utils.server.deployment_domain import DomainSizes, split_domain
from elma_utils.server.growth_rounds import RoundsSettings, run_growth_rounds

domain = split_domain(
    load_squad("1.1", "dev", data_dir=data_dir).examples, DomainSizes.from_profile(P), P.seed
)
replay = growth_bench.replay_questions(P, getattr(P, "growth_replay_questions", 16), data_dir, seed=P.seed)
rounds_settings = RoundsSettings(
    epochs=getattr(P, "growth_epochs", 1.0),
    batch_size=P.batch_size,
    tolerance=tolerance,
    ask_entropy_threshold=getattr(P, "growth_edge_threshold", None),
    seed=P.seed,
)
growth_targets = list(getattr(P, "growth_targets", ("exits",)))
rounds_result = run_growth_rounds(
    model_dir, bundle, exits_dir, run / "rounds", domain, replay, rounds_settings, growth_targets
)
{
    target: {k: s[k] for k in ("decisions", "picked_up_by_device", "targets")}
    for target, s in rounds_result["summary"].items()
}

# %%
fig = growth_bench.plot_rounds(rounds_result["rounds"])
reporting.save_figure(fig, growth_bench.FIGURE_NAME, REPORTS)

# %%
reporting.save_metrics(
    "07_dataset_growth_and_sync",
    {
        **growth_bench.growth_metrics(
            rounds_result, f"notebooks/07_dataset_growth_and_sync.ipynb (profile {P.name})"
        ),
        "profile": P.name,
        "mode": mode,
        "grown": grown,
        "retrain": result.to_dict(),
        "sync": {
            "status": synced.status,
            "version": synced.version,
            "previous": synced.previous,
            "bytes": synced.bytes,
            "seconds": synced.seconds,
        },
    },
    REPORTS,
)
