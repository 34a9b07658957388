"""Accuracy metrics that compare a quantized model's outputs with the float model's.

Each metric is a pure function on arrays; `run_outputs` runs a model over data once (onnxruntime
CPU) so the same outputs can feed several metrics.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from qcompiler.backend import Runner
from qcompiler.precision import as_float32


def row_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (flattened beyond the first axis)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB over the whole tensor."""
    noise = np.sum((reference.astype(np.float64) - candidate) ** 2)
    signal = np.sum(reference.astype(np.float64) ** 2)
    return float(10 * np.log10(signal / max(noise, 1e-30)))


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Per-sample cosine summary of one output against the float model."""

    mean_cosine: float
    min_cosine: float
    sqnr_db: float
    samples: int

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly view."""
        return dataclasses.asdict(self)


SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")


def query_document_pairs(paragraphs: Sequence[str], min_words: int = 3) -> list[tuple[str, str]]:
    """(first sentence, rest of the paragraph) for paragraphs with at least two sentences."""
    pairs = []
    for paragraph in paragraphs:
        parts = SENTENCE_BREAK.split(paragraph.strip(), maxsplit=1)
        if len(parts) == 2 and all(len(part.split()) >= min_words for part in parts):
            pairs.append((parts[0], parts[1]))
    return pairs


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """Each query ranks every document; the right one is the query's own paragraph."""

    recall_at_1: float
    mrr: float
    queries: int

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly view."""
        return dataclasses.asdict(self)


def retrieval(query_embeddings: np.ndarray, document_embeddings: np.ndarray) -> Retrieval:
    """Recall@1 and mean reciprocal rank of document i for query i, by cosine similarity."""
    queries = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True)
    documents = document_embeddings / np.linalg.norm(document_embeddings, axis=1, keepdims=True)
    similarity = queries @ documents.T
    correct = np.diag(similarity)
    ranks = 1 + np.sum(similarity > correct[:, None], axis=1)
    return Retrieval(float(np.mean(ranks == 1)), float(np.mean(1.0 / ranks)), len(ranks))


def next_token_nll(logits: np.ndarray, input_ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens 1..T given their prefixes, and the token count."""
    shifted = logits[:, :-1].astype(np.float64)
    targets = input_ids[:, 1:]
    peak = shifted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted - peak).sum(axis=-1)) + peak[..., 0]
    chosen = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    return float(np.sum(log_norm - chosen)), int(targets.size)


def perplexity(
    runner: Runner,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    output: str = "logits",
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over token windows, run by `runner`."""
    total, count = 0.0, 0
    for feed in tqdm(feeds, desc="perplexity", disable=not progress):
        nll, tokens = next_token_nll(as_float32(runner.run([output], feed)[0]), np.asarray(feed["input_ids"]))
        total, count = total + nll, count + tokens
    return float(np.exp(total / max(count, 1)))


def run_outputs(
    runner: Runner,
    feeds: Iterable[Mapping[str, np.ndarray]],
    output: str,
    *,
    progress: bool = False,
    description: str = "evaluating",
) -> np.ndarray:
    """Concatenate one output over all batches, run by `runner`."""
    chunks = [
        as_float32(runner.run([output], feed)[0])
        for feed in tqdm(feeds, desc=description, disable=not progress)
    ]
    return np.concatenate(chunks, axis=0)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Cosine (mean, min) per sample and SQNR of `candidate` against `reference`."""
    cosines = row_cosine(reference, candidate)
    return Fidelity(float(cosines.mean()), float(cosines.min()), sqnr_db(reference, candidate), len(cosines))


def compare_models(
    reference: Runner,
    candidate: Runner,
    feeds: Sequence[Mapping[str, np.ndarray]],
    output: str,
    *,
    progress: bool = False,
) -> Fidelity:
    """Fidelity of `candidate`'s `output` against `reference`'s on the same batches."""
    expected = run_outputs(reference, feeds, output, progress=progress, description="float model")
    got = run_outputs(candidate, feeds, output, progress=progress, description="quantized model")
    return fidelity(expected, got)
