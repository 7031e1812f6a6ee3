# %% [markdown]
# # 01 · SQuAD data
#
# Load and validate SQuAD v1.1 and v2.0, look at how long contexts are against the model's window, and check that labelled token spans give back the answer text for both tokenizers (WordPiece for MiniLM, SentencePiece for ALBERT).

# %% tags=["parameters"]
# Parameters (papermill injects new values below this cell; nbval uses ELMA_PROFILE)
import os

profile = os.environ.get("ELMA_PROFILE", "cpu")
data_dir = None

# %%
import random

from elma_utils import config, reporting
from elma_utils.model.tokenizers import QATokenizer
from elma_utils.squad import stats
from elma_utils.squad.data import load_squad, make_unanswerable, split_by_article
from elma_utils.squad.features import build_features, span_recovery_rate

P = config.get_profile(profile)
REPORTS = config.reports_dir_for(P.name)
P

# %% [markdown]
# ## Load and validate
# Every answer is checked at its `answer_start`; bad examples are counted, not fatal.

# %%
limit = P.data_check_limit
train = load_squad("1.1", "train", data_dir=data_dir, limit=limit)
dev1 = load_squad("1.1", "dev", data_dir=data_dir, limit=limit)
dev2 = load_squad("2.0", "dev", data_dir=data_dir, limit=limit)
summary = {
    name: stats.dataset_summary(ds)
    for name, ds in [("train-v1.1", train), ("dev-v1.1", dev1), ("dev-v2.0", dev2)]
}
summary

# %%
for name, ds in [("train-v1.1", train), ("dev-v1.1", dev1), ("dev-v2.0", dev2)]:
    print(name, ds.path, "| problems:", ds.report.n_bad, ds.report.problems[:3])

# %% [markdown]
# ## Context length against the window
# Contexts longer than the window's room are cut into overlapping windows (`doc_stride`).

# %%
tok = QATokenizer.minilm()
albert = QATokenizer.albert()
lengths = {
    "dev-v1.1 WordPiece": stats.context_token_lengths(dev1.examples, tok),
    "dev-v1.1 SentencePiece": stats.context_token_lengths(dev1.examples, albert),
}
fig = stats.plot_context_lengths(lengths, P.max_seq_len)
reporting.save_figure(fig, "01_context_lengths", REPORTS)
coverage = {k: round(stats.window_coverage(v, P.max_seq_len), 4) for k, v in lengths.items()}
coverage

# %% [markdown]
# ## Labelled spans give back the answer
# Over the whole train set (a sample in the smoke profile): the share of answerable questions whose labelled token span, cut from the context through the offsets, equals the answer text after SQuAD normalisation.

# %%
recovery = {}
for name, t in [("wordpiece", tok), ("sentencepiece", albert)]:
    feats = build_features(
        train.examples, t, max_seq_len=P.max_seq_len, doc_stride=P.doc_stride, max_query_len=P.max_query_len
    )
    recovery[name] = {**span_recovery_rate(train.examples, feats), "features": len(feats)}
recovery

# %% [markdown]
# ## Splits by article and made-up unanswerable questions
# No v2.0 train set exists here, so unanswerable training examples pair a question with another paragraph of its article.

# %%
fit, held_out = split_by_article(train.examples, 0.1, seed=P.seed)
overlap = {e.title for e in fit} & {e.title for e in held_out}
negatives = make_unanswerable(fit, 0.5, seed=P.seed)
split = {
    "fit_questions": len(fit),
    "held_out_questions": len(held_out),
    "title_overlap": len(overlap),
    "made_up_unanswerable": len(negatives),
}
assert not overlap
split

# %%
random.Random(0).choice(negatives)

# %%
reporting.save_metrics(
    "01_squad_data",
    {
        "profile": P.name,
        "datasets": summary,
        "window_coverage": coverage,
        "span_recovery": recovery,
        "split": split,
    },
    REPORTS,
)
