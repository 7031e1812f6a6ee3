# %% [markdown]
# # 07 · Data set growth and model sync
#
# The loop that makes ELMA improve where the device is weak: the device asks questions the models never trained on; those it cannot settle go to the server, which answers and stores them. The server exports them as a SQuAD data set (its answers as pseudo-labels), retrains the edge on it with the full model's answers as teacher, evaluates candidate and current edge on held-out questions, and publishes only if the candidate is no worse. The device then fetches the new bundle over the same SSH connection (SFTP), checks every sha256 and swaps atomically. All of it runs here as rounds on texts of the device's own, as a deployment would; the sizes are the profile's `growth_*` knobs.

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
precision = "int8"
tolerance = 0.0

# %%
import json

from elma_utils import config, reporting
from elma_utils.bench import growth_rounds as growth_bench
from elma_utils.early_exit import experiment as ee
from elma_utils.export.deployed_bundle import depth_only_bundle
from elma_utils.model.finetune import finetune
from elma_utils.server.deployment_domain import DomainSizes, split_domain
from elma_utils.server.growth_rounds import RoundsSettings, run_growth_rounds
from elma_utils.squad.data import load_squad

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
model_dir = finetune(P, data_dir=data_dir, verbose=0)
m03 = REPORTS / "metrics" / "03_early_exit.json"
best = json.loads(m03.read_text())["best_mode"] if m03.is_file() else "distill"
exits_dir = ee.train_exits_for_profile(model_dir, best, P, data_dir)
# notebook 04's depth-only export, so both targets start from the same edge: `exits+layers` retrains the
# layers a skim head reads, which publish refuses for a skimming bundle; `exits` carries the head
bundle = depth_only_bundle(model_dir, precision)
run = config.artifacts_dir() / f"{model_dir.name}-growth"

# %% [markdown]
# ## Rounds on a deployment domain: does the loop pay?
# Questions from the distribution the model trained on could hardly teach it anything, so the device is used on texts of its own: dev-v1.1 articles no model trained on, split by article. Each deployment article's questions arrive over time; the first part is asked on the device (the real client, SSH endpoint and server on loopback), round by round, and the later part is never asked: it measures each round. Every round: ask → the server stores what the device offloads → retrain the edge from every stored question (the server's answers as labels) plus replay of the original training data → E_T chosen again on other articles → the gate judges the whole system's answers (the edge's where it settles, the server's where it offloads) on the store's held-out contexts and other-article questions → publish → the device syncs over SFTP. When the retrained edge is refused, the server tries the other thing the store can teach: *when offloading pays*. Every stored offload holds the device's last-layer answer beside the server's; where they agree, the round trip bought nothing. The server prices keeping each stored offload on the device (how much the two answers differ × what a difference was worth on labelled questions of other articles, over the questions the device reported asking with those weights: only ~5 % of questions lie above E_T, so the pricing uses every question of the articles the other groups leave over), learns the largest offload threshold `E_offload` within a budget of 0.3 F1 (the stated tolerance, spent on a pessimistic estimate), and publishes the same weights with it when the gate (whole-system F1 on guard questions) agrees. On this profile the server runs the same six-layer model the edge runs in int8, so that is where the loop can pay. Other articles measure forgetting. Which part of the edge to retrain (`exits`: the exit heads; `exits+layers`: the edge's copy of the layers too, the server's full model unchanged) is measured, not assumed.

# %%
domain = split_domain(
    load_squad("1.1", "dev", data_dir=data_dir).examples, DomainSizes.from_profile(P), P.seed
)
replay = growth_bench.replay_questions(P, P.growth_replay_questions, data_dir, seed=P.seed)
rounds_settings = RoundsSettings(
    epochs=P.growth_epochs,
    batch_size=P.batch_size,
    tolerance=tolerance,
    # smoke: -1 offloads every question (a random model settles everything)
    ask_entropy_threshold=P.growth_edge_threshold,
    seed=P.seed,
)
rounds_result = run_growth_rounds(
    model_dir, bundle, exits_dir, run / "rounds", domain, replay, rounds_settings, list(P.growth_targets)
)
{
    target: {k: s[k] for k in ("decisions", "offload_thresholds", "picked_up_by_device", "targets")}
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
    },
    REPORTS,
)
