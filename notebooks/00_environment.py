# %% [markdown]
# # 00 · Environment
#
# What machine this is and what is set up on it, before anything is measured: benchmarks from a Jetson TX2 (tegrastats, LiteRT) and from a shared x86 server (CPU time only) must never be mixed up. Everything comes from `elma_utils.bench.environment.environment_report()`; nothing here changes the machine (the Jetson set-up scripts run with `--dry-run`).

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
from IPython.display import Markdown

from elma_utils import config, reporting
from elma_utils.bench.environment import environment_report, format_environment

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
env = environment_report(dry_runs=True)
Markdown(format_environment(env))

# %% [markdown]
# ## Is this a Jetson?
# An aarch64 machine with `/etc/nv_tegra_release` (the test the set-up scripts use); the L4T release (JetPack 4.6 is R32.6.1), the board model and the power tools.

# %%
env["jetson"]

# %% [markdown]
# ## Python and the LiteRT interpreter
# The edge runtime takes `ai_edge_litert`, else `tflite_runtime`, else `tensorflow.lite`. Versions are read from package metadata (nothing heavy is imported).

# %%
env["machine"], env["venv"], env["interpreters"]

# %%
{k: v for k, v in env["packages"].items() if v}

# %% [markdown]
# ## Set-up status
# The tools ELMA needs outside Python: OpenSSH (`sshd` for the offload tests), espeak-ng (spoken test questions), sox, shellcheck (set-up script checks), the Whisper model on disk for offline speech recognition, and the trained edge bundles.

# %%
env["commands"], env["apt"], env["whisper"]

# %%
env["ready"]

# %%
env["edge_bundles"]

# %% [markdown]
# ## Jetson set-up scripts in dry run
# What each script of `jetson_setup/` would do on this machine (`--dry-run`: printed, not run; on a machine that is not a Jetson they only show their commands).

# %%
for name, run in env["jetson_setup_dry_run"].items():
    print(f"## {name}: exit {run['rc']}", *run["warnings"], sep="\n  warning: ")
    print(*(f"    {c}" for c in run["commands"]), sep="\n")

# %% [markdown]
# ## Energy sources
# Where energy per question will come from here: tegrastats (the board's input rail), RAPL (Intel/AMD package counters), or CPU time only (no joules).

# %%
env["energy_sources"]

# %%
reporting.save_metrics("00_environment", {"profile": P.name, **env}, REPORTS)
