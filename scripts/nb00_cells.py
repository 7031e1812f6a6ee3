"""Cells of notebooks/00_environment.ipynb, in the format of scripts/build_notebooks.py.

``NB00`` is a list of ``("md" | "code", text[, tags])``; ``build_notebooks.notebook(NB00,
"00_environment")`` turns it into the notebook. The logic lives in
``elma_utils.bench.environment``: the notebook only calls it and shows the result.
"""

# The same parameters cell as build_notebooks.PARAMS (redefined, not imported, so that
# build_notebooks can import this module without an import cycle; a test checks they agree).
PARAMS = (
    "code",
    "# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)\n"
    'import os\n\nprofile = os.environ.get("ELMA_PROFILE", "cpu")\ndata_dir = None',
    ["parameters"],
)

NB00 = [
    (
        "md",
        "# 00 · Environment\n\nWhat machine this is and what is set up on it, before anything is measured: "
        "benchmarks from a Jetson TX2 (tegrastats, LiteRT) and from a shared x86 server (CPU time only) "
        "must never be mixed up. Everything comes from `elma_utils.bench.environment.environment_report()`; "
        "nothing here changes the machine (the Jetson set-up scripts run with `--dry-run`).",
    ),
    PARAMS,
    (
        "code",
        "from IPython.display import Markdown\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.bench.environment import environment_report, format_environment\n\n"
        "P = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\n"
        "env = environment_report(dry_runs=True)\nMarkdown(format_environment(env))",
    ),
    (
        "md",
        "## Is this a Jetson?\nAn aarch64 machine with `/etc/nv_tegra_release` (the test the set-up scripts "
        "use); the L4T release (JetPack 4.6 is R32.6.1), the board model and the power tools.",
    ),
    ("code", "env['jetson']"),
    (
        "md",
        "## Python and the LiteRT interpreter\nThe edge runtime takes `ai_edge_litert`, else `tflite_runtime`, "
        "else `tensorflow.lite`. Versions are read from package metadata (nothing heavy is imported).",
    ),
    ("code", "env['machine'], env['venv'], env['interpreters']"),
    ("code", "{k: v for k, v in env['packages'].items() if v}"),
    (
        "md",
        "## Set-up status\nThe tools ELMA needs outside Python: OpenSSH (`sshd` for the offload tests), "
        "espeak-ng (spoken test questions), sox, shellcheck (set-up script checks), the Whisper model "
        "on disk for offline speech recognition, and the trained edge bundles.",
    ),
    ("code", "env['commands'], env['apt'], env['whisper']"),
    ("code", "env['ready']"),
    ("code", "env['edge_bundles']"),
    (
        "md",
        "## Jetson set-up scripts in dry run\nWhat each script of `jetson_setup/` would do on this machine "
        "(`--dry-run`: printed, not run; on a machine that is not a Jetson they only show their commands).",
    ),
    (
        "code",
        "for name, run in env['jetson_setup_dry_run'].items():\n"
        "    print(f\"## {name}: exit {run['rc']}\", *run['warnings'], sep='\\n  warning: ')\n"
        "    print(*(f'    {c}' for c in run['commands']), sep='\\n')",
    ),
    (
        "md",
        "## Energy sources\nWhere energy per question will come from here: tegrastats (the board's input "
        "rail), RAPL (Intel/AMD package counters), or CPU time only (no joules).",
    ),
    ("code", "env['energy_sources']"),
    ("code", "reporting.save_metrics('00_environment', {'profile': P.name, **env}, REPORTS)"),
]
