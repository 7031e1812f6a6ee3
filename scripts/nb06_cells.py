"""Cells of notebook 06 · Speech to answer, in build_notebooks.py's format ((kind, text[, tags]))."""

# The parameters cell, identical to build_notebooks.PARAMS (not imported from there: build_notebooks
# imports this module, and importing it back would be circular).
PARAMS = (
    "code",
    "# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)\n"
    'import os\n\nprofile = os.environ.get("ELMA_PROFILE", "cpu")\ndata_dir = None',
    ["parameters"],
)

NB06 = [
    (
        "md",
        "# 06 · Speech to answer\n\nA spoken question goes through the recogniser, then the QA model "
        "answers the transcript about the text the user is reading. The recogniser is told that text: "
        "for Whisper (tiny.en, faster-whisper int8, 2 threads) the context is the initial prompt, so the "
        "paragraph's names become likely words. Whisper's beam then offers five readings, and a language "
        "model of how questions are worded (a trigram of SQuAD's *training* questions, mixed with the "
        "paragraph's words) picks among them: 'what type of' over 'what type on'. "
        "Here: word error rate per voice, real-time factor, and "
        "how much F1 a spoken question loses against the same question typed (Spoken-SQuAD lost ~19 F1 "
        "at 22.7% WER; the target is at most 5), then a few worked examples. The questions are SQuAD "
        "dev-v1.1 questions spoken by espeak-ng (American and British voices): synthetic speech is "
        "cleaner than people, so these WERs are a lower bound.",
    ),
    PARAMS,
    (
        "code",
        "import json\n\nimport librosa\nimport librosa.display\nimport matplotlib.pyplot as plt\n"
        "import numpy as np\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.model.finetune import finetune\nfrom elma_utils.model.inference import QAModel\n"
        "from elma_utils.speech.audio import load_audio\n"
        "from elma_utils.speech.qa_benchmark import TARGETS, compact_rows, format_table, spoken_vs_typed_f1, targets_met\n"
        "from elma_utils.speech.recognizers import get_recognizer\n"
        "from elma_utils.speech.spoken_data import generate_spoken_questions, pick_questions, read_manifest\n"
        "from elma_utils.speech.spoken_qa import SpokenQA\nfrom elma_utils.squad.data import load_squad\n\n"
        "P = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\n"
        "n_questions = 6 if P.name == 'smoke' else 50\nvoices = ['en-us', 'en-gb']\n"
        "model_dir = finetune(P, data_dir=data_dir, verbose=0)  # the full model (trained by notebook 02)\n"
        "qa = QAModel.load(model_dir)\nwhisper = get_recognizer('whisper')  # lm='auto': n-best rescored\n"
        "model_dir, whisper.lm_source",
    ),
    (
        "md",
        "## A spoken dev sample\nA seeded sample of dev-v1.1 questions, each spoken in every voice (16 kHz "
        "WAV files under the cache directory; existing files are reused).",
    ),
    (
        "code",
        "dev = load_squad('1.1', 'dev', data_dir=data_dir)\n"
        "pairs = pick_questions(dev.examples, n_questions, seed=0)\n"
        "manifest = generate_spoken_questions(pairs, config.cache_dir() / 'spoken' / f'nb06-{P.name}', "
        "voices=voices, progress=False)\n"
        "items = read_manifest(manifest)\nlen(pairs), len(items)",
    ),
    (
        "md",
        "## WER, real-time factor, F1 spoken vs typed\nIn the cpu profile the numbers come from the "
        "500-question benchmark (`python -m elma_utils.speech.qa_benchmark`, "
        "`reports/metrics/06_speech_benchmark.json`: Whisper with the context on all questions, without it "
        "and pocketsphinx dictation on a 100-question subset) when it is there. Otherwise, and in the smoke "
        "profile, the sample above is run here with and without the context. F1 is the official SQuAD F1 "
        "of the same model's answer to the transcript and to the typed question; RTF is recognition time "
        "over audio time (model load excluded).",
    ),
    (
        "code",
        "bench_file = REPORTS / 'metrics' / '06_speech_benchmark.json'\n"
        "if P.name != 'smoke' and bench_file.is_file():\n"
        "    bench = json.loads(bench_file.read_text())\n"
        "    runs = {k: v for k, v in bench.items() if isinstance(v, dict) and 'wer' in v}\n"
        "    rows = bench['rows']\n"
        "    source = f\"{bench_file.name}: {bench['setup']['questions']} questions, {bench['setup']['model']}\"\n"
        "else:\n"
        "    with_context = spoken_vs_typed_f1(items, qa, dev, '1.1', whisper, True, progress=False)\n"
        "    typed = {r['qas_id']: r['typed_answer'] for r in with_context['rows'] if 'typed_answer' in r}\n"
        "    without = spoken_vs_typed_f1(items, qa, dev, '1.1', whisper, False, typed=typed, progress=False)\n"
        "    runs = {'whisper_context': with_context, 'whisper_no_context': without}\n"
        "    rows = {name: compact_rows(run.pop('rows')) for name, run in runs.items()}\n"
        "    source = f'this notebook: {len(pairs)} questions, {model_dir.name}'\n"
        "print(source)\nprint(format_table(runs))",
    ),
    (
        "code",
        "names = list(runs)\nvoice_names = sorted({v for r in runs.values() for v in r.get('by_voice', {})})\n"
        "groups = voice_names + ['all']\nwidth = 0.8 / len(names)\n"
        "fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))\n"
        "for i, name in enumerate(names):\n"
        "    wer = [runs[name]['by_voice'].get(v, {}).get('wer', np.nan) for v in voice_names] + [runs[name]['wer']]\n"
        "    axes[0].bar(np.arange(len(groups)) + i * width, wer, width, label=name)\n"
        "axes[0].set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2, groups)\n"
        "axes[0].axhline(TARGETS['wer_max'], color='k', ls='--', lw=1, label='target')\n"
        "axes[0].set_ylabel('WER'); axes[0].legend(fontsize=7)\n"
        "x = np.arange(len(names))\n"
        "axes[1].bar(x - 0.2, [runs[n]['typed_f1'] for n in names], 0.4, label='typed')\n"
        "axes[1].bar(x + 0.2, [runs[n]['spoken_f1'] for n in names], 0.4, label='spoken')\n"
        "axes[1].set_xticks(x, names, rotation=15, fontsize=7); axes[1].set_ylabel('F1 (same questions)')\n"
        "axes[1].legend(fontsize=7); fig.tight_layout()\nreporting.save_figure(fig, '06_wer_and_f1', REPORTS)",
    ),
    (
        "md",
        "## Real-time factor per utterance\nRecognition seconds over audio seconds for every clip of the "
        "Whisper run with context; below 1 is faster than speech, the target is 0.25 on 2 cores. "
        "Timings are taken on a shared machine (see the benchmark's load average).",
    ),
    (
        "code",
        "clips = [r for r in rows['whisper_context'] if r.get('error') is None]\n"
        "rtf = np.array([r['seconds'] / r['audio_seconds'] for r in clips])\n"
        "fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))\n"
        "axes[0].hist(rtf, bins=30); axes[0].axvline(TARGETS['rtf_max'], color='k', ls='--', lw=1)\n"
        "axes[0].set_xlabel('real-time factor'); axes[0].set_ylabel('utterances')\n"
        "axes[1].scatter([r['audio_seconds'] for r in clips], [r['seconds'] for r in clips], s=6)\n"
        "axes[1].set_xlabel('audio (s)'); axes[1].set_ylabel('recognition (s)'); fig.tight_layout()\n"
        "reporting.save_figure(fig, '06_real_time_factor', REPORTS)\n"
        "{'median_rtf': round(float(np.median(rtf)), 3), 'p95_rtf': round(float(np.percentile(rtf, 95)), 3)}",
    ),
    (
        "md",
        "## Where F1 is lost\nUtterances split by whether the transcript was exact (after normalisation): "
        "the loss should sit in the misrecognised ones, and even there the model often still finds the "
        "answer, since the context is right.",
    ),
    (
        "code",
        "{name: run['by_transcript'] for name, run in runs.items()}",
    ),
    (
        "md",
        "## Worked examples\nThree clips of the sample through `SpokenQA` (recogniser with context, then "
        "the full model): waveform, mel spectrogram, what was heard, the answer and each stage's time "
        "(after a warm-up, so the times are those of a running device, not of its first question).",
    ),
    (
        "code",
        "examples = [items[0], items[min(3, len(items) - 1)], items[-1]]\n"
        "contexts = {e.qas_id: e for e in dev.examples}\nspoken_qa = SpokenQA(whisper, qa)\n"
        "for item in examples:  # warm-up: the model's first call per input shape traces it\n"
        "    load_audio(item.path), qa.answer(item.text, contexts[item.qas_id].context)\n"
        "fig, axes = plt.subplots(len(examples), 2, figsize=(11, 2.6 * len(examples)))\nworked = []\n"
        "for item, (ax_wave, ax_spec) in zip(examples, axes, strict=True):\n"
        "    example = contexts[item.qas_id]\n"
        "    result = spoken_qa.ask(item.path, example.context, reference=item.text)\n"
        "    y = load_audio(item.path)\n"
        "    librosa.display.waveshow(y, sr=16000, ax=ax_wave)\n"
        "    ax_wave.set_title(f'{item.voice}: \"{result.transcript}\"', fontsize=8)\n"
        "    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=16000, n_mels=64), ref=np.max)\n"
        "    librosa.display.specshow(mel, sr=16000, x_axis='time', y_axis='mel', ax=ax_spec)\n"
        "    ax_spec.set_title(f'answer: {result.answer!r} ({result.where})', fontsize=8)\n"
        "    d = result.to_dict()\n"
        "    worked.append({'question': item.text, 'voice': item.voice, 'gold': [a.text for a in example.answers],\n"
        "                   **{k: d[k] for k in ('transcript', 'wer', 'answer', 'where', 'timings_ms')}})\n"
        "fig.tight_layout()\nreporting.save_figure(fig, '06_worked_examples', REPORTS)\n"
        "print(json.dumps(worked, indent=1))",
    ),
    (
        "code",
        "keys = ('utterances', 'wer', 'rtf', 'spoken_f1', 'typed_f1', 'f1_drop', 'same_answer_share')\n"
        "summary = {name: {**{k: run.get(k) for k in keys},\n"
        "                  'by_voice': {v: {k: s.get(k) for k in ('wer', 'rtf', 'f1_drop')} "
        "for v, s in run['by_voice'].items()}}\n"
        "           for name, run in runs.items()}\n"
        "reporting.save_metrics('06_speech_to_answer', {'profile': P.name, 'source': source, 'targets': TARGETS,\n"
        "    'runs': summary, 'targets_met': {n: targets_met(r) for n, r in runs.items()}, 'worked_examples': worked},\n"
        "    REPORTS)",
    ),
]
