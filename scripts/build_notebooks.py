"""Write the notebooks from the cell texts below (the .ipynb files are committed; rerun after edits)."""

from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parent.parent


def notebook(cells, name: str):
    """Cell ids are ``<notebook number>-<index>``: rebuilding an unchanged notebook gives the
    same file (and sha256), so the pipeline does not rerun it."""
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = []
    for i, (kind, text, *tags) in enumerate(cells):
        cell = nbf.v4.new_markdown_cell(text) if kind == "md" else nbf.v4.new_code_cell(text)
        cell.id = f"nb{name[:2]}-{i:02d}"
        if tags:
            cell.metadata["tags"] = tags[0]
        out.append(cell)
    nb.cells = out
    return nb


PARAMS = (
    "code",
    "# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)\n"
    'import os\n\nprofile = os.environ.get("ELMA_PROFILE", "cpu")\ndata_dir = None',
    ["parameters"],
)

NB01 = [
    (
        "md",
        "# 01 · SQuAD data\n\nLoad and validate SQuAD v1.1 and v2.0, look at how long contexts are "
        "against the model's window, and check that labelled token spans give back the answer text "
        "for both tokenizers (WordPiece for MiniLM, SentencePiece for ALBERT).",
    ),
    PARAMS,
    (
        "code",
        "import random\n\nfrom elma_utils import config, reporting\nfrom elma_utils.model.tokenizers import QATokenizer\n"
        "from elma_utils.squad import stats\nfrom elma_utils.squad.data import load_squad, make_unanswerable, split_by_article\n"
        "from elma_utils.squad.features import build_features, span_recovery_rate\n\n"
        "P = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\nP",
    ),
    (
        "md",
        "## Load and validate\nEvery answer is checked at its `answer_start`; bad examples are counted, not fatal.",
    ),
    (
        "code",
        "limit = None if P.name != 'smoke' else 400\n"
        "train = load_squad('1.1', 'train', data_dir=data_dir, limit=limit)\n"
        "dev1 = load_squad('1.1', 'dev', data_dir=data_dir, limit=limit)\n"
        "dev2 = load_squad('2.0', 'dev', data_dir=data_dir, limit=limit)\n"
        "summary = {name: stats.dataset_summary(ds) for name, ds in "
        "[('train-v1.1', train), ('dev-v1.1', dev1), ('dev-v2.0', dev2)]}\nsummary",
    ),
    (
        "code",
        "for name, ds in [('train-v1.1', train), ('dev-v1.1', dev1), ('dev-v2.0', dev2)]:\n"
        "    print(name, ds.path, '| problems:', ds.report.n_bad, ds.report.problems[:3])",
    ),
    (
        "md",
        "## Context length against the window\nContexts longer than the window's room are cut into "
        "overlapping windows (`doc_stride`).",
    ),
    (
        "code",
        "tok = QATokenizer.minilm()\nalbert = QATokenizer.albert()\n"
        "lengths = {'dev-v1.1 WordPiece': stats.context_token_lengths(dev1.examples, tok),\n"
        "           'dev-v1.1 SentencePiece': stats.context_token_lengths(dev1.examples, albert)}\n"
        "fig = stats.plot_context_lengths(lengths, P.max_seq_len)\n"
        "reporting.save_figure(fig, '01_context_lengths', REPORTS)\n"
        "coverage = {k: round(stats.window_coverage(v, P.max_seq_len), 4) for k, v in lengths.items()}\ncoverage",
    ),
    (
        "md",
        "## Labelled spans give back the answer\nOver the whole train set (a sample in the smoke profile): "
        "the share of answerable questions whose labelled token span, cut from the context through the "
        "offsets, equals the answer text after SQuAD normalisation.",
    ),
    (
        "code",
        "recovery = {}\nfor name, t in [('wordpiece', tok), ('sentencepiece', albert)]:\n"
        "    feats = build_features(train.examples, t, max_seq_len=P.max_seq_len, doc_stride=P.doc_stride,\n"
        "                           max_query_len=P.max_query_len)\n"
        "    recovery[name] = {**span_recovery_rate(train.examples, feats), 'features': len(feats)}\nrecovery",
    ),
    (
        "md",
        "## Splits by article and made-up unanswerable questions\nNo v2.0 train set exists here, so "
        "unanswerable training examples pair a question with another paragraph of its article.",
    ),
    (
        "code",
        "fit, held_out = split_by_article(train.examples, 0.1, seed=P.seed)\n"
        "overlap = {e.title for e in fit} & {e.title for e in held_out}\n"
        "negatives = make_unanswerable(fit, 0.5, seed=P.seed)\n"
        "split = {'fit_questions': len(fit), 'held_out_questions': len(held_out), 'title_overlap': len(overlap),\n"
        "         'made_up_unanswerable': len(negatives)}\nassert not overlap\nsplit",
    ),
    ("code", "random.Random(0).choice(negatives)"),
    (
        "code",
        "reporting.save_metrics('01_squad_data', {'profile': P.name, 'datasets': summary,\n"
        "    'window_coverage': coverage, 'span_recovery': recovery, 'split': split}, REPORTS)",
    ),
]

NB02 = [
    (
        "md",
        "# 02 · Fine-tune the full model (the server model)\n\nMiniLM-L6 (all-MiniLM-L6-v2 weights in "
        "keras-hub's `BertBackbone`) with a span head, fine-tuned on SQuAD v1.1 train (plus made-up "
        "unanswerable questions), then evaluated on the whole of dev-v1.1 and dev-v2.0 with the official "
        "metrics. Training resumes from its last checkpoint if interrupted, and is skipped when the "
        "artifact is already complete.",
    ),
    PARAMS,
    (
        "code",
        "import csv, json, time\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.model.evaluation import evaluate_artifact\nfrom elma_utils.model.finetune import finetune\n"
        "from elma_utils.squad import stats\n\nP = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\nP",
    ),
    ("md", "## Train\nA progress bar per chunk of steps; `artifacts/<name>/train_log.csv` keeps the losses."),
    (
        "code",
        "t0 = time.time()\nmodel_dir = finetune(P, data_dir=data_dir, verbose=2)\n"
        "train_metrics = json.loads((model_dir / 'metrics.json').read_text())['train']\n"
        "print(model_dir, f'{time.time() - t0:.0f} s in this run')\ntrain_metrics",
    ),
    (
        "code",
        "with open(model_dir / 'train_log.csv') as f:\n    rows = list(csv.DictReader(f))\n"
        "fig = stats.plot_training_curve(rows)\nreporting.save_figure(fig, '02_training_loss', REPORTS)",
    ),
    (
        "md",
        "## Evaluate on dev-v1.1 and dev-v2.0\nOfficial-format predictions go to `reports/predictions/`. "
        "For v2.0 the no-answer threshold is cross-fitted over articles (tuned on one half, applied to "
        "the other); the official script's `best_f1` (tuned on dev itself) is shown beside it.",
    ),
    (
        "code",
        "results = {}\nfor version in ('1.1', '2.0'):\n"
        "    r = evaluate_artifact(model_dir, version, data_dir=data_dir, limit=P.eval_examples,\n"
        "                          out_dir=REPORTS / 'predictions')\n"
        "    results[version] = {k: v for k, v in r.items() if k not in ('spans', 'predictions', 'na_probs')}\n"
        "    print(version, json.dumps(r['scores'], indent=1)[:600])",
    ),
    ("code", "examples = [(q, p) for q, p in list(r['predictions'].items())[:8]]\nexamples"),
    (
        "code",
        "reporting.save_metrics('02_finetune_full_model', {'profile': P.name, 'model_dir': str(model_dir),\n"
        "    'train': train_metrics, 'dev_v1_1': results['1.1'], 'dev_v2_0': results['2.0']}, REPORTS)",
    ),
]

NB03 = [
    (
        "md",
        "# 03 · Early exit\n\nAn exit head after every layer; a question leaves at the first layer whose "
        "**span entropy** (softmax over context tokens and [CLS] only, normalised by log of their number, the "
        "larger of start and end) is ≤ E_T. Here: four ways to train the exits compared (two-stage, joint, "
        "self-distillation with a frozen backbone, and joint self-distillation that also trains the layers), "
        "E_T chosen automatically for at most 1 F1 below the **full model** — on one half of the dev articles "
        "and applied to the other half — on all of dev-v1.1 and dev-v2.0 (where the no-answer call must be "
        "settled before a question may leave), the measured speed-up at batch 1, how many layers the edge "
        "should keep when unsettled questions go to the server, and the entropy predictor.",
    ),
    PARAMS,
    ("code", "modes = ['distill', 'two_stage', 'joint', 'joint_distill']\nmax_f1_loss = 1.0\nrtt_ms = 1.0"),
    (
        "code",
        "import numpy as np\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.early_exit import (EntropyExitPredictor, evaluate_predictor, oracle_exit_bound, plot_exit_histogram,\n"
        "                                   plot_f1_vs_exit_layer, plot_f1_vs_latency, sweep_thresholds)\n"
        "from elma_utils.early_exit import experiment as ee\nfrom elma_utils.early_exit.edge_split import choose_edge_depth\n"
        "from elma_utils.early_exit.exit_predictions import calibrated_dev_predictions\n"
        "from elma_utils.early_exit.squad2 import cross_fitted_squad2_exit\nfrom elma_utils.model.finetune import finetune\n"
        "\n"
        "P = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\n"
        "model_dir = finetune(P, data_dir=data_dir, verbose=0)  # the full model (trained by notebook 02)\nmodel_dir",
    ),
    (
        "md",
        "## Four ways to train the exits, compared\nOn a spread of dev-v1.1 questions: per-layer F1, and the "
        "cross-fitted early-exit result (F1, average exit layer) at ≤ 1 F1 below the full model. The full "
        "model's per-question F1 is the last layer of a frozen-backbone mode (two-stage/distill).",
    ),
    (
        "code",
        "compare = {}\nexit_dirs = {}\nn_cmp = P.exit_compare_questions\n"
        "titles_cmp = [e.title for e in ee.dev_questions('1.1', n_cmp, data_dir)[1]]\nstats_cmp = {}\n"
        "for mode in modes:\n"
        "    exit_dirs[mode] = ee.train_exits_for_profile(model_dir, mode, P, data_dir)\n"
        "    stats_cmp[mode] = ee.layerwise_dev_stats(exit_dirs[mode], '1.1', n_cmp, data_dir=data_dir)\n"
        "server_cmp = stats_cmp['distill']['f1'][-1]  # frozen backbone: its last exit is the full model\n"
        "for mode, s in stats_cmp.items():\n"
        "    cf = ee.cross_fitted_exit(s, titles_cmp, max_f1_loss, reference_f1=server_cmp)\n"
        "    compare[mode] = {'per_layer_f1': (100 * s['f1'].mean(1)).round(2).tolist(),\n"
        "                     **{k: v for k, v in cf.items() if k not in ('exit_layers', 'threshold_per_question')}}\n"
        "{m: (r['per_layer_f1'], round(r['f1'], 2), round(r['avg_exit_layer'], 2)) for m, r in compare.items()}",
    ),
    (
        "code",
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(6, 3.4))\n"
        "for mode, r in compare.items():\n    ax.plot(range(1, len(r['per_layer_f1']) + 1), r['per_layer_f1'], marker='o', label=mode)\n"
        "ax.set_xlabel('exit layer'); ax.set_ylabel('F1 (dev-v1.1 subset)'); ax.legend(); fig.tight_layout()\n"
        "reporting.save_figure(fig, '03_exit_f1_per_layer_by_mode', REPORTS)",
    ),
    (
        "code",
        "reference = 100 * float(server_cmp.mean())\n"
        "ok = {m: r for m, r in compare.items() if r['f1'] >= reference - max_f1_loss - 1e-9}\n"
        "best_mode = min(ok or compare, key=lambda m: (ok or compare)[m]['avg_exit_layer'])\n"
        "print('full model F1', round(reference, 2), '→ best mode:', best_mode)",
    ),
    (
        "md",
        "## The whole dev-v1.1 set with the best mode\nE_T is tuned on one half of the articles and applied "
        "to the other (both ways), against the full model's F1 on the same questions. Latency per layer is "
        "measured at batch 1, sequence length of the profile.",
    ),
    (
        "code",
        "multi, _, _, _ = ee.load_exits(exit_dirs[best_mode])\nlat = ee.layer_latency_ms(multi, seq_len=P.max_seq_len)\n"
        "full = ee.layerwise_dev_stats(exit_dirs[best_mode], '1.1', P.eval_examples, data_dir=data_dir)\n"
        "server_v11 = ee.layerwise_dev_stats(exit_dirs['distill'], '1.1', P.eval_examples, data_dir=data_dir)['f1'][-1]\n"
        "titles = [e.title for e in ee.dev_questions('1.1', P.eval_examples, data_dir)[1]]\n"
        "cf = ee.cross_fitted_exit(full, titles, max_f1_loss, layer_latency_ms=np.array(lat['layer_ms']), reference_f1=server_v11)\n"
        "summary_v11 = {k: v for k, v in cf.items() if k not in ('exit_layers', 'threshold_per_question')}\n"
        "summary_v11['per_layer_f1'] = (100 * full['f1'].mean(1)).round(2).tolist()\nlat, summary_v11",
    ),
    (
        "code",
        "sweep = sweep_thresholds(full['f1'], full['entropy'], np.array(lat['layer_ms']), reference_f1=100 * server_v11.mean())\n"
        "chosen = sweep.point(int(np.argmin(np.abs(sweep.values - np.mean(cf['thresholds'])))))\n"
        "reporting.save_figure(plot_f1_vs_exit_layer(sweep, chosen, max_f1_loss=max_f1_loss), '03_f1_vs_exit_layer', REPORTS)\n"
        "reporting.save_figure(plot_f1_vs_latency(sweep, chosen, max_f1_loss=max_f1_loss), '03_f1_vs_latency', REPORTS)\n"
        "reporting.save_figure(plot_exit_histogram(cf['exit_layers'], multi.num_exits), '03_exit_histogram', REPORTS)\n"
        "two_x = [r for r in sweep.rows() if r['speedup'] >= 2.0]\n"
        "at_2x = max(two_x, key=lambda r: r['f1']) if two_x else None\nprint('best F1 at ≥ 2× (modelled from layer costs):', at_2x)",
    ),
    (
        "md",
        "## How far could any exit policy go? The oracle bound\nAn oracle that knows every layer's F1 for "
        "every question picks each question's exit layer to save the most time within the same F1 budget. "
        "No policy (entropy, patience or any other) can beat it, so its speed-up is the ceiling for this "
        "model; `speedup_upper_bound` is a proven bound (Lagrangian dual), `speedup_achieved` an assignment "
        "that meets the budget. Costs are the measured layer latencies.",
    ),
    (
        "code",
        "oracle = {}\nfor mode, s in [*stats_cmp.items(), (f'{best_mode} (all questions)', full)]:\n"
        "    ref = 100 * float((server_v11 if s is full else server_cmp).mean())\n"
        "    r = oracle_exit_bound(s['f1'], max_f1_loss, np.array(lat['layer_ms']), lat['embeddings_ms'], reference_f1=ref)\n"
        "    oracle[mode] = {k: v for k, v in r.items() if k != 'exit_layers'}\n"
        "{m: (r['reachable'], r.get('avg_exit_layer'), r['speedup_upper_bound']) for m, r in oracle.items()}",
    ),
    (
        "md",
        "## Measured speed-up of the layer-by-layer runtime (batch 1)\nThe same questions through all "
        "layers and with early exit; wall-clock time per question, tokenisation excluded.",
    ),
    (
        "code",
        "n_speed = 300 if P.name != 'smoke' else 20\nthr = float(cf['threshold_per_question'][0])\n"
        "speed = ee.measure_speedup(exit_dirs[best_mode], thr, '1.1', n_questions=n_speed, data_dir=data_dir)\nspeed",
    ),
    (
        "md",
        "## SQuAD 2.0: early exit with settled no-answer calls\nEach exit gets its own no-answer threshold "
        "(tuned for F1 like the official script's best threshold); a question may leave only when its span "
        "entropy is ≤ E_T **and** its null margin is at least `margin` away from that layer's threshold. "
        "Thresholds, E_T and margin are tuned on one half of the articles and applied to the other. The 2021 "
        "prototype's best early-exit F1 on dev-v2.0 was 62.1.",
    ),
    (
        "code",
        "ds2, ex2 = ee.dev_questions('2.0', P.eval_examples, data_dir)\n"
        "stats2 = ee.layerwise_dev_stats(exit_dirs[best_mode], '2.0', P.eval_examples, data_dir=data_dir)\n"
        "impossible = np.array([e.is_impossible for e in ex2])\n"
        "v2 = cross_fitted_squad2_exit(stats2, [e.title for e in ex2], impossible, max_f1_loss,\n"
        "                              layer_latency_ms=np.array(lat['layer_ms']))\n"
        "summary_v20 = {k: v for k, v in v2.items() if k not in ('exit_layers', 'setting_index')}\n"
        "{k: v for k, v in summary_v20.items() if k != 'settings'}",
    ),
    (
        "code",
        "setting = v2['settings'][int(v2['setting_index'][0])]  # tuned on the other half of the articles\n"
        "speed_v20 = ee.measure_speedup(exit_dirs[best_mode], setting['E_T'], '2.0', n_questions=n_speed, data_dir=data_dir,\n"
        "                               no_answer_margin=setting['margin'], null_thresholds=setting['null_thresholds'])\nspeed_v20",
    ),
    (
        "md",
        "## How many layers should the edge keep, and which edge model?\nThe edge keeps layers 1..k of an "
        "exits model (candidates: the distilled exits on the frozen full model, and the joint self-distilled "
        "model whose own layers learned to answer early); a question none of them settles is offloaded to the "
        "server's full model (its F1 counts). Cost per offload here: the full model on this machine (a GPU "
        "server is faster) plus the SSH round trip `rtt_ms`; and a second scenario, a GPU server over Wi-Fi. "
        "For each k, E_T is cross-fitted with offloading in the sweep.",
    ),
    (
        "code",
        "server_ms = lat['embeddings_ms'] + sum(lat['layer_ms'])\nsplits = {}\n"
        "for cand in [m for m in ('distill', 'joint_distill') if m in exit_dirs]:\n"
        "    st = ee.layerwise_dev_stats(exit_dirs[cand], '1.1', P.eval_examples, data_dir=data_dir)\n"
        "    for scenario, offload_ms in (('this_cpu_server', server_ms + rtt_ms), ('gpu_server_wifi', 0.2 * server_ms + 20.0)):\n"
        "        splits[(cand, scenario)] = choose_edge_depth(st['f1'], st['entropy'], server_v11, titles, np.array(lat['layer_ms']),\n"
        "                                                     lat['embeddings_ms'], offload_ms=offload_ms, max_f1_loss=max_f1_loss)\n"
        "edge_split = {f'{c}/{s}': v for (c, s), v in splits.items()}\n"
        "{k: (v['best']['k'], round(v['best']['f1'], 2), round(v['best']['share_offloaded'], 3), round(v['best']['speedup'], 2),\n"
        "     v['within_target']) for k, v in edge_split.items()}",
    ),
    (
        "code",
        "fig, ax = plt.subplots(figsize=(6.5, 3.6))\n"
        "for name, v in edge_split.items():\n"
        "    ax.plot([r['k'] for r in v['rows']], [r['expected_ms'] for r in v['rows']], marker='o', label=name)\n"
        "ax.set_xlabel('layers kept on the edge (k)'); ax.set_ylabel('expected ms per question'); ax.legend(fontsize=7)\n"
        "fig.tight_layout()\nreporting.save_figure(fig, '03_edge_depth', REPORTS)",
    ),
    (
        "md",
        "## Entropy predictor (EdgeBERT's look-up table)\nFrom layer 1's entropy, predict whether a question "
        "will exit on the device; send the hopeless ones to the server at once. Fitted on one half of the "
        "articles, evaluated on the other.",
    ),
    (
        "code",
        "half = np.array([t in set(sorted(set(titles))[::2]) for t in titles])\nK = multi.num_exits\n"
        "layers = np.minimum(cf['exit_layers'], K)\nexit_f1 = full['f1'][layers - 1, np.arange(len(layers))]\n"
        "pred = EntropyExitPredictor(K, layer=1, threshold=thr).fit(full['entropy'][0][half], cf['exit_layers'][half])\n"
        "predictor = evaluate_predictor(pred, full['entropy'][0][~half], cf['exit_layers'][~half], exit_f1[~half],\n"
        "                               server_v11[~half], layer_latency_ms=np.array(lat['layer_ms']))\npredictor",
    ),
    (
        "md",
        "## Calibrated early-exit predictions\nEvery dev question's answer at the layer where the calibrated "
        "edge stops (E_T tuned on the other half of the articles; SQuAD 2.0 with that fold's no-answer "
        "thresholds), in the official format, and beside it each question's exit layer, entropy and E_T. "
        "Scoring the written files gives back the F1 above.",
    ),
    (
        "code",
        "ds1, ex1 = ee.dev_questions('1.1', P.eval_examples, data_dir)\n"
        "exit_predictions = {\n"
        "    '1.1': calibrated_dev_predictions(REPORTS / 'predictions', ds1.raw, '1.1', ex1, full, cf),\n"
        "    '2.0': calibrated_dev_predictions(REPORTS / 'predictions', ds2.raw, '2.0', ex2, stats2, v2),\n"
        "}\n"
        "{v: (round(r['f1'], 2), round(r['avg_exit_layer'], 2), r['questions']) for v, r in exit_predictions.items()}",
    ),
    (
        "code",
        "reporting.save_metrics('03_early_exit', {'profile': P.name, 'modes': compare, 'best_mode': best_mode,\n"
        "    'layer_latency': lat, 'dev_v1_1': summary_v11, 'best_f1_at_2x_modelled': at_2x, 'oracle_bound': oracle,\n"
        "    'runtime_speedup': speed,\n"
        "    'dev_v2_0': summary_v20, 'runtime_speedup_v2': speed_v20, 'edge_split': edge_split,\n"
        "    'entropy_predictor': predictor, 'exit_predictions': exit_predictions}, REPORTS)",
    ),
]

NB04 = [
    (
        "md",
        "# 04 · Edge export and benchmark\n\nThe exits model of notebook 03 exported as LiteRT parts "
        "(embeddings, then one part per layer with its exit head) in float32, float16 and dynamic-range "
        "int8, packed into verified bundles (sha256 manifest). The Keras-free edge runtime answers the "
        "same questions as the Keras layer-by-layer runtime; we compare answers, F1, size and latency.",
    ),
    PARAMS,
    ("code", "precisions = ['float32', 'float16', 'int8']"),
    (
        "code",
        "import json\n\nimport matplotlib.pyplot as plt\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.early_exit import experiment as ee\nfrom elma_utils.export.benchmark import compare_precisions\n"
        "from elma_utils.model.finetune import finetune\n\nP = config.get_profile(profile)\n"
        "REPORTS = config.reports_dir_for(P.name)\nmodel_dir = finetune(P, data_dir=data_dir, verbose=0)\n"
        "prev = reporting.earlier_metrics('03_early_exit', REPORTS)  # calibrated by notebook 03\n"
        "mode = prev['best_mode']\nE_T = float(sum(prev['dev_v1_1']['thresholds']) / 2)\n"
        "exits_dir = ee.train_exits_for_profile(model_dir, mode, P, data_dir)\n"
        "multi, tokenizer, cfg, _ = ee.load_exits(exits_dir)\nmode, E_T",
    ),
    (
        "code",
        "n = 300 if P.name != 'smoke' else 12\nds, examples = ee.dev_questions('1.1', n, data_dir)\n"
        "edge = compare_precisions(multi, tokenizer, cfg, config.artifacts_dir() / f'{model_dir.name}-edge', precisions,\n"
        "                          {'E_T': E_T, 'rule': 'max'}, model_dir.name + '-' + mode, examples, ds.raw)\n"
        "{k: {kk: vv for kk, vv in v.items() if kk != 'part_bytes'} if isinstance(v, dict) else v for k, v in edge.items()}",
    ),
    (
        "code",
        "fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))\n"
        "axes[0].bar(precisions, [edge[p]['tflite_bytes'] / 1e6 for p in precisions]); axes[0].set_ylabel('bundle parts (MB)')\n"
        "axes[1].bar(precisions, [edge[p]['question_ms_p50'] for p in precisions]); axes[1].set_ylabel('ms per question (p50, batch 1)')\n"
        "fig.tight_layout()\nreporting.save_figure(fig, '04_size_and_latency_per_precision', REPORTS)",
    ),
    (
        "md",
        "## Whole dev sets, from raw text as on the device\nEvery dev-v1.1 question through the float32 and int8 "
        "bundles with the calibrated E_T (tokenised by the bundle's keras-free tokenizer, each window run at its "
        "own length); dev-v2.0 through int8 with the per-layer no-answer thresholds and margin of notebook 03, "
        "each article half with the settings tuned on the other half. Latency per question and per exit layer.",
    ),
    (
        "code",
        "from elma_utils.early_exit.policies import EntropyPolicy\nfrom elma_utils.early_exit.squad2 import held_out_folds\n"
        "from elma_utils.export.benchmark import evaluate_bundle\n\nn_whole = P.eval_examples if P.name != 'smoke' else 40\n"
        "ds1, ex1 = ee.dev_questions('1.1', n_whole, data_dir)\n"
        "whole_v11 = {p: evaluate_bundle(edge[p]['bundle'], ex1, ds1.raw, '1.1') for p in ('float32', 'int8')}\n"
        "int8_f1_loss = whole_v11['float32']['f1'] - whole_v11['int8']['f1']\nwhole_v11, int8_f1_loss",
    ),
    (
        "md",
        "### Early exit on the device runtime\nThe same int8 bundle on the first dev-v1.1 questions with every layer "
        "(no early exit) and with the calibrated E_T: the measured speed-up of LiteRT inference at batch 1.",
    ),
    (
        "code",
        "from elma_utils.early_exit.policies import NeverExit\n\nm = 300 if P.name != 'smoke' else 20\n"
        "no_exit = evaluate_bundle(edge['int8']['bundle'], ex1[:m], ds1.raw, '1.1', policy=NeverExit())\n"
        "with_exit = evaluate_bundle(edge['int8']['bundle'], ex1[:m], ds1.raw, '1.1')\n"
        "device_speedup = {'questions': m, 'no_exit': no_exit, 'early_exit': with_exit,\n"
        "                  'speedup_p50': no_exit['question_ms_p50'] / with_exit['question_ms_p50']}\n"
        "{k: (v['f1'], v['avg_exit_layer'], v['question_ms_p50']) if isinstance(v, dict) else v for k, v in device_speedup.items()}",
    ),
    (
        "code",
        "ds2, ex2 = ee.dev_questions('2.0', n_whole, data_dir)\nparts = []\n"
        "for setting, mask in zip(prev['dev_v2_0']['settings'], held_out_folds([e.title for e in ex2]), strict=True):\n"
        "    qs = [e for e, m in zip(ex2, mask, strict=True) if m]\n"
        "    pol = EntropyPolicy(setting['E_T'], no_answer_margin=setting['margin'], null_threshold=setting['null_thresholds'])\n"
        "    parts.append(evaluate_bundle(edge['int8']['bundle'], qs, ds2.raw, '2.0', policy=pol,\n"
        "                                 null_thresholds=setting['null_thresholds']))\n"
        "n2 = sum(r['questions'] for r in parts)\n"
        "whole_v20_int8 = {k: sum(r[k] * r['questions'] for r in parts) / n2 for k in ('f1', 'exact', 'avg_exit_layer',\n"
        "                  'share_solved_on_edge', 'question_ms_p50')} | {'questions': n2}\nwhole_v20_int8",
    ),
    (
        "code",
        "fig, ax = plt.subplots(figsize=(6, 3.2))\nfor p in ('float32', 'int8'):\n"
        "    ms = whole_v11[p]['layer_ms_p50']\n    ax.plot(range(1, len(ms) + 1), ms, marker='o', label=p)\n"
        "ax.set_xlabel('exit layer'); ax.set_ylabel('ms per question (median)'); ax.legend(); fig.tight_layout()\n"
        "reporting.save_figure(fig, '04_latency_per_exit_layer', REPORTS)",
    ),
    (
        "code",
        "reporting.save_metrics('04_edge_export_and_benchmark', {'profile': P.name, 'mode': mode, 'E_T': E_T,\n"
        "    'seq_len': cfg['max_seq_len'], 'edge': edge, 'whole_dev_v1_1': whole_v11, 'int8_f1_loss_v1_1': int8_f1_loss,\n"
        "    'whole_dev_v2_0_int8': whole_v20_int8, 'device_speedup_int8': device_speedup}, REPORTS)",
    ),
]

NB05 = [
    (
        "md",
        "# 05 · Encrypted offloading\n\nThe whole path on this machine's loopback: the full model served by "
        "`OffloadServer` (loopback only), reached through ELMA's SSH endpoint (paramiko, ed25519 keys, pinned host "
        "key) or a real OpenSSH sshd; the edge bundle of notebook 04 answers with early exit and offloads what it "
        "cannot settle over one persistent SSH channel. We answer the dev set through the edge, measure the "
        "offload share and end-to-end F1 against the threshold, and what the SSH link costs per question.",
    ),
    PARAMS,
    ("code", "precision = 'int8'\nthresholds = [0.2, 0.4, 0.5, 0.6, 0.7, 0.9]\nsystem_max_f1_loss = 0.5"),
    (
        "code",
        "from dataclasses import asdict\n\nimport matplotlib.pyplot as plt\nimport numpy as np\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.early_exit import experiment as ee\nfrom elma_utils.early_exit.policies import EntropyPolicy\n"
        "from elma_utils.model.finetune import finetune\nfrom elma_utils.bench.loopback import LoopbackDeployment\n"
        "from elma_utils.early_exit.edge_split import evaluate_edge_depth\nfrom elma_utils.early_exit.squad2 import held_out_folds\n"
        "from elma_utils.bench.end_to_end import ask_held_out, end_to_end_summary, full_model_answers, write_end_to_end_predictions\n"
        "from elma_utils.bench.throughput import format_throughput\n"
        "from elma_utils.squad.metrics import per_question_scores\n\n"
        "P = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\nmodel_dir = finetune(P, data_dir=data_dir, verbose=0)\n"
        "bundle = config.artifacts_dir() / f'{model_dir.name}-edge' / precision  # written by notebook 04\n"
        "work = config.artifacts_dir() / f'{model_dir.name}-offload'\nbundle",
    ),
    (
        "md",
        "## E_T for the whole system\nThe bundle's E_T (notebook 03) keeps the *edge alone* within 1 F1 of "
        "the full model. Here an unsettled question goes to the server and gets the full model's answer, and "
        "the system's target is tighter (`system_max_f1_loss`), so E_T is chosen again with offloading in the "
        "sweep (`edge_split.evaluate_edge_depth` with every layer kept; an offload costs the full model on this "
        "machine plus 1 ms), on one half of the dev articles, and applied to the other half, and vice versa. "
        "The statistics are the float32 exits of notebook 03 (cached); the device runs the int8 bundle.",
    ),
    (
        "code",
        "prev = reporting.earlier_metrics('03_early_exit', REPORTS)\nmode, lat = prev['best_mode'], prev['layer_latency']\n"
        "ds, examples = ee.dev_questions('1.1', P.eval_examples, data_dir)  # the questions notebook 03 calibrated on\n"
        "titles = [e.title for e in examples]\n"
        "edge_stats = ee.layerwise_dev_stats(ee.train_exits_for_profile(model_dir, mode, P, data_dir), '1.1', P.eval_examples, data_dir=data_dir)\n"
        "server_f1 = ee.layerwise_dev_stats(ee.train_exits_for_profile(model_dir, 'distill', P, data_dir), '1.1', P.eval_examples,\n"
        "                                   data_dir=data_dir)['f1'][-1]  # frozen backbone: its last exit is the full model\n"
        "full_ms = lat['embeddings_ms'] + sum(lat['layer_ms'])\n"
        "system_cal = evaluate_edge_depth(len(lat['layer_ms']), edge_stats['f1'], edge_stats['entropy'], server_f1, titles,\n"
        "                                 np.array(lat['layer_ms']), lat['embeddings_ms'], full_ms + 1.0, full_ms, system_max_f1_loss)\n"
        "mode, system_cal",
    ),
    (
        "md",
        "## The dev set through edge + server\nEvery dev-v1.1 question (the `cpu` profile; the profile's sample in "
        "`smoke`) asked as a device asks it, each article half with the E_T tuned on the other half; questions no "
        "edge layer settles go to the server over ELMA's SSH endpoint. The same questions through the full model "
        "alone are the reference (target: ≥ 60 % answered on the edge with F1 within 0.5 of the full model). The "
        "answers are written in the official format, with where each came from.",
    ),
    (
        "code",
        "dep = LoopbackDeployment(model_dir, bundle, work, way_in='endpoint', device_id='notebook-05').start()\n"
        "wire0 = dep.tunnel.stats.wire_bytes_sent + dep.tunnel.stats.wire_bytes_received\n"
        "results = ask_held_out(dep.edge, examples, system_cal.thresholds, held_out_folds(titles))\n"
        "wire = dep.tunnel.stats.wire_bytes_sent + dep.tunnel.stats.wire_bytes_received - wire0\n"
        "reference = full_model_answers(dep.server.service.answerer.qa, examples)  # the full model alone\n"
        "end_to_end = end_to_end_summary(examples, results, ds.raw, '1.1', reference=reference, wire_bytes=wire,\n"
        "                                 max_f1_loss=system_max_f1_loss)\n"
        "end_to_end['files'] = {k: str(v) for k, v in write_end_to_end_predictions(REPORTS / 'predictions', '1.1', examples, results).items()}\n"
        "{k: end_to_end[k] for k in ('questions', 'f1', 'full_model_f1', 'share', 'targets_met')}",
    ),
    (
        "md",
        "## End-to-end F1 against the threshold\nA lower E_T keeps fewer questions on the device: more offloads, "
        "F1 closer to the server's.",
    ),
    (
        "code",
        "m = 300 if P.name != 'smoke' else 8\ncurve = []\nedge_model = dep.edge.edge\nown_policy = edge_model.policy\n"
        "for t in thresholds:\n"
        "    edge_model.policy = EntropyPolicy(t)\n"
        "    rs = [dep.edge.answer(e.question, e.context) for e in examples[:m]]\n"
        "    sc = per_question_scores(ds.raw, {e.qas_id: r.text for e, r in zip(examples[:m], rs, strict=True)}, '1.1')\n"
        "    curve.append({'E_T': t, 'f1': 100 * float(np.mean([sc[e.qas_id][1] for e in examples[:m]])),\n"
        "                  'share_offloaded': float(np.mean([r.source == 'server' for r in rs])),\n"
        "                  'ms_per_question': float(np.mean([r.total_ms for r in rs]))})\n"
        "edge_model.policy = own_policy\n"
        "fig, ax = plt.subplots(figsize=(6, 3.4))\nax.plot([c['share_offloaded'] for c in curve], [c['f1'] for c in curve], marker='o')\n"
        "for c in curve:\n    ax.annotate(f\"{c['E_T']:g}\", (c['share_offloaded'], c['f1']), fontsize=8)\n"
        "ax.set_xlabel('share offloaded to the server'); ax.set_ylabel('end-to-end F1'); fig.tight_layout()\n"
        "reporting.save_figure(fig, '05_f1_vs_offload_share', REPORTS)\ncurve",
    ),
    (
        "md",
        "## What the SSH link costs per offloaded question\nA ping (no model time) over the persistent SSH channel, "
        "a new channel per question, a new SSH connection per question, and plain TCP to the service; the same "
        "through a real OpenSSH sshd.",
    ),
    (
        "code",
        "lines = 300 if P.name != 'smoke' else 30\nrtt = {'endpoint': dep.round_trips(lines, new_connection_lines=10 if P.name != 'smoke' else 3)}\n"
        "store_stats = dep.server.store.stats()\ndep.close()\n"
        "with LoopbackDeployment(model_dir, bundle, work, way_in='sshd', device_id='notebook-05-sshd') as dep2:\n"
        "    rtt['sshd'] = dep2.round_trips(lines, new_connection_lines=10 if P.name != 'smoke' else 3)\n"
        "{w: {m: (round(r['p50_ms'], 3), round(r['wire_bytes_per_line'])) for m, r in v.items()} for w, v in rtt.items()}",
    ),
    (
        "md",
        "## Server throughput with 1, 4 and 8 devices at once\nEach device on its own persistent SSH connection "
        "through ELMA's endpoint, asking dev questions one after another; every reply is matched to its request. "
        "The server is the real full model with its micro-batcher; clients, SSH and server share this "
        "machine's cores. A deployment of its own, so the benchmark's asks do not enter the store above.",
    ),
    (
        "code",
        "per_client = 100 if P.name != 'smoke' else 5\n"
        "with LoopbackDeployment(model_dir, bundle, work.parent / f'{work.name}-throughput', device_id='bench') as dep3:\n"
        "    throughput = dep3.server_throughput([(e.question, e.context) for e in examples], (1, 4, 8), per_client=per_client)\n"
        "print(format_throughput(throughput))",
    ),
    (
        "code",
        "overhead = {w: v['ssh_persistent']['p50_ms'] - v['plain_tcp']['p50_ms'] for w, v in rtt.items()}\n"
        "print('persistent SSH minus plain TCP (ms, p50):', overhead)\n"
        "reporting.save_metrics('05_encrypted_offload', {'profile': P.name, 'precision': precision, 'end_to_end': end_to_end,\n"
        "    'system_calibration': {'mode': mode, 'max_f1_loss': system_max_f1_loss, **asdict(system_cal)},\n"
        "    'threshold_curve': curve, 'round_trips': rtt, 'ssh_overhead_ms_p50': overhead, 'throughput': throughput,\n"
        "    'store': {'offloads': store_stats.offloads, 'questions': store_stats.questions}}, REPORTS)",
    ),
]

NB07 = [
    (
        "md",
        "# 07 · Data set growth and model sync\n\nThe loop that makes ELMA improve where the device is weak: the "
        "device asks questions the models never trained on (held-back SQuAD v1.1 train questions); those it "
        "cannot settle go to the server, which answers and stores them. The server exports them as a SQuAD data "
        "set (its answers as pseudo-labels), distils the edge exits on it with the full model's answers as "
        "teacher, evaluates candidate and current edge on held-out questions, and publishes only if the "
        "candidate is no worse. The device then fetches the new bundle over the same SSH connection (SFTP), "
        "checks every sha256 and swaps atomically.",
    ),
    PARAMS,
    ("code", "precision = 'int8'\nmode = 'distill'\ntolerance = 0.0"),
    (
        "code",
        "import json\n\nimport matplotlib.pyplot as plt\n\nfrom elma_utils import config, reporting\n"
        "from elma_utils.early_exit import experiment as ee\nfrom elma_utils.model.finetune import finetune, fresh_questions\n"
        "from elma_utils.early_exit.policies import EntropyPolicy\nfrom elma_utils.edge import sync\nfrom elma_utils.server import publish\n"
        "from elma_utils.model.finetune import training_examples\nfrom elma_utils.squad.data import examples_to_squad_json\n"
        "from elma_utils.bench.loopback import LoopbackDeployment\nfrom elma_utils.squad.data import load_squad\n\n"
        "P = config.get_profile(profile)\nREPORTS = config.reports_dir_for(P.name)\nmodel_dir = finetune(P, data_dir=data_dir, verbose=0)\n"
        "m03 = REPORTS / 'metrics' / '03_early_exit.json'\nbest = json.loads(m03.read_text())['best_mode'] if m03.is_file() else 'distill'\n"
        "exits_dir = ee.train_exits_for_profile(model_dir, best, P, data_dir)\n"
        "bundle = config.artifacts_dir() / f'{model_dir.name}-edge' / precision  # written by notebook 04\n"
        "run = config.artifacts_dir() / f'{model_dir.name}-growth'\nserver_root, device_root = run / 'server', run / 'device'\n"
        "if not (publish.bundles_dir(server_root) / 'LATEST.json').is_file():\n"
        "    publish.publish_bundle(bundle, server_root, exits_dir=exits_dir)\npublish.read_latest(server_root)",
    ),
    (
        "md",
        "## The device asks, the server keeps the hard ones\nThe device first installs the published bundle "
        "(SFTP through ELMA's SSH endpoint), then asks held-back train questions.",
    ),
    (
        "code",
        "n_ask, n_cal, n_dev = (4000, 1000, 500) if P.name != 'smoke' else (40, 20, 20)\n"
        "# questions no model trained on (held-back train questions, or other dev articles for full profiles)\n"
        "pool = fresh_questions(P, n_ask + n_cal, data_dir, dev_held_out=n_dev)\n"
        "asked = pool[:n_ask]\nasked_contexts = {e.context for e in asked}\n"
        "calibration = [e for e in pool[n_ask:] if e.context not in asked_contexts]  # chooses a retrained edge's E_T\n"
        "with LoopbackDeployment(model_dir, bundle, run / 'loop', device_id='growth-device',\n"
        "                        sftp_root=publish.bundles_dir(server_root)) as dep:\n"
        "    installed = sync.sync_with_client(dep.tunnel, '.', device_root)\n"
        "    if P.name == 'smoke':  # the tiny random model settles everything: offload all to exercise the loop\n"
        "        dep.edge.edge.policy = EntropyPolicy(-1.0)\n"
        "    sources = [dep.edge.answer(e.question, e.context).source for e in asked]\n"
        "    store_path = dep.server.store.db.path\n    stored = dep.server.store.stats()\n"
        "grown = {'asked': len(asked), 'offloaded': sources.count('server'), 'fallbacks': sources.count('edge-fallback'),\n"
        "         'stored_questions': stored.questions, 'installed': installed.version}\ngrown",
    ),
    (
        "md",
        "## Retrain, evaluate, publish only if no worse\nHeld out: the store export's evaluation contexts (never "
        "trained on) and the first dev-v1.1 questions with their real labels. The grown training set is the "
        "stored questions (server answers as pseudo-labels) plus the full model's own SQuAD training questions, so "
        "that the exits learn the device's hard cases without forgetting the easy ones. Retrained heads are more or "
        "less sure than the old ones, so the candidate's E_T is chosen again (notebook 03's rule: cheapest within 1 F1 "
        "of its full depth) on held-back questions that neither model trained on and the device did not ask.",
    ),
    (
        "code",
        "dev_path = load_squad('1.1', 'dev', data_dir=data_dir).path\n"
        "n_original = 3000 if P.name != 'smoke' else 20\n"
        "original = [e for e in training_examples(P, data_dir) if not e.is_impossible][:n_original]  # the full model's own\n"
        "(run / 'original.json').write_text(json.dumps(examples_to_squad_json(original)))\n"
        "(run / 'calibration.json').write_text(json.dumps(examples_to_squad_json(calibration)))\n"
        "result = publish.retrain_edge(store_path, server_root, mode=mode, full_model_dir=model_dir, dev_eval=dev_path,\n"
        "                              original_train=run / 'original.json', calibration=run / 'calibration.json',\n"
        "                              dev_limit=n_dev, squad_version='1.1', epochs=1.0,\n"
        "                              batch_size=P.batch_size, tolerance=tolerance)\n"
        "print(result.reason)\n{'current': result.current.get('f1'), 'candidate': result.candidate.get('f1'),\n"
        " 'candidate E_T': result.recalibration}",
    ),
    (
        "code",
        "names = [k for k in result.current.get('sets', {}) if k in result.candidate.get('sets', {})]\n"
        "fig, ax = plt.subplots(figsize=(6, 3.2))\nx = range(len(names))\n"
        "ax.bar([i - 0.2 for i in x], [result.current['sets'][k]['f1'] for k in names], 0.4, label='current edge')\n"
        "ax.bar([i + 0.2 for i in x], [result.candidate['sets'][k]['f1'] for k in names], 0.4, label='retrained edge')\n"
        "ax.set_xticks(list(x), names); ax.set_ylabel('edge F1 (held out)'); ax.legend(); fig.tight_layout()\n"
        "reporting.save_figure(fig, '07_edge_f1_before_after', REPORTS)",
    ),
    (
        "md",
        "## Sync\nThe device fetches whatever is now published (a new version if the gate let it through) "
        "over SFTP, verifies every file and swaps; the previous version stays for rollback.",
    ),
    (
        "code",
        "with LoopbackDeployment(model_dir, bundle, run / 'loop', device_id='growth-device',\n"
        "                        sftp_root=publish.bundles_dir(server_root)) as dep:\n"
        "    synced = sync.sync_with_client(dep.tunnel, '.', device_root)\n"
        "{'status': synced.status, 'version': synced.version, 'previous': synced.previous, 'bytes': synced.bytes,\n"
        " 'seconds': round(synced.seconds, 2)}",
    ),
    (
        "code",
        "reporting.save_metrics('07_dataset_growth_and_sync', {'profile': P.name, 'mode': mode, 'grown': grown,\n"
        "    'retrain': result.to_dict(), 'sync': {'status': synced.status, 'version': synced.version,\n"
        "    'previous': synced.previous, 'bytes': synced.bytes, 'seconds': synced.seconds}}, REPORTS)",
    ),
]

if __name__ == "__main__":
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nb00_cells import NB00
    from nb04_device_cells import NB04_DEVICE
    from nb06_cells import NB06

    for name, cells in [
        ("00_environment", NB00),
        ("01_squad_data", NB01),
        ("02_finetune_full_model", NB02),
        ("03_early_exit", NB03),
        ("04_edge_export_and_benchmark", NB04 + NB04_DEVICE),
        ("05_encrypted_offload", NB05),
        ("06_speech_to_answer", NB06),
        ("07_dataset_growth_and_sync", NB07),
    ]:
        nbf.write(notebook(cells, name), ROOT / "notebooks" / f"{name}.ipynb")
    # the committed notebooks are what ruff checks: sort imports and format them like the package
    ruff = Path(sys.executable).parent / "ruff"
    subprocess.run([str(ruff), "check", "--fix", "-q", "notebooks"], cwd=ROOT, check=False)
    subprocess.run([str(ruff), "format", "-q", "notebooks"], cwd=ROOT, check=True)
