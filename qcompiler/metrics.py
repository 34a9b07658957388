"""Accuracy metrics that compare a quantized model's outputs with the float model's.

Each metric is a pure function on arrays; `run_outputs` runs a model over data once (onnxruntime
CPU) so the same outputs can feed several metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm


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


def run_outputs(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    output: str,
    *,
    progress: bool = False,
    description: str = "evaluating",
    threads: int | None = None,
) -> np.ndarray:
    """Concatenate one output of `model` over all batches (onnxruntime CPU, full optimizations)."""
    from qcompiler.backends.onnxruntime import create_session, session_options

    session = create_session(model, session_options(threads=threads))
    chunks = [
        session.run([output], dict(feed))[0] for feed in tqdm(feeds, desc=description, disable=not progress)
    ]
    return np.concatenate(chunks, axis=0)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Cosine (mean, min) per sample and SQNR of `candidate` against `reference`."""
    cosines = row_cosine(reference, candidate)
    return Fidelity(float(cosines.mean()), float(cosines.min()), sqnr_db(reference, candidate), len(cosines))


def compare_models(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    output: str,
    *,
    progress: bool = False,
) -> Fidelity:
    """Fidelity of `candidate`'s `output` against `reference` on the same batches."""
    expected = run_outputs(reference, feeds, output, progress=progress, description="float model")
    got = run_outputs(candidate, feeds, output, progress=progress, description="quantized model")
    return fidelity(expected, got)
