"""Calibration engine: passes declare the statistics they need; one run of the data serves them all.

A pass returns `StatRequest`s (a tensor and a kind of statistic). `collect` merges the requests,
adds the requested intermediate tensors as outputs of a clone of the model, runs the data through
onnxruntime once, and folds each batch into a streaming reducer as it arrives. Memory is bounded
by the reducers' state (a min/max pair, a histogram, one vector per channel), never by the number
of samples. Statistics of initializers are computed directly, without running anything.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler.data import input_specs, validated
from qcompiler.errors import DataError


class StatKind(enum.Enum):
    """Kinds of statistics a pass can request."""

    MINMAX = "minmax"
    HISTOGRAM = "histogram"
    ABSMAX_PER_CHANNEL = "absmax_per_channel"


@dataclasses.dataclass(frozen=True)
class StatRequest:
    """One statistic of one tensor. `axis` is the channel axis of per-channel statistics."""

    value: ir.Value
    kind: StatKind
    axis: int = -1

    @property
    def key(self) -> tuple[str, StatKind, int]:
        """Identity used to merge equal requests from different passes."""
        return (str(self.value.name), self.kind, self.axis)


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Counts over equal-width bins spanning [lo, hi]; `lo`/`hi` are the exact observed extremes."""

    counts: np.ndarray
    lo: float
    hi: float

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, len(counts) + 1 of them."""
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        """Bin centres, where each bin's mass is assumed to sit."""
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2


class Reducer(Protocol):
    """Folds batches of one tensor into a bounded-size statistic."""

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""

    def result(self) -> object:
        """The statistic over everything seen so far."""


class MinMaxReducer:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch (NaNs are ignored)."""
        if array.size:
            self.lo = min(self.lo, float(np.nanmin(array)))
            self.hi = max(self.hi, float(np.nanmax(array)))

    def result(self) -> tuple[float, float]:
        """(min, max); (0, 0) when nothing was seen."""
        if self.lo > self.hi:
            return (0.0, 0.0)
        return (self.lo, self.hi)


class HistogramReducer:
    """A fixed number of equal-width bins whose range grows to cover every batch.

    When a batch falls outside the current range, the existing counts are redistributed over the
    wider range by linear interpolation of the cumulative distribution (as PyTorch's
    HistogramObserver does), then the batch is added exactly.
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        flat = np.asarray(array, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if self.lo > self.hi:
            self.lo, self.hi = lo, hi
        elif lo < self.lo or hi > self.hi:
            self._widen(min(lo, self.lo), max(hi, self.hi))
        span_hi = self.hi if self.hi > self.lo else self.lo + 1e-12
        counts, _ = np.histogram(flat, bins=self.bins, range=(self.lo, span_hi))
        self.counts += counts

    def _widen(self, lo: float, hi: float) -> None:
        old_edges = np.linspace(self.lo, self.hi, self.bins + 1)
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        new_edges = np.linspace(lo, hi, self.bins + 1)
        redistributed = np.interp(new_edges, old_edges, cumulative, left=0.0, right=cumulative[-1])
        self.counts = np.diff(redistributed)
        self.lo, self.hi = lo, hi

    def result(self) -> Histogram:
        """The histogram so far."""
        if self.lo > self.hi:
            return Histogram(np.zeros(self.bins), 0.0, 0.0)
        return Histogram(self.counts.copy(), self.lo, self.hi)


class AbsMaxPerChannelReducer:
    """Running max of |x| per channel along `axis` (reduced over every other axis)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.absmax: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        moved = np.moveaxis(np.abs(array), self.axis, -1)
        batch_max = moved.reshape(-1, moved.shape[-1]).max(axis=0)
        self.absmax = batch_max if self.absmax is None else np.maximum(self.absmax, batch_max)

    def result(self) -> np.ndarray:
        """One value per channel."""
        if self.absmax is None:
            raise DataError("per-channel statistic requested but no data was seen")
        return self.absmax


def make_reducer(request: StatRequest, histogram_bins: int) -> Reducer:
    """The reducer that computes `request`."""
    if request.kind is StatKind.MINMAX:
        return MinMaxReducer()
    if request.kind is StatKind.HISTOGRAM:
        return HistogramReducer(histogram_bins)
    return AbsMaxPerChannelReducer(request.axis)


class Statistics:
    """Results of a calibration step, looked up by the request that asked for them."""

    def __init__(self, results: Mapping[tuple[str, StatKind, int], object], batches: int) -> None:
        self._results = dict(results)
        self.batches = batches

    def __getitem__(self, request: StatRequest) -> object:
        return self._results[request.key]

    def minmax(self, value: ir.Value) -> tuple[float, float]:
        """Min and max of `value`."""
        return self._results[(str(value.name), StatKind.MINMAX, -1)]  # type: ignore[return-value]

    def histogram(self, value: ir.Value) -> Histogram:
        """Histogram of `value`."""
        return self._results[(str(value.name), StatKind.HISTOGRAM, -1)]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._results)


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of `model` whose outputs also include the named intermediate tensors."""
    clone = model.clone()
    values: dict[str, ir.Value] = {}
    for node in clone.graph:
        for output in node.outputs:
            values[str(output.name)] = output
    present = {str(v.name) for v in clone.graph.outputs}
    for name in names:
        if name not in present:
            clone.graph.outputs.append(values[name])
    return clone


def collect(
    model: ir.Model,
    requests: Iterable[StatRequest],
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    histogram_bins: int = 2048,
    max_batches: int | None = None,
    progress: bool = True,
    description: str = "calibrating",
) -> Statistics:
    """Run `data` once through `model` in onnxruntime and reduce every requested statistic.

    Args:
        model: the float model (not modified).
        requests: statistics wanted, possibly with duplicates across passes.
        data: batches (feed dicts); each is validated against the model's inputs.
        histogram_bins: bins per histogram.
        max_batches: stop after this many batches.
        progress: show a tqdm bar.
        description: label of the progress bar.
    """
    from qcompiler.backends.onnxruntime.session import create_session

    merged: dict[tuple[str, StatKind, int], StatRequest] = {}
    for request in requests:
        merged.setdefault(request.key, request)
    reducers = {key: make_reducer(req, histogram_bins) for key, req in merged.items()}
    results: dict[tuple[str, StatKind, int], object] = {}

    # Constant tensors need no run.
    runtime_keys = []
    for key, request in merged.items():
        if request.value.const_value is not None:
            reducers[key].update(request.value.const_value.numpy())
            results[key] = reducers[key].result()
        else:
            runtime_keys.append(key)

    specs = input_specs(model)
    input_names = {spec.name for spec in specs}
    fetch = sorted({key[0] for key in runtime_keys} - input_names)
    batches = 0
    if runtime_keys:
        session = create_session(_with_outputs(model, fetch))
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        if max_batches is not None and total is not None:
            total = min(total, max_batches)
        stream = validated(data, specs, "calibration data", limit=max_batches)
        for feed in tqdm(stream, total=total, desc=description, unit="batch", disable=not progress):
            outputs = dict(zip(fetch, session.run(fetch, feed), strict=True)) if fetch else {}
            outputs.update({name: feed[name] for name in input_names})
            for key in runtime_keys:
                reducers[key].update(outputs[key[0]])
            batches += 1
        for key in runtime_keys:
            results[key] = reducers[key].result()
    return Statistics(results, batches)
