"""Shared fixtures: real SQuAD files from ../shared/data/squad and the two tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def dev_v11():
    from elma_utils.squad.data import load_squad

    return load_squad("1.1", "dev", download=False)


@pytest.fixture(scope="session")
def train_v11():
    from elma_utils.squad.data import load_squad

    return load_squad("1.1", "train", download=False)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from elma_utils.model.tokenizers import QATokenizer

    return QATokenizer.minilm()


@pytest.fixture(scope="session")
def albert_tokenizer():
    from elma_utils.model.tokenizers import QATokenizer

    return QATokenizer.albert()
