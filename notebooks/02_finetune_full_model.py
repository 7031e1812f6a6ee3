# %% [markdown]
# # 02 · Fine-tune the full model (the server model)
#
# MiniLM-L6 (all-MiniLM-L6-v2 weights in keras-hub's `BertBackbone`) with a span head, fine-tuned on SQuAD v1.1 train (plus made-up unanswerable questions), then evaluated on the whole of dev-v1.1 and dev-v2.0 with the official metrics. Training resumes from its last checkpoint if interrupted, and is skipped when the artifact is already complete.

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
import csv
import json
import time

from elma_utils import config, reporting
from elma_utils.model.evaluation import evaluate_artifact
from elma_utils.model.finetune import finetune
from elma_utils.squad import stats

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
P

# %% [markdown]
# ## Train
# A progress bar per chunk of steps; `artifacts/<name>/train_log.csv` keeps the losses.

# %%
t0 = time.time()
model_dir = finetune(P, data_dir=data_dir, verbose=2)
train_metrics = json.loads((model_dir / "metrics.json").read_text())["train"]
print(model_dir, f"{time.time() - t0:.0f} s in this run")
train_metrics

# %%
with open(model_dir / "train_log.csv") as f:
    rows = list(csv.DictReader(f))
fig = stats.plot_training_curve(rows)
reporting.save_figure(fig, "02_training_loss", REPORTS)

# %% [markdown]
# ## Evaluate on dev-v1.1 and dev-v2.0
# Official-format predictions go to `reports/predictions/`. For v2.0 the no-answer threshold is cross-fitted over articles (tuned on one half, applied to the other); the official script's `best_f1` (tuned on dev itself) is shown beside it.

# %%
results = {}
for version in ("1.1", "2.0"):
    r = evaluate_artifact(
        model_dir, version, data_dir=data_dir, limit=P.eval_examples, out_dir=REPORTS / "predictions"
    )
    results[version] = {k: v for k, v in r.items() if k not in ("spans", "predictions", "na_probs")}
    print(version, json.dumps(r["scores"], indent=1)[:600])

# %%
examples = [(q, p) for q, p in list(r["predictions"].items())[:8]]
examples

# %%
reporting.save_metrics(
    "02_finetune_full_model",
    {
        "profile": P.name,
        "model": P.model_description,
        "model_dir": str(model_dir),
        "train": train_metrics,
        "dev_v1_1": results["1.1"],
        "dev_v2_0": results["2.0"],
    },
    REPORTS,
)
